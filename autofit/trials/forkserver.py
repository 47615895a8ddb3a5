"""A small fork server: imports torch once, forks one fresh process per trial.

Both halves live here: ``_serve`` runs in the server process, ``ForkServer`` is the
parent's handle on it.

Each trial still runs in its own process (own allocator, own optimizer state, own crash),
but skips the ~2 s torch import. Unlike ``multiprocessing``'s forkserver it never re-imports
the caller's ``__main__``, so ``autofit.tune()`` works from any script or notebook.

Protocol, one JSON object per line. In: ``{"request", "result", "env", "sys_path"}`` (a
trial), or ``{"kind": "predict", "request", ...}`` (``batch_curve.predict_job``: settings'
predictions traced beside the parent's), or ``{"kind": "preload", "modules"}``
(``ForkServer.preload``: frameworks to import before the next fork; nothing comes back).
Out: ``{"pid": N}`` once forked, then ``{"pid": N, "exit": code}`` (negative = signal).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from autofit.errors import TrialError


def fork_enabled() -> bool:
    """Trials fork from the server unless ``AUTOFIT_START_METHOD`` says otherwise."""
    return os.environ.get("AUTOFIT_START_METHOD", "fork") == "fork" and hasattr(os, "fork")


class ForkServer:
    """Parent side of the fork server: one server process, restarted if it dies."""

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
        env[PRELOAD_ENV] = ",".join(preload)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autofit.trials.forkserver"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        self._buffer = b""
        self._ready = False
        self.preloaded = set(preload)  # the frameworks asked of the server so far

    def preload(self, names: tuple[str, ...]) -> None:
        """Have the server import these frameworks too, once, before it forks its next job:
        the spec's model loaded them here after the server had started (a server started
        early, then a Lightning spec). No reply: the next job waits for the import, which
        meanwhile overlaps whatever this process does (the predictions)."""
        missing = sorted(n for n in names if n in FRAMEWORKS and n not in self.preloaded)
        if not missing or not self.alive():
            return
        self.preloaded.update(missing)
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):  # a dead server: the next submit says so
            self.proc.stdin.write((json.dumps({"kind": "preload", "modules": missing}) + "\n").encode())
            self.proc.stdin.flush()

    def _ensure_ready(self) -> None:
        """Wait for the server's torch import (started in __init__, so it overlaps other work)."""
        if self._ready:
            return
        try:
            ready = self._read(120.0)
        except TrialError:
            ready = None
        if not ready or not ready.get("ready"):
            self.close()
            raise TrialError("the trial fork server did not start (run `python -m autofit.trials.forkserver` to see why)")
        self._ready = True

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready_now(self) -> bool:
        """Whether the server has finished its imports, without waiting for it."""
        if not self._ready:
            try:
                ready = self._read(0.0)
            except TrialError:
                return False
            self._ready = bool(ready and ready.get("ready"))
        return self._ready

    def _read(self, timeout_s: float | None) -> dict[str, Any] | None:
        """Next protocol line, or None on timeout; ``TrialError`` if the server died."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise TrialError("the trial fork server exited unexpectedly (the OS out-of-memory "
                                 "killer, or an external kill); rerun with --resume")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def submit(self, job: dict[str, Any]) -> int:
        self._ensure_ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._read(60.0)
        if not reply or "pid" not in reply:
            raise TrialError("the trial fork server did not answer")
        return int(reply["pid"])

    def wait(self, timeout_s: float | None) -> int | None:
        reply = self._read(timeout_s)
        return None if reply is None else int(reply["exit"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(5)



#: the training frameworks a trial may import, preloaded in the server when the parent has
#: them loaded (a Lightning trial otherwise paid ``import lightning`` in every forked trial:
#: 1.5-1.8 s of its 2.2 s). Neither initialises CUDA on import, which forking relies on.
FRAMEWORKS = ("lightning.pytorch", "pytorch_lightning", "transformers")
PRELOAD_ENV = "AUTOFIT_FORKSERVER_PRELOAD"


def frameworks_loaded() -> tuple[str, ...]:
    """The frameworks of ``FRAMEWORKS`` that this process has imported (by the spec's model)."""
    return tuple(name for name in FRAMEWORKS if name in sys.modules)


def _preload(names: str) -> None:
    """Import the named frameworks here, so that every forked trial has them; a failure is
    left to the trial, which reports it. Their import-time output must not reach stdout (the
    protocol)."""
    import importlib

    for name in filter(None, names.split(",")):
        if name not in FRAMEWORKS:
            continue
        with contextlib.redirect_stdout(sys.stderr):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the trial imports it again and says why
                pass


def _serve() -> None:
    import torch  # noqa: F401  - the point of the server: pay the import once
    import torch._dynamo  # noqa: F401  - optimizers import it on construction (~2.5 s)
    import torch.utils.checkpoint  # noqa: F401

    import autofit.step  # noqa: F401
    import autofit.trials.child  # noqa: F401
    import autofit.zoo  # noqa: F401

    _preload(os.environ.pop(PRELOAD_ENV, ""))

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job.get("kind") == "preload":  # ForkServer.preload: no fork, no reply
            _preload(",".join(job.get("modules", [])))
            continue
        pid = os.fork()
        if pid == 0:  # the trial process
            code = 1
            try:
                os.environ.update(job.get("env", {}))
                for entry in reversed(job.get("sys_path", [])):
                    if entry not in sys.path:
                        sys.path.insert(0, entry)
                sys.stdin.close()
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                # the trial's own output goes to its log; stdout here is the protocol
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                if job.get("kind") == "predict":  # traces of other settings meanwhile
                    from autofit.predict.batch_curve import predict_job

                    predict_job(job["request"])
                else:
                    from autofit.trials.child import child_main

                    child_main(job["request"], job["result"])
                code = 0
            finally:
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.write(json.dumps({"pid": pid, "exit": code}) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
