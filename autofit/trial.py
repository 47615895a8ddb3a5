"""Real trials: one fresh process per candidate, one structured result back.

A trial runs ``warmup_steps`` (>= 2: optimizer state appears at the first step) plus
``steps_per_trial`` timed steps of the shared training step, under a memory limit:

* CUDA: ``set_per_process_memory_fraction`` caps the caching allocator when the budget is
  below the card; peaks from ``max_memory_allocated`` / ``max_memory_reserved``.
* CPU, ``cpu_limit: budget`` (default): the tracker counts live tensor bytes over real
  execution and raises ``torch.OutOfMemoryError`` past the limit. Deterministic.
* CPU, ``cpu_limit: rlimit``: ``RLIMIT_AS`` = current VmSize + limit with tuned malloc; the
  real allocator fails. Noisier (address space, not bytes), but it is the real allocator.

The process is forked from a server that has imported torch once (``forkserver``), so each
trial is isolated (no allocator or optimizer state leaks between trials) without paying the
torch import each time. Status is data: fits | oom | error | timeout | crashed.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from autofit.candidate import Candidate
from autofit.memory import MemoryBreakdown
from autofit.spec import ExperimentSpec


class TrialStatus(str, Enum):
    FITS = "fits"
    OOM = "oom"
    ERROR = "error"
    TIMEOUT = "timeout"
    CRASHED = "crashed"


@dataclass
class TrialResult:
    """What one real trial measured."""

    candidate: Candidate
    status: TrialStatus
    message: str = ""
    memory: MemoryBreakdown | None = None
    """Measured breakdown (CUDA: peak_bytes = max_memory_allocated, reserved_bytes set)."""
    step_time_s: float | None = None
    """Median of the timed steps."""
    samples_per_s: float | None = None
    units_per_s: float | None = None
    units_name: str | None = None
    """tokens or pixels (per second in units_per_s)."""
    steps_run: int = 0
    wall_time_s: float = 0.0
    """Whole trial as the tuner saw it: process start, build, steps."""
    overhead_s: float = 0.0
    """Wall time not spent in training steps (process start, imports, model build)."""
    limit_bytes: int | None = None
    limit_kind: str = ""
    """cpu-budget | rlimit | cuda-fraction | cuda-device | none: what produced an OOM."""
    phase: str = ""
    """Phase in which an OOM or error happened."""
    device: dict[str, Any] = field(default_factory=dict)
    warning: str = ""
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.status is TrialStatus.FITS

    @property
    def peak_bytes(self) -> int | None:
        """The number compared with the limit: reserved on CUDA, live bytes on CPU."""
        if self.memory is None:
            return None
        if self.memory.reserved_bytes is not None:
            return self.memory.reserved_bytes
        return self.memory.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "status": self.status.value,
            "message": self.message,
            "memory": self.memory.to_dict() if self.memory else None,
            "peak_bytes": self.peak_bytes,
            "step_time_s": self.step_time_s,
            "samples_per_s": self.samples_per_s,
            "units_per_s": self.units_per_s,
            "units_name": self.units_name,
            "steps_run": self.steps_run,
            "wall_time_s": self.wall_time_s,
            "overhead_s": self.overhead_s,
            "limit_bytes": self.limit_bytes,
            "limit_kind": self.limit_kind,
            "phase": self.phase,
            "device": self.device,
            "warning": self.warning,
            "loss": self.loss,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        memory = data.get("memory")
        return cls(
            candidate=Candidate.from_dict(data["candidate"]),
            status=TrialStatus(data["status"]),
            message=data.get("message", ""),
            memory=MemoryBreakdown.from_dict(memory) if memory else None,
            step_time_s=data.get("step_time_s"),
            samples_per_s=data.get("samples_per_s"),
            units_per_s=data.get("units_per_s"),
            units_name=data.get("units_name"),
            steps_run=int(data.get("steps_run", 0)),
            wall_time_s=float(data.get("wall_time_s", 0.0)),
            overhead_s=float(data.get("overhead_s", 0.0)),
            limit_bytes=data.get("limit_bytes"),
            limit_kind=data.get("limit_kind", ""),
            phase=data.get("phase", ""),
            device=data.get("device", {}),
            warning=data.get("warning", ""),
            loss=data.get("loss"),
        )


# --------------------------------------------------------------------------- process launch


class _Zygote:
    """Parent side of ``autofit.zygote``: one server process, restarted if it dies."""

    def __init__(self) -> None:
        env = dict(os.environ)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autofit.zygote"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        self._buffer = b""
        self._ready = False

    def _ensure_ready(self) -> None:
        """Wait for the server's torch import (started in __init__, so it overlaps other work)."""
        if self._ready:
            return
        ready = self._read(120.0)
        if not ready or not ready.get("ready"):
            self.close()
            raise RuntimeError("the trial fork server did not start")
        self._ready = True

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self, timeout_s: float | None) -> dict[str, Any] | None:
        """Next protocol line, or None on timeout / EOF."""
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
                return None
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
            raise RuntimeError("the trial fork server did not answer")
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


_ZYGOTE: _Zygote | None = None
_ACTIVE: set[int] = set()


def _zygote() -> _Zygote:
    global _ZYGOTE
    if _ZYGOTE is None or not _ZYGOTE.alive():
        _ZYGOTE = _Zygote()
    return _ZYGOTE


def prestart() -> None:
    """Start the fork server now (its torch import overlaps the predictor's traces)."""
    if os.environ.get("AUTOFIT_START_METHOD", "fork") == "fork" and hasattr(os, "fork"):
        _zygote()


def shutdown() -> None:
    """Stop the fork server (it also dies with this process)."""
    global _ZYGOTE
    if _ZYGOTE is not None:
        _ZYGOTE.close()
        _ZYGOTE = None


def kill_active_trials() -> None:
    """Kill every running trial's process group (Ctrl-C / SIGTERM)."""
    for pid in list(_ACTIVE):
        _kill_group(pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.kill(pid, signal.SIGKILL)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _launch(request_path: str, result_path: str, log_path: str, env: dict[str, str],
            timeout_s: float) -> tuple[bool, int | None]:
    """Run the trial process; returns (timed_out, exit code)."""
    global _ZYGOTE
    job = {"request": request_path, "result": result_path, "log": log_path, "env": env,
           "sys_path": [p for p in sys.path if p and os.path.isdir(p)]}
    if os.environ.get("AUTOFIT_START_METHOD", "fork") == "fork" and hasattr(os, "fork"):
        server = _zygote()
        pid = server.submit(job)
        _ACTIVE.add(pid)
        try:
            code = server.wait(timeout_s)
            if code is None:
                _kill_group(pid)
                server.wait(30.0)
                return True, None
            return False, code
        except BaseException:
            _kill_group(pid)
            shutdown()
            raise
        finally:
            _ACTIVE.discard(pid)
    # plain fresh interpreter (slower: pays the torch import)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "autofit.worker", request_path, result_path],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env={**os.environ, **env}, start_new_session=True)
    _ACTIVE.add(proc.pid)
    try:
        code = proc.wait(timeout_s)
        return False, code
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait(30)
        return True, None
    except BaseException:
        _kill_group(proc.pid)
        raise
    finally:
        _ACTIVE.discard(proc.pid)


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[:600]


def resolve_device(spec_device: str) -> str:
    """auto -> cuda if available, else cpu."""
    if spec_device != "auto":
        return spec_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_trial(spec: ExperimentSpec, candidate: Candidate, *, limit_bytes: int | None = None,
              steps: int | None = None, warmup_steps: int | None = None,
              timeout_s: float | None = None, device: str | None = None) -> TrialResult:
    """Run one candidate in a fresh process and return what it measured. Never raises for
    anything the trial does (OOM, user error, hang, crash); only KeyboardInterrupt passes."""
    device = device or resolve_device(spec.device)
    timeout_s = spec.search.timeout_s if timeout_s is None else timeout_s
    request = {
        "spec": spec.raw,
        "source": spec.source_path,
        "candidate": candidate.to_dict(),
        "device": device,
        "limit_bytes": limit_bytes,
        "cpu_limit": spec.memory.cpu_limit,
        "warmup_steps": spec.search.warmup_steps if warmup_steps is None else warmup_steps,
        "steps": spec.search.steps_per_trial if steps is None else steps,
    }
    env: dict[str, str] = {}
    if spec.memory.cpu_limit == "rlimit" and not device.startswith("cuda"):
        # malloc returns memory eagerly so RLIMIT_AS tracks live bytes (DESIGN.md, Pitfalls)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
                   MALLOC_ARENA_MAX="1", AUTOFIT_RLIMIT="1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autofit-trial-") as tmp:
        request_path = str(Path(tmp) / "request.json")
        result_path = str(Path(tmp) / "result.json")
        log_path = str(Path(tmp) / "trial.log")
        Path(request_path).write_text(json.dumps(request, default=str))
        timed_out, code = _launch(request_path, result_path, log_path, env, timeout_s)
        wall = time.perf_counter() - started
        if timed_out:
            return TrialResult(candidate=candidate, status=TrialStatus.TIMEOUT,
                               message=f"no result within {timeout_s:g} s; the trial was killed",
                               wall_time_s=wall, limit_bytes=limit_bytes)
        if not os.path.exists(result_path):
            if code is not None and code < 0:
                why = f"killed by {_signal_name(code)}"
                if code == -signal.SIGKILL:
                    why += " (the OS out-of-memory killer, or an external kill)"
            else:
                why = f"exited with code {code} without a result"
            tail = _log_tail(log_path)
            return TrialResult(candidate=candidate, status=TrialStatus.CRASHED,
                               message=f"trial process {why}" + (f"; last output: {tail}" if tail else ""),
                               wall_time_s=wall, limit_bytes=limit_bytes)
        data = json.loads(Path(result_path).read_text())
    result = TrialResult.from_dict(data)
    result.wall_time_s = wall
    step_total = sum(data.get("step_times_s") or []) + sum(data.get("warmup_times_s") or [])
    result.overhead_s = max(0.0, wall - step_total) if result.fits else 0.0
    result.extra = {k: data[k] for k in ("build_s", "child_s", "traced_peak_bytes",
                                         "rss_peak_bytes", "alloc_conf", "traceback",
                                         "optimizer_state") if k in data}
    return result
