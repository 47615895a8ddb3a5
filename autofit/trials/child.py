"""The inside of one trial: runs in its own process, never in the tuner's.

``run_in_child(request)`` builds the job, runs the warm-up and timed steps under the chosen
memory limit, and returns a plain dict (the ``TrialResult`` fields). Every exception from
user code becomes data here; only a hard crash (signal, OS OOM killer) escapes, and the
parent sees that as a dead process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any

from autofit.choices import LimitKind, Phase, Precision
from autofit.device import cuda_device, cuda_peaks, device_info, prepare_cuda, vm_size_bytes
from autofit.trials.oom import is_oom_error

# torch is imported lazily so that the fork server can preload it once.


class TrialRun:
    """One trial's set-up, steps and measurement; ``result`` fills in as it goes."""

    def __init__(self, request: dict[str, Any], result: dict[str, Any]) -> None:
        self.request = request
        self.result = result
        self.steps_started = 0  # includes a step that ran out of memory or raised
        self.tracker: Any = None
        self.job: Any = None
        self.losses: list[float] = []
        self.times: list[float] = []
        self.warmup_times: list[float] = []
        self.allocator_view: Any = None  # predict.calibrate.AllocatorView (a CPU probe)

    @property
    def phase(self) -> Phase:
        return Phase(self.tracker.phase) if self.tracker is not None else Phase.SETUP

    def set_up(self) -> None:
        """Spec, device, memory limit, tracker and the built job."""
        import torch

        from autofit.candidate import Candidate
        from autofit.memory import MemoryTracker, PhaseHooks
        from autofit.spec import spec_from_dict
        from autofit.step import TrainingJob

        request, result = self.request, self.result
        spec = spec_from_dict(request["spec"], request.get("source") or "<spec>")
        if request.get("source"):
            spec = dataclasses.replace(spec, source_path=request["source"])
        self.spec = spec
        self.candidate = Candidate.from_dict(request["candidate"])
        device = torch.device(request["device"])
        self.device = cuda_device(request["device"]) if device.type == "cuda" else device
        limit = request.get("limit_bytes")
        result["device"] = device_info(str(self.device), detailed=True)
        result["limit_bytes"] = limit
        tracker_limit = None
        if self.device.type == "cuda":
            result["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
            result["limit_kind"] = prepare_cuda(self.device, limit).value
        elif limit is not None and request.get("cpu_limit", "budget") == "rlimit":
            cap = vm_size_bytes() + limit + int(request.get("rlimit_headroom_bytes", 0))
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            result["limit_kind"] = LimitKind.RLIMIT.value
        else:
            tracker_limit = limit
            result["limit_kind"] = (LimitKind.CPU_BUDGET if limit is not None else LimitKind.NONE).value
        self.tracker = MemoryTracker(round_to=512 if self.device.type == "cuda" else 1,
                                     limit_bytes=tracker_limit)
        build_start = time.perf_counter()
        self.job = TrainingJob(spec, self.candidate, self.device, hooks=PhaseHooks(self.tracker))
        for tensor in self.job.parameters_and_buffers():
            self.tracker.track(tensor, "params")
        result["build_s"] = time.perf_counter() - build_start
        result["step_kind"] = self.job.step_kind.value

    def _step(self, times: list[float]) -> None:
        import torch

        t0 = time.perf_counter()
        self.steps_started += 1
        loss = self.job.run_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        times.append(time.perf_counter() - t0)
        self.losses.append(float(loss))

    def run_steps(self) -> None:
        """Warm-up under the tracker, then the timed steps.

        On CUDA only the warm-up is tracked (the breakdown comes from it; the peaks come from
        the allocator) and the timed steps run untracked, at full speed. The tracker is left
        through the ExitStack, once, so an OOM in a timed step stays an OOM.
        """
        warmup = int(self.request.get("warmup_steps", 2))
        fp16 = self.candidate.precision == Precision.FP16
        untracked_timing = self.request.get("untracked_timed_steps", self.device.type == "cuda")
        with contextlib.ExitStack() as tracked:
            tracked.enter_context(self.tracker)
            if self.request.get("allocator_view") and self.device.type == "cpu":
                from autofit.predict.calibrate import AllocatorView

                self.allocator_view = tracked.enter_context(AllocatorView(self.tracker.live_bytes))
            # at least `warmup` steps and until the optimizer holds its state (fp16 steps
            # skipped by GradScaler on overflow would hide it)
            extra = 0
            while len(self.warmup_times) < warmup or (
                    fp16 and not self.job.optimizer_has_state() and extra < 8):
                extra += len(self.warmup_times) >= warmup
                self._step(self.warmup_times)
            if untracked_timing:
                tracked.close()
            for _ in range(int(self.request.get("steps", 3))):
                self._step(self.times)

    def measure(self) -> None:
        """Fill the result of a trial whose steps all ran."""
        memory = self.tracker.breakdown()
        if self.device.type == "cuda":
            memory.peak_bytes, memory.reserved_bytes = cuda_peaks(self.device)
            self.result["traced_peak_bytes"] = self.tracker.peak_bytes
        step_time = statistics.median(self.times) if self.times else float("nan")
        samples = self.candidate.batch_size / step_time if step_time > 0 else 0.0
        units_name, units_per_sample = _units(self.spec, self.candidate)
        warnings = []
        if self.losses and not all(math.isfinite(v) for v in self.losses):
            warnings.append("loss is NaN/inf in some steps (memory is still measured)")
        if self.candidate.precision == Precision.FP16 and not self.job.optimizer_has_state():
            warnings.append("optimizer state never appeared (every fp16 step overflowed)")
        self.result.update(
            status="fits", memory=memory.to_dict(), step_time_s=step_time,
            step_times_s=self.times, warmup_times_s=self.warmup_times, samples_per_s=samples,
            units_name=units_name,
            units_per_s=samples * units_per_sample if units_per_sample else None,
            steps_run=self.steps_started, loss=self.losses[-1] if self.losses else None,
            optimizer_state=self.job.optimizer_has_state(),
            rss_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            warning="; ".join(warnings),
            op_log=self.tracker.op_log,  # compared op by op with the trace (predict.calibrate)
        )
        if self.allocator_view is not None:  # what the CPU allocator saw (scratch included)
            self.result.update(allocator_peak_bytes=self.allocator_view.peak_bytes,
                               allocator_peak_op=self.allocator_view.peak_op)

    def record_failure(self, exc: BaseException) -> None:
        """An exception from set-up or a step: OOM, or the user's error, as data."""
        from autofit.errors import AutofitError

        result = self.result
        oom, kind = is_oom_error(exc)
        phase = self.phase
        result["steps_run"] = self.steps_started
        result["phase"] = phase.value
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if oom:
            result["status"] = "oom"
            if kind is not None:
                result["limit_kind"] = kind.value
            result["message"] = f"out of memory in {phase}: {first_line[:300]}"
            if self.tracker is not None:
                result["memory"] = {"peak_bytes": int(self.tracker.peak_bytes), "peak_phase": phase.value}
            return
        result["status"] = "error"
        where = "" if isinstance(exc, AutofitError) else f" in {phase}"
        result["message"] = f"{type(exc).__name__}{where}: {first_line[:500]}"
        result["traceback"] = traceback.format_exc()[-4000:]


def run_in_child(request: dict[str, Any], run_type: type[TrialRun] | None = None,
                 **fields: Any) -> dict[str, Any]:
    """Run one trial described by ``request``; return the result dict. Never raises.

    ``run_type``: a ``TrialRun`` subclass (one rank of a multi-rank trial); ``fields`` are
    put in the result from the start (its rank), so they are there whatever happens."""
    from autofit.trials.forkserver import FRAMEWORKS

    started = time.perf_counter()
    result: dict[str, Any] = {"status": "error", "message": "", "candidate": request["candidate"],
                              **fields}
    # which training frameworks this process started with (forked from a server that had
    # imported them) rather than importing them while it builds the model
    result["frameworks_preloaded"] = [name for name in FRAMEWORKS if name in sys.modules]
    run = (run_type or TrialRun)(request, result)
    try:
        run.set_up()
        run.run_steps()
        run.measure()
    except BaseException as exc:  # noqa: BLE001 - a trial's failure is data
        run.record_failure(exc)
    result["child_s"] = time.perf_counter() - started
    return result


def _units(spec: Any, candidate: Any) -> tuple[str | None, int]:
    if spec.data.kind == "tokens":
        return "tokens", candidate.input_size or spec.data.seq_len
    if spec.data.kind == "image":
        from autofit.build import input_shape

        shape = input_shape(spec, candidate)
        return "pixels", shape[2] * shape[3]
    return None, 0


def child_main(request_path: str, result_path: str) -> None:
    """Entry point of the trial process: read the request file, write the result file."""
    try:
        os.setsid()  # own process group, so the parent can kill anything we start
    except OSError:
        pass
    with open(request_path) as fh:
        request = json.load(fh)
    result = run_in_child(request)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, default=str)
    os.replace(tmp, result_path)
    sys.stdout.flush()


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
