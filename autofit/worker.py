"""The inside of one trial: runs in its own process, never in the tuner's.

``run_in_child(request)`` builds the job, runs the warm-up and timed steps under the chosen
memory limit, and returns a plain dict (the ``TrialResult`` fields). Every exception from
user code becomes data here; only a hard crash (signal, OS OOM killer) escapes, and the
parent sees that as a dead process.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from typing import Any

# torch is imported lazily so that the fork server can preload it once.


def is_oom_error(exc: BaseException) -> tuple[bool, str]:
    """Classify an exception as out-of-memory; returns (is_oom, which limit produced it).

    The primary test is the exception type (``torch.OutOfMemoryError``, raised by the CUDA
    caching allocator and by the CPU budget). The CPU allocator under ``RLIMIT_AS`` raises
    a plain RuntimeError, so its messages are matched here and only here.
    """
    import torch

    from autofit.memory import BudgetExceeded

    if isinstance(exc, BudgetExceeded):
        return True, "cpu-budget"
    if isinstance(exc, torch.OutOfMemoryError):
        return True, "cuda-allocator"
    if isinstance(exc, MemoryError):
        return True, "rlimit"
    if isinstance(exc, RuntimeError):
        text = str(exc)
        # DefaultCPUAllocator (c10/core/impl/alloc_cpu.cpp) and oneDNN primitive creation
        # are what RLIMIT_AS produces on CPU (DESIGN.md, "Pitfalls").
        if "DefaultCPUAllocator: can't allocate memory" in text or (
            "could not create a primitive" in text and os.environ.get("AUTOFIT_RLIMIT")
        ):
            return True, "rlimit"
    return False, ""


def _device_info(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "kind": device.type,
        "torch": torch.__version__.split("+")[0],
        "torch_build": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_bytes=int(props.total_memory),
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=platform.processor() or platform.machine() or "cpu",
                    total_bytes=_cpu_total_bytes())
    return info


def _cpu_total_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _vm_size_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_in_child(request: dict[str, Any]) -> dict[str, Any]:
    """Run one trial described by ``request``; return the result dict. Never raises."""
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "error", "message": "", "candidate": request["candidate"]}
    steps_started = 0  # includes a step that ran out of memory or raised
    try:
        import torch

        from autofit.candidate import Candidate
        from autofit.memory import MemoryTracker, PhaseHooks
        from autofit.spec import spec_from_dict
        from autofit.step import TrainingJob

        spec = spec_from_dict(request["spec"], request.get("source") or "<spec>")
        if request.get("source"):
            import dataclasses
            spec = dataclasses.replace(spec, source_path=request["source"])
        candidate = Candidate.from_dict(request["candidate"])
        device = torch.device(request["device"])
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        limit = request.get("limit_bytes")
        result["device"] = _device_info(device)
        result["limit_bytes"] = limit
        cpu_limit = request.get("cpu_limit", "budget")
        tracker_limit = None
        if device.type == "cuda":
            torch.cuda.set_device(device)
            total = torch.cuda.get_device_properties(device).total_memory
            result["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
            if limit is not None and limit < total:
                # caps the caching allocator's reserved bytes: one GPU emulates a smaller one
                # (the CUDA context and non-PyTorch memory are outside this cap)
                torch.cuda.set_per_process_memory_fraction(limit / total, device)
                result["limit_kind"] = "cuda-fraction"
            else:
                result["limit_kind"] = "cuda-device"
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        elif limit is not None and cpu_limit == "rlimit":
            headroom = int(request.get("rlimit_headroom_bytes", 0))
            cap = _vm_size_bytes() + limit + headroom
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            result["limit_kind"] = "rlimit"
        else:
            tracker_limit = limit
            result["limit_kind"] = "cpu-budget" if limit is not None else "none"

        round_to = 512 if device.type == "cuda" else 1
        tracker = MemoryTracker(round_to=round_to, limit_bytes=tracker_limit)
        hooks = PhaseHooks(tracker)
        build_start = time.perf_counter()
        job = TrainingJob(spec, candidate, device, hooks=hooks)
        for tensor in job.parameters_and_buffers():
            tracker.track(tensor, "params")
        result["build_s"] = time.perf_counter() - build_start

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        warmup = int(request.get("warmup_steps", 2))
        steps = int(request.get("steps", 3))
        losses: list[float] = []
        times: list[float] = []
        warmup_times: list[float] = []
        steps_run = 0
        with tracker:
            # warm-up: at least `warmup` steps and until the optimizer holds its state (fp16
            # steps skipped by GradScaler on overflow would hide it)
            extra = 0
            fp16 = candidate.precision == "fp16"
            while steps_run < warmup or (fp16 and not job.optimizer_has_state() and extra < 8):
                if steps_run >= warmup:
                    extra += 1
                t0 = time.perf_counter()
                steps_started += 1
                loss = job.run_step()
                sync()
                warmup_times.append(time.perf_counter() - t0)
                steps_run += 1
                losses.append(float(loss))
            sync()
            if device.type == "cuda":
                # the breakdown came from the tracked warm-up; timed steps run untracked
                tracker.__exit__(None, None, None)
            for _ in range(steps):
                t0 = time.perf_counter()
                steps_started += 1
                loss = job.run_step()
                sync()
                times.append(time.perf_counter() - t0)
                steps_run += 1
                losses.append(float(loss))
            if device.type == "cuda":
                tracker.__enter__()
        memory = tracker.breakdown()
        if device.type == "cuda":
            memory.peak_bytes = int(torch.cuda.max_memory_allocated(device))
            memory.reserved_bytes = int(torch.cuda.max_memory_reserved(device))
            result["traced_peak_bytes"] = tracker.peak_bytes
        step_time = statistics.median(times) if times else float("nan")
        samples = candidate.batch_size / step_time if step_time > 0 else 0.0
        units_name, units_per_sample = _units(spec, candidate)
        result.update(
            status="fits",
            memory=memory.to_dict(),
            step_time_s=step_time,
            step_times_s=times,
            warmup_times_s=warmup_times,
            samples_per_s=samples,
            units_name=units_name,
            units_per_s=samples * units_per_sample if units_per_sample else None,
            steps_run=steps_run,
            loss=losses[-1] if losses else None,
            optimizer_state=job.optimizer_has_state(),
            rss_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
        if losses and not all(math.isfinite(v) for v in losses):
            result["warning"] = "loss is NaN/inf in some steps (memory is still measured)"
        if candidate.precision == "fp16" and not job.optimizer_has_state():
            result["warning"] = "; ".join(filter(None, [
                result.get("warning"), "optimizer state never appeared (every fp16 step overflowed)"]))
    except BaseException as exc:  # noqa: BLE001 - a trial's failure is data
        oom, kind = is_oom_error(exc)
        result["steps_run"] = steps_started
        phase = "setup"
        try:
            phase = tracker.phase  # type: ignore[possibly-undefined]
        except NameError:
            pass
        result["phase"] = phase
        if oom:
            result["status"] = "oom"
            result["limit_kind"] = kind if kind != "cuda-allocator" else result.get("limit_kind", kind)
            result["message"] = f"out of memory in {phase}: {str(exc).splitlines()[0][:300]}"
            try:
                result["memory"] = {"peak_bytes": int(tracker.peak_bytes), "peak_phase": phase}  # type: ignore[possibly-undefined]
            except NameError:
                pass
        else:
            from autofit.errors import AutofitError

            result["status"] = "error"
            where = "" if isinstance(exc, AutofitError) else f" in {phase}"
            result["message"] = f"{type(exc).__name__}{where}: {str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ''}"
            result["traceback"] = traceback.format_exc()[-4000:]
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
