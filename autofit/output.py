"""The output directory: lock, atomic writes, results.json, tuned.yaml.

An existing output dir is never overwritten without ``force`` nor reused without ``resume``;
a lock file (pid inside) makes a second concurrent ``tune`` on the same dir refuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from autofit.errors import OutputDirError
from autofit.export import tuned_spec

LOCK_NAME = ".autofit.lock"
RESULT_FILES = ("results.json", "tuned.yaml", "study.journal")


def write_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write via a temp file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
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


@contextlib.contextmanager
def locked_output_dir(out_dir: str | Path, *, resume: bool, force: bool) -> Iterator[Path]:
    """Claim ``out_dir`` for one tune run (see module docstring)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output dir {out} exists and is not a directory")
    existing = out.exists() and any(
        (out / name).exists() for name in ("results.json", "tuned.yaml")
    )
    out.mkdir(parents=True, exist_ok=True)
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
    try:
        if existing and not resume and not force:
            raise OutputDirError(
                f"output dir {out} already holds tune results; pass --resume to continue that "
                f"tune or --force to start over"
            )
        if existing and force and not resume:
            for name in RESULT_FILES:
                (out / name).unlink(missing_ok=True)
        yield out
    finally:
        lock.unlink(missing_ok=True)


def write_results(out_dir: str | Path, results: dict[str, Any]) -> list[Path]:
    """results.json and tuned.yaml (atomically)."""
    out = Path(out_dir)
    written = [write_atomic(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")]
    if results.get("best"):
        best = results["best"]
        header = (
            f"# Tuned by autofit {results.get('autofit_version')} on {results['device'].get('name')} "
            f"(torch {results['device'].get('torch')}), spec hash {results.get('spec_hash')}, "
            f"margin {results.get('margin')}.\n"
            f"# best: batch {best['batch_size']}, input size {best['input_size']}, "
            f"{best['precision']}, checkpoint segments {best['checkpoint_segments']}; "
            f"peak {best.get('peak_bytes')} bytes; verified: {best.get('verified')}\n"
        )
        tuned = tuned_spec(results["spec"], best)
        written.append(write_atomic(out / "tuned.yaml",
                                    header + yaml.safe_dump(tuned, sort_keys=False)))
    return written
