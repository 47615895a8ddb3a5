"""Real multi-rank trials: one process per rank, as torchrun would start them.

``run_rank_trial`` starts N fresh processes (``python -m autofit.trials.ranks``) that join one
process group (gloo on CPU, NCCL on CUDA) through a file store, build the job with DDP or
FSDP2 (``autofit.parallel``), and run the warm-up and timed steps of the shared step under
the per-rank memory limit, each measuring its own peak. The trial reports the largest rank
peak and every rank's. OOM on any rank is OOM; a rank that dies or hangs makes the trial
``crashed`` / ``timeout``, and the whole group is killed (the other ranks would wait forever in
their next collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autofit.candidate import Candidate
from autofit.device import resolve_device
from autofit.spec import ExperimentSpec
from autofit.trials.child import TrialRun, run_in_child
from autofit.trials.result import TrialResult, TrialStatus

POLL_S = 0.05
FAILED = ("oom", "error")


# --------------------------------------------------------------------------- fewer GPUs than ranks


def cuda_device_count() -> int:
    """CUDA devices this machine has (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclasses.dataclass(frozen=True)
class RankShortfall:
    """A world size this machine cannot run on real ranks, and the one it verifies instead."""

    world_size: int
    """The ranks the job asks for (N)."""
    verified_world_size: int
    """The largest world size the trials can run here (k < N): one rank per CUDA device."""

    def note(self) -> str:
        return (f"verified on {self.verified_world_size} ranks; world size {self.world_size} "
                f"is predicted-only (this machine has {self.verified_world_size} CUDA "
                f"device{'s' if self.verified_world_size != 1 else ''}, one per rank)")

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "verified_world_size": self.verified_world_size,
                "predicted_only": True, "note": self.note()}


def rank_shortfall(world_size: int, device: str, *,
                   device_count: int | None = None) -> RankShortfall | None:
    """None when a real trial can run ``world_size`` ranks on ``device``: always on CPU (a
    gloo rank is a process), on CUDA when there is one device per rank. Otherwise the
    largest world size available (the device count; ``device_count`` overrides the query,
    for tests). Without any CUDA device there is nothing to verify on: None (the trial
    itself reports that)."""
    if world_size <= 1 or not str(device).startswith("cuda"):
        return None
    count = cuda_device_count() if device_count is None else device_count
    if count < 1 or count >= world_size:
        return None
    return RankShortfall(world_size, count)


def spec_shortfall(spec: ExperimentSpec, device: str, *,
                   device_count: int | None = None) -> RankShortfall | None:
    """``rank_shortfall`` of a spec that runs ddp/fsdp (any strategy of a list)."""
    if all(s == "none" for s in spec.parallel.strategies):
        return None
    return rank_shortfall(spec.world_size, device, device_count=device_count)


class _RankRun(TrialRun):
    """One rank of a multi-rank trial: the single-process trial, on a real process group."""

    def set_up(self) -> None:
        import torch

        from autofit.candidate import Candidate
        from autofit.choices import Category, LimitKind
        from autofit.device import cuda_device, device_info, prepare_cuda
        from autofit.memory import PhaseHooks
        from autofit.parallel import (
            RankPlan,
            ddp_wrapper,
            fsdp_wrapper,
            init_rank_group,
            local_tensor,
            rank_tracker,
        )
        from autofit.spec import spec_from_dict
        from autofit.step import TrainingJob

        request, result = self.request, self.result
        rank, world = int(request["rank"]), int(request["world_size"])
        spec = spec_from_dict(request["spec"], request.get("source") or "<spec>")
        if request.get("source"):
            spec = dataclasses.replace(spec, source_path=request["source"])
        self.spec = spec
        self.candidate = Candidate.from_dict(request["candidate"])
        self.plan = RankPlan(**request["plan"])
        device = torch.device(request["device"])
        if device.type == "cuda":
            device = cuda_device(f"cuda:{rank % max(1, torch.cuda.device_count())}")
            torch.cuda.set_device(device)
        self.device = device
        limit = request.get("limit_bytes")
        result["device"] = device_info(str(device), detailed=True)
        result["limit_bytes"] = limit
        tracker_limit = None
        if device.type == "cuda":
            result["limit_kind"] = prepare_cuda(device, limit).value
        else:
            tracker_limit = limit
            result["limit_kind"] = (LimitKind.CPU_BUDGET if limit is not None else LimitKind.NONE).value
        self.tracker = rank_tracker(round_to=512 if device.type == "cuda" else 1,
                                    limit_bytes=tracker_limit)
        mesh = init_rank_group(rank, world, request["store"], device, float(request["timeout_s"]))
        wrap = (fsdp_wrapper(self.plan, self.spec, mesh) if self.plan.strategy == "fsdp"
                else ddp_wrapper(self.plan, device))
        build_start = time.perf_counter()
        torch.manual_seed(0)
        with self.tracker:  # DDP allocates its buckets while it is built
            self.job = TrainingJob(self.spec, self.candidate, device,
                                   hooks=PhaseHooks(self.tracker), wrap=wrap)
        for tensor in self.job.parameters_and_buffers():
            self.tracker.track(local_tensor(tensor), Category.PARAMS)
        result["build_s"] = time.perf_counter() - build_start
        result["step_kind"] = self.job.step_kind.value
        result["rank"] = rank

    def run_steps(self) -> None:
        from autofit.parallel import settled_collectives, track_resizes

        with contextlib.ExitStack() as stack:
            stack.enter_context(track_resizes(self.tracker))
            if self.device.type == "cpu" and self.request.get("settle_collectives", True):
                # gloo: see settled_collectives
                self.result["collectives"] = stack.enter_context(
                    settled_collectives(tracker=self.tracker))
            super().run_steps()

    def measure(self) -> None:
        from autofit.parallel import MEASURE_FROM_STEP, replay_peak

        super().measure()
        self.result["peak_from_step_bytes"] = replay_peak(
            self.tracker, from_step=MEASURE_FROM_STEP)[0]


def rank_main(request_path: str, rank: int, result_path: str) -> None:
    """Entry point of one rank's process."""
    with open(request_path) as fh:
        request = json.load(fh)
    request["rank"] = rank
    result = run_in_child(request, _RankRun, rank=rank)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, default=str)
    os.replace(tmp, result_path)
    sys.stdout.flush()
    # a failed rank leaves its peers blocked in a collective: the parent kills the group
    os._exit(0)


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[:400]


def run_rank_trial(spec: ExperimentSpec, candidate: Candidate, *, limit_bytes: int | None = None,
                   steps: int | None = None, warmup_steps: int | None = None,
                   timeout_s: float | None = None, device: str | None = None,
                   plan: Any = None, device_count: int | None = None,
                   settle_collectives: bool = True) -> TrialResult:
    """Run ``candidate`` on ``plan.world_size`` real ranks (default: the spec's parallel
    section); ``limit_bytes`` is each rank's budget. Never raises for what a rank does.

    On CUDA with fewer devices than ranks the trial runs the largest world size available
    (``rank_shortfall``), one rank per device; ``extra["requested_world_size"]`` and the
    result's warning say that the asked world size is predicted-only.

    On CPU each collective returns only once gloo's worker thread has released its tensors
    (``autofit.parallel.settled_collectives``), so every rank's peak follows the step's order;
    ``settle_collectives=False`` measures without that wait (for comparison)."""
    from autofit.parallel import RankPlan

    plan = plan or RankPlan.from_spec(spec)
    device = device or resolve_device(spec.device)
    short = rank_shortfall(plan.world_size, device, device_count=device_count)
    if short is not None:
        plan = dataclasses.replace(plan, world_size=short.verified_world_size)
    result = _run_ranks(spec, candidate, plan, device, limit_bytes, steps, warmup_steps, timeout_s,
                        settle_collectives)
    if short is not None:
        result.extra["requested_world_size"] = short.world_size
        result.warning = "; ".join(w for w in (result.warning, short.note()) if w)
    return result


def _run_ranks(spec: ExperimentSpec, candidate: Candidate, plan: Any, device: str,
               limit_bytes: int | None, steps: int | None, warmup_steps: int | None,
               timeout_s: float | None, settle_collectives: bool = True) -> TrialResult:
    timeout_s = spec.search.timeout_s if timeout_s is None else timeout_s
    world = plan.world_size
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autofit-ranks-") as tmp:
        folder = Path(tmp)
        request = {
            "spec": spec.raw, "source": spec.source_path, "candidate": candidate.to_dict(),
            "device": device, "limit_bytes": limit_bytes, "world_size": world,
            "store": str(folder / "store"), "timeout_s": timeout_s,
            "plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__},
            "warmup_steps": spec.search.warmup_steps if warmup_steps is None else warmup_steps,
            "steps": spec.search.steps_per_trial if steps is None else steps,
            "settle_collectives": settle_collectives,
        }
        (folder / "request.json").write_text(json.dumps(request, default=str))
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(world):
                with open(folder / f"rank{rank}.log", "ab") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "autofit.trials.ranks", str(folder / "request.json"),
                         str(rank), str(folder / f"rank{rank}.json")],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                        start_new_session=True))
            status, message = _wait(procs, folder, timeout_s, started)
        finally:
            _kill(procs)
        results = [_read(folder / f"rank{r}.json") for r in range(world)]
    wall = time.perf_counter() - started
    if status is not None:
        return TrialResult(candidate=candidate, status=status, message=message, wall_time_s=wall,
                           limit_bytes=limit_bytes, extra={"world_size": world,
                                                           "strategy": plan.strategy})
    return _combine(candidate, plan, [r for r in results if r is not None], wall, limit_bytes)


def _wait(procs: list[subprocess.Popen[bytes]], folder: Path, timeout_s: float,
          started: float) -> tuple[TrialStatus | None, str]:
    """Until every rank has written its result, one has failed, died, or time ran out."""
    while True:
        # deaths first: a dead rank's peers then fail in their next collective, and that
        # failure is the consequence, not the cause
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code is not None and _read(folder / f"rank{rank}.json") is None:
                why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                tail = _tail(folder / f"rank{rank}.log")
                return TrialStatus.CRASHED, (f"rank {rank} of {len(procs)} {why} without a "
                                             f"result; the group was killed"
                                             + (f"; last output: {tail}" if tail else ""))
        results = [_read(folder / f"rank{rank}.json") for rank in range(len(procs))]
        if any(r is not None and r.get("status") in FAILED for r in results):
            return None, ""  # its peers may hang in a collective: stop them
        if all(r is not None for r in results):
            return None, ""
        if time.perf_counter() - started > timeout_s:
            return TrialStatus.TIMEOUT, (f"no result from every rank within {timeout_s:g} s; "
                                         f"the group of {len(procs)} was killed")
        time.sleep(POLL_S)


def _combine(candidate: Candidate, plan: Any, results: list[dict[str, Any]], wall: float,
             limit_bytes: int | None) -> TrialResult:
    """One result from the ranks': the first failed rank's, else the rank with the top peak."""
    failed = [r for r in results if r.get("status") in FAILED]
    failed.sort(key=lambda r: (r["status"] != "oom", r.get("rank", 0)))
    if failed:
        data = dict(failed[0])
        data["message"] = f"rank {data.get('rank', 0)}: {data.get('message', '')}"
    else:
        data = max(results, key=lambda r: (r.get("memory") or {}).get("peak_bytes", 0))
    result = TrialResult.from_dict(data)
    result.wall_time_s = wall
    result.limit_bytes = limit_bytes
    by_rank = sorted(results, key=lambda r: r.get("rank", 0))
    result.extra = {
        "strategy": plan.strategy, "world_size": plan.world_size,
        "rank_peaks": [(r.get("memory") or {}).get("peak_bytes") for r in by_rank],
        "rank_peaks_from_step": [r.get("peak_from_step_bytes") for r in by_rank],
        "rank_status": [r.get("status") for r in by_rank],
    }
    if any(r.get("collectives") for r in by_rank):
        # per rank: collectives run, waits for gloo's worker, still held after the wait
        result.extra["rank_collectives"] = [
            {k: (r.get("collectives") or {}).get(k, 0) for k in ("calls", "waited", "unsettled")}
            for r in by_rank]
    if "traceback" in data:
        result.extra["traceback"] = data["traceback"]
    return result


if __name__ == "__main__":
    rank_main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
