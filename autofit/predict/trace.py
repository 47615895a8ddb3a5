"""Trace the shared training step on fake tensors: the predicted memory of one candidate.

A trace builds the model inside ``FakeTensorMode`` (no real memory, so a model far larger
than RAM traces in seconds), runs ``TRACE_STEPS`` full steps of the very step the trials run
(optimizer state appears at the first ``optimizer.step()``) under ``MemoryTracker``, and
returns a ``MemoryEstimate``: the traced breakdown plus the device model's view of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch._subclasses import FakeTensorMode

from autofit.candidate import Candidate
from autofit.choices import Phase
from autofit.errors import AutofitError, BuildError
from autofit.memory import MemoryTracker, ModuleRecord, PhaseHooks
from autofit.predict import cache as trace_cache
from autofit.predict import lazy_dynamo
from autofit.predict.cuda_native import trace_device
from autofit.predict.device_model import DeviceModel
from autofit.predict.estimates import LayerRow, MemoryEstimate  # torch-free; re-exported here
from autofit.spec import ExperimentSpec
from autofit.step import TrainingJob

TRACE_STEPS = 2

lazy_dynamo.defer()  # a trace never compiles: the compiler loads only if something asks for it


def _friendly(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    name = type(exc).__name__
    if "DataDependent" in name or "data-dependent" in text.lower() or "_local_scalar_dense" in text:
        return (f"the step calls .item()/bool() on a tensor or uses a data-dependent shape, which "
                f"a fake-tensor trace cannot follow ({text[:160]}); use a static-shape step")
    return text[:400]


FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"
"""Logs a full traceback for every failing meta kernel; the trace reports it in one line."""


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    logger = logging.getLogger(FAKE_TENSOR_LOGGER)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _shape(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        return str(list(value.shape))
    return None


def _failure_site(exc: BaseException, root: torch.nn.Module | None) -> str:
    """"in module 'head' (Linear), op aten.mm on [1, 32] x [16, 8]" from the traceback: the
    innermost module forward of the model and the innermost dispatched op (its tensor args)."""
    names = {id(m): name for name, m in root.named_modules()} if root is not None else {}
    module = op = None
    tb = exc.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        owner = local.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in names:
            module = owner
        func = local.get("func")
        if isinstance(func, torch._ops.OpOverload) and "args" in local:
            args = local["args"]
            shapes = [s for s in map(_shape, args if isinstance(args, tuple | list) else ())
                      if s is not None]
            op = f"op {func.overloadpacket}" + (f" on {' x '.join(shapes)}" if shapes else "")
        tb = tb.tb_next
    parts = []
    if module is not None:
        name = names[id(module)] or "(the model)"
        parts.append(f"in module {name!r} ({type(module).__name__})")
    if op is not None:
        parts.append(op)
    return ", ".join(parts)


def trace(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel, *,
          steps: int = TRACE_STEPS, per_layer: bool = False, timeline: bool = False,
          corrections: dict[str, int] | None = None) -> tuple[MemoryTracker, int, float]:
    """Run ``steps`` training steps on fake CPU tensors under a tracker.

    Returns the tracker, the parameter count and the wall time. CUDA targets are traced on
    fake CUDA tensors where this torch can (``cuda_native``), else on fake *CPU* tensors (a
    CPU build cannot run fake CUDA backward) with the CUDA optimizer choice (foreach); both
    with 512 B block rounding. ``corrections`` (``aten.op#i`` -> bytes per new
    storage) are a probe calibration's (``predict.calibrate``).
    """
    start = time.perf_counter()
    tracker = MemoryTracker(round_to=model.block_bytes, record_timeline=timeline,
                            corrections=corrections)
    hooks = PhaseHooks(tracker)
    job: TrainingJob | None = None
    try:
        with _quiet_fake_tensor_log(), FakeTensorMode(allow_non_fake_inputs=True):
            job = TrainingJob(spec, candidate, trace_device(model), fake=True, hooks=hooks,
                              target_kind=model.kind)
            for tensor in job.parameters_and_buffers():
                tracker.track(tensor, "params")
            param_count = sum(p.numel() for p in job.model.parameters())
            if per_layer or timeline:
                tracker.attach(job.model)
            try:
                with tracker:
                    for _ in range(steps):
                        job.run_step()
            finally:
                tracker.detach_hooks()
    except AutofitError:
        raise
    except Exception as exc:
        site = _failure_site(exc, job.model if job is not None else None)
        raise BuildError(f"tracing {candidate.label()} failed"
                         + (f" {site}" if site else "") + f": {_friendly(exc)}") from exc
    return tracker, param_count, time.perf_counter() - start


def stretch_events(tracker: MemoryTracker) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Live bytes after each allocation, per ``"<step>:<phase>"`` stretch of a finished
    trace, and per stretch a digest of the ops that made those allocations, in order.

    Every allocation and free took one sequence number, and a phase mark records the number
    at which its stretch began, so one pass over the blocks rebuilds live bytes per event.
    Two traces of one setting at two batch sizes whose digests agree ran the same ops in the
    same order, so their lists pair up event by event (``batch_curve``: each event's live
    bytes are affine in batch where every tensor's size is).
    """
    delta = [0] * (tracker.seq + 2)
    ops: list[str | None] = [None] * (tracker.seq + 2)
    for block in tracker.blocks:
        delta[block.alloc_seq] += block.nbytes
        ops[block.alloc_seq] = block.op
        if block.free_seq is not None:
            delta[block.free_seq] -= block.nbytes
    marks = sorted((seq, f"{step}:{Phase(phase).value}") for seq, phase, step in tracker.phase_marks)
    lives: dict[str, list[int]] = {}
    digests: dict[str, Any] = {}
    name, live, m = "0:setup", 0, 0
    for seq in range(1, tracker.seq + 1):
        while m < len(marks) and marks[m][0] < seq:
            name = marks[m][1]
            m += 1
        live += delta[seq]
        if ops[seq] is not None:
            lives.setdefault(name, []).append(live)
            digest = digests.get(name)
            if digest is None:
                digest = digests[name] = hashlib.blake2b(digest_size=8)
            digest.update(f"{ops[seq]};".encode())
    return lives, {n: d.hexdigest() for n, d in digests.items()}


def segment_peaks(tracker: MemoryTracker) -> dict[str, int]:
    """Peak live bytes of each ``"<step>:<phase>"`` stretch of a finished trace."""
    return {name: max(values) for name, values in stretch_events(tracker)[0].items()}


def estimate(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel, *,
             per_layer: bool = False) -> MemoryEstimate:
    """Predict peak memory of one candidate (fake-tensor trace + device model).

    Inside ``autofit.predict.cache.using(cache)`` the answer comes from the trace cache when
    it holds one (per-layer traces are always run).
    """
    from autofit.parallel import spec_for
    from autofit.predict.calibrate import applied_for  # imports this module

    asked = spec
    spec = spec_for(spec, candidate)  # the candidate's strategy, from a parallel.strategy list
    rank = spec.parallel.strategy != "none"  # one rank of DDP / FSDP2 (keyed by its plan)
    calibration = None if rank else applied_for(spec, candidate, model.kind)
    cache = None if per_layer else trace_cache.active()
    key = cache.key(spec, candidate, model) if cache is not None else ""
    tags = (calibration.digest if calibration else "") + trace_device(model).type
    if cache is not None and tags != "cpu":  # corrected and CUDA-native traces are kept apart
        key = f"{key[:16]}{hashlib.sha256(tags.encode()).hexdigest()[:16]}"
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    ahead = _AHEAD.get()
    est = ahead.take(asked, candidate, model) if ahead is not None and not per_layer else None
    if est is None:
        est = _traced(spec, candidate, model, rank=rank, per_layer=per_layer,
                      calibration=calibration)
    if cache is not None:
        cache.put(key, est)
    return est


def _traced(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel, *, rank: bool,
            per_layer: bool, calibration: Any) -> MemoryEstimate:
    """What ``estimate`` computes on a cache miss (``spec``: the candidate's own)."""
    from autofit.predict.distributed import estimate_rank  # imports this module

    return (estimate_rank(spec, candidate, model) if rank else
            _estimate(spec, candidate, model, per_layer=per_layer, calibration=calibration))


# ------------------------------------------------------------ a trace in a second process
_AHEAD: ContextVar[_Ahead | None] = ContextVar("autofit_trace_ahead", default=None)


@contextlib.contextmanager
def traced_ahead(spec: ExperimentSpec, candidate: Candidate | None,
                 model: DeviceModel) -> Iterator[bool]:
    """Trace ``candidate`` in a process forked from this one while this one goes on.

    Inside the block, ``estimate`` of that very candidate (same spec object and device
    model, not per-layer, not in the trace cache) takes the forked process's answer, waiting
    for it, instead of tracing; it is then stored in the cache as this run's new trace. The
    forked process runs the same code on a copy of this one (same calibration, same torch
    state), so the answer is the one a trace here would give; only ``trace_time_s`` is its
    own. Anything wrong there (an error, no answer in time) and the trace runs here. A
    candidate never asked for is the second core's lost trace: the process is killed on
    leaving the block. Yields whether a process was forked.

    Only where forking this process is safe and gains: Linux, fork allowed
    (``AUTOFIT_START_METHOD``), at least two CPUs, one Python thread, no CUDA initialised,
    fake CPU tensors (the forked process runs no real kernel), a single-process spec, and a
    CPU idle at that moment (``idle_cpu``).
    """
    ahead = _Ahead.fork(spec, candidate, model) if candidate is not None else None
    if ahead is None:
        yield False
        return
    token = _AHEAD.set(ahead)
    try:
        yield True
    finally:
        _AHEAD.reset(token)
        ahead.close()


def _can_fork(spec: ExperimentSpec, model: DeviceModel) -> bool:
    import sys
    import threading

    from autofit.device import usable_cpus
    from autofit.trials.forkserver import fork_enabled

    if not (sys.platform.startswith("linux") and fork_enabled() and usable_cpus() > 1):
        return False
    if spec.parallel.strategies != ("none",) or trace_device(model).type != "cpu":
        return False
    # no other Python thread (one could hold a lock the copy would wait on forever); the
    # native pools (BLAS, OpenMP) are forked over as the trial fork server forks them
    return threading.active_count() == 1 and not torch.cuda.is_initialized()


def idle_cpu(loadavg: str | None = None, cpus: int | None = None) -> bool:
    """Is a CPU idle right now for a second process? More CPUs usable here (affinity, a
    cgroup v2 quota) than tasks running (``/proc/loadavg``'s 4th field, this one included).
    On a machine busy with other work, a forked trace would only take CPU time from this
    process's own traces (measured at load 4-5: the next trace here about 2x slower)."""
    if cpus is None:
        from autofit.device import usable_cpus

        cpus = usable_cpus()
    try:
        if loadavg is None:
            with open("/proc/loadavg") as load_file:
                loadavg = load_file.read()
        running = int(loadavg.split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return False
    return cpus - running >= 1


class _Ahead:
    """One forked trace: its process and the read end of the pipe its answer comes by."""

    def __init__(self, spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
                 pid: int, fd: int, started: float) -> None:
        self.spec, self.candidate, self.model = spec, candidate, model
        self.pid: int | None = pid
        self.fd: int | None = fd
        self.started = started

    @classmethod
    def fork(cls, spec: ExperimentSpec, candidate: Candidate, model: DeviceModel) -> _Ahead | None:
        import os
        import sys

        if not _can_fork(spec, model) or not idle_cpu():
            return None
        for stream in (sys.stdout, sys.stderr):  # nothing buffered here is written twice
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        read, write = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read)
            os.close(write)
            return None
        if pid == 0:  # pragma: no cover - the forked process (coverage does not follow)
            _serve_ahead(read, write, spec, candidate, model)
        os.close(write)
        return cls(spec, candidate, model, pid, read, time.perf_counter())

    def take(self, spec: ExperimentSpec, candidate: Candidate,
             model: DeviceModel) -> MemoryEstimate | None:
        """The forked trace's answer when this is its candidate, else None (trace here)."""
        if self.fd is None or spec is not self.spec or candidate != self.candidate \
                or model != self.model:
            return None
        import json
        import os
        import select

        chunks, fd = [], self.fd
        # as long as a trace here could take, and more: only a stuck process times out
        deadline = time.perf_counter() + max(60.0, 10 * (time.perf_counter() - self.started))
        try:
            while (left := deadline - time.perf_counter()) > 0:
                if not select.select([fd], [], [], left)[0]:
                    break
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError:
            chunks = []
        self.close()
        try:
            est = MemoryEstimate.from_dict(json.loads(b"".join(chunks)))
        except (ValueError, KeyError, TypeError):
            return None  # it failed or ran out of time: trace here (and report any error)
        return est if est.candidate == candidate else None

    def close(self) -> None:
        """Stop the process if it still runs and reap it; close the pipe. Idempotent."""
        import os
        import signal

        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(self.pid, 0)
            self.pid = None
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _serve_ahead(read: int, write: int, spec: ExperimentSpec, candidate: Candidate,
                 model: DeviceModel) -> None:  # pragma: no cover - runs in the forked process
    """The forked process: trace, send ``to_dict(full=True)`` down the pipe, exit (no
    teardown, no atexit: those are the parent's)."""
    import gc
    import json
    import os
    import signal

    code = 1
    try:
        os.close(read)
        gc.freeze()  # the collector leaves the parent's objects alone: fewer pages copied
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # its warnings are the parent's to print
            os.dup2(devnull, fd)
        from autofit.parallel import spec_for
        from autofit.predict.calibrate import applied_for

        own = spec_for(spec, candidate)
        est = _traced(own, candidate, model, rank=False, per_layer=False,
                      calibration=applied_for(own, candidate, model.kind))
        data = memoryview(json.dumps(est.to_dict(full=True)).encode())
        while data:
            data = data[os.write(write, data):]
        code = 0
    finally:
        os._exit(code)


def _estimate(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel, *,
              per_layer: bool, calibration: Any = None) -> MemoryEstimate:
    from autofit.predict.calibrate import known_misreporting

    tracker, params, seconds = trace(spec, candidate, model, per_layer=per_layer,
                                     corrections=calibration.corrections if calibration else None)
    breakdown = tracker.breakdown()
    residual = calibration.residual_bytes if calibration else 0  # what no op explained
    breakdown.temporaries_bytes += residual
    breakdown.peak_bytes += residual
    traced = breakdown.peak_bytes
    reserved = model.reserved(traced, tracker.uses_blas)
    if calibration is not None and calibration.reserve_ratio and model.kind == "cuda":
        reserved = calibration.reserved(model.allocated(traced, tracker.uses_blas), model)
    breakdown.reserved_bytes = reserved if model.kind == "cuda" else None
    layers = _layer_rows(tracker.modules) if per_layer else []
    lives, ops = stretch_events(tracker)
    return MemoryEstimate(
        candidate=candidate, breakdown=breakdown, device_kind=model.kind,
        allocated_bytes=model.allocated(traced, tracker.uses_blas), reserved_bytes=reserved,
        trace_time_s=seconds, param_count=params, layers=layers, uses_blas=tracker.uses_blas,
        segment_peaks={k: max(v) + residual for k, v in lives.items()},
        stretch_lives={k: [x + residual for x in v] for k, v in lives.items()},
        stretch_ops=ops,
        misreporting=known_misreporting(tracker.op_log, spec, model.kind),
    )


def _layer_rows(modules: dict[str, ModuleRecord]) -> list[LayerRow]:
    rows, total = [], 0
    for record in modules.values():
        if record.params_bytes == 0 and record.saved_bytes == 0:
            continue
        total += record.params_bytes + record.saved_bytes
        rows.append(LayerRow(record.name, record.kind, record.params_bytes, record.saved_bytes, total))
    return rows
