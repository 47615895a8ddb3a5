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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autofit.candidate import Candidate
from autofit.device import resolve_device
from autofit.spec import ExperimentSpec
from autofit.trials.forkserver import ForkServer, fork_enabled, frameworks_loaded
from autofit.trials.result import TrialResult, TrialStatus

_SERVER: ForkServer | None = None
_ACTIVE: set[int] = set()


def _server() -> ForkServer:
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        _SERVER = ForkServer(frameworks_loaded())
    else:  # frameworks the spec loaded since the server started: imported there once, not
        _SERVER.preload(frameworks_loaded())  # in every forked trial (1.5-3 s each)
    return _SERVER


def prestart() -> None:
    """Start the fork server now (its torch import overlaps the predictor's traces), with the
    training frameworks the spec's model has imported here (``forkserver.FRAMEWORKS``); a
    server already running is asked to import those it lacks (also overlapping the traces)."""
    if fork_enabled():
        _server()


def running_server() -> ForkServer | None:
    """The fork server if one was started and still runs (None: none, nothing started)."""
    return _SERVER if _SERVER is not None and _SERVER.alive() else None


def shutdown() -> None:
    """Stop the fork server (it also dies with this process)."""
    global _SERVER
    if _SERVER is not None:
        _SERVER.close()
        _SERVER = None


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
    job = {"request": request_path, "result": result_path, "log": log_path, "env": env,
           "sys_path": [p for p in sys.path if p and os.path.isdir(p)]}
    if fork_enabled():
        server = _server()
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
        proc = subprocess.Popen([sys.executable, "-m", "autofit.trials.child", request_path, result_path],
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


def run_trial(spec: ExperimentSpec, candidate: Candidate, *, limit_bytes: int | None = None,
              steps: int | None = None, warmup_steps: int | None = None,
              timeout_s: float | None = None, device: str | None = None,
              allocator_view: bool = False) -> TrialResult:
    """Run one candidate in a fresh process and return what it measured. Never raises for
    anything the trial does (OOM, user error, hang, crash); only KeyboardInterrupt passes.
    ``allocator_view``: CPU, also measure the allocator's peak under ``torch.profiler``
    (``extra["allocator_peak_bytes"]``, ``extra["allocator_peak_op"]``)."""
    from autofit.parallel import spec_for

    spec = spec_for(spec, candidate)  # the candidate's strategy, from a parallel.strategy list
    if spec.parallel.strategy != "none":  # one process per rank (autofit.trials.ranks)
        from autofit.trials.ranks import run_rank_trial

        return run_rank_trial(spec, candidate, limit_bytes=limit_bytes, steps=steps,
                              warmup_steps=warmup_steps, timeout_s=timeout_s, device=device)
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
        "allocator_view": allocator_view,
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
                                         "optimizer_state", "allocator_peak_bytes",
                                         "allocator_peak_op", "frameworks_preloaded")
                    if k in data}
    return result
