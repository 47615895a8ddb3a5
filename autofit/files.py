"""Files on disk: atomic writes, and the output directory a tune run claims.

Every file autofit writes goes through ``write_atomic`` (a temp file in the same directory,
fsync, rename): a crash or Ctrl-C never leaves a half-written file. An existing output dir is
never overwritten without ``force`` nor reused without ``resume``; a lock file (pid inside)
makes a second concurrent ``tune`` on the same dir refuse.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from autofit.errors import OutputDirError

LOCK_NAME = ".autofit.lock"
RESULT_FILES = ("results.json", "tuned.yaml", "study.journal")


def write_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write via a temp file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(out: Path) -> None:
    lock = out / LOCK_NAME
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or "0")
        except (OSError, ValueError):
            pid = 0
        if pid and _pid_alive(pid) and pid != os.getpid():
            raise OutputDirError(
                f"output dir {out} is in use by another autofit run (pid {pid}); "
                f"wait for it or choose another --out"
            ) from None
        lock.unlink(missing_ok=True)  # stale lock of a dead run
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")


def holds_results(out: Path) -> bool:
    """Whether ``out`` holds tune results (``OutputDirError`` when it is not a directory)."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output dir {out} exists and is not a directory")
    return out.exists() and any((out / name).exists() for name in RESULT_FILES[:2])


def refuse_taken(out: Path, *, resume: bool, force: bool) -> None:
    """``OutputDirError`` when ``out`` holds tune results and neither ``resume`` nor
    ``force`` is given (``tune`` checks this before it imports torch, and again under the
    lock)."""
    if holds_results(out) and not resume and not force:
        raise OutputDirError(
            f"output dir {out} already holds tune results; pass --resume to continue that "
            f"tune or --force to start over"
        )


@contextlib.contextmanager
def locked_output_dir(out_dir: str | Path, *, resume: bool, force: bool) -> Iterator[Path]:
    """Claim ``out_dir`` for one tune run (see module docstring)."""
    out = Path(out_dir)
    existing = holds_results(out)
    out.mkdir(parents=True, exist_ok=True)
    _take_lock(out)
    try:
        if existing:
            refuse_taken(out, resume=resume, force=force)
        if existing and force and not resume:
            for name in RESULT_FILES:
                (out / name).unlink(missing_ok=True)
        yield out
    finally:
        (out / LOCK_NAME).unlink(missing_ok=True)
