"""Where the memory of one training step goes, and what each knob would save.

``profile_step`` follows live tensor bytes through the shared training step (data, forward
per module, backward, optimizer, zero_grad) with the same ``MemoryTracker`` the predictor and
the trials use: on fake tensors by default (``autofit.predict.trace``: instant, no GPU), or on
real tensors with ``real=True``. It returns the timeline, the phase spans, what each module
allocated in its forward and kept for backward, the largest tensors alive at the peak and the
totals per category.

``what_if`` answers "what would X save" by re-tracing the step with one knob changed
(checkpoint segments, bf16/fp16, half the input size, half the batch, inplace activations,
SGD instead of Adam) through ``autofit.predict.estimate``; no rule of thumb is involved.
"""

from __future__ import annotations

import bisect
import dataclasses
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autofit.candidate import Candidate
from autofit.device import cpu_name, cuda_device, cuda_peaks, prepare_cuda, resolve_device
from autofit.errors import AutofitError, BuildError, TrialError
from autofit.memory import MemoryBreakdown, MemoryTracker, PhaseHooks, TimelinePoint
from autofit.predict.device_model import DeviceModel
from autofit.spec import ExperimentSpec, ModelSpec, OptimizerSpec
from autofit.trials.oom import is_oom_error

MAX_TIMELINE_POINTS = 2000
TOP_TENSORS = 20
OUTSIDE = "(outside modules)"
"""Module label of allocations made outside any module's forward (loss, data, optimizer)."""

# --------------------------------------------------------------------------- the profile


@dataclass
class PhaseSpan:
    """One phase of one step on the timeline's sequence axis: events in (start_seq, end_seq]."""

    phase: str
    step: int
    start_seq: int
    end_seq: int
    start_bytes: int = 0
    """Live bytes when the phase began."""
    end_bytes: int = 0
    """Live bytes when the phase ended."""
    max_bytes: int = 0
    """Highest live bytes inside the phase."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ModuleRow:
    """What one module's own forward code allocated in step 1 (innermost-module attribution)."""

    module: str
    kind: str
    params_bytes: int
    allocated_bytes: int
    """Bytes allocated while this module was the innermost running one (step 1 forward)."""
    saved_bytes: int
    """Of those, still alive when forward ended: kept for backward."""
    tensors: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TensorRow:
    """One storage alive at the peak moment."""

    shape: tuple[int, ...]
    dtype: str
    bytes: int
    module: str
    """Innermost module running when it was allocated ("" outside any module)."""
    phase: str
    """Phase in which it was allocated."""
    step: int
    category: str

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["shape"] = list(self.shape)
        return data


@dataclass
class Profile:
    """Live memory through the training step of one candidate."""

    candidate: Candidate
    breakdown: MemoryBreakdown
    """Categories alive at the (traced) peak."""
    peak_bytes: int
    """The number planned against the budget, as ``estimate`` reports it (CUDA: reserved)."""
    traced_peak_bytes: int
    """Highest live tensor bytes on the timeline (== peak_bytes on CPU)."""
    peak_seq: int
    timeline: list[TimelinePoint]
    """Live bytes after each allocation/free, downsampled to <= MAX_TIMELINE_POINTS
    (min and max of each bucket are kept, so the peak is always on it)."""
    timeline_events: int
    """Number of allocation/free events before downsampling."""
    phases: list[PhaseSpan]
    modules: list[ModuleRow]
    top_tensors: list[TensorRow]
    device_kind: str
    real: bool
    steps: int
    param_count: int
    seconds: float
    allocated_bytes: int
    """CUDA: max_memory_allocated (measured with --real, else modelled); CPU: the peak."""
    reserved_bytes: int
    """CUDA: max_memory_reserved (measured with --real, else modelled); CPU: the peak."""
    device_name: str = ""
    notes: list[str] = field(default_factory=list)
    per_rank: dict[str, Any] = field(default_factory=dict)
    """ddp/fsdp (``predict.distributed.profile_rank``): strategy, world_size, peak_bytes and
    rank_bytes of the one rank profiled; empty for a single process."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "real": self.real,
            "device_kind": self.device_kind,
            "device_name": self.device_name,
            "steps": self.steps,
            "param_count": self.param_count,
            "seconds": round(self.seconds, 4),
            "peak_bytes": self.peak_bytes,
            "traced_peak_bytes": self.traced_peak_bytes,
            "allocated_bytes": self.allocated_bytes,
            "reserved_bytes": self.reserved_bytes,
            "peak_seq": self.peak_seq,
            "peak_phase": self.breakdown.peak_phase,
            "peak_step": self.breakdown.peak_step,
            "breakdown": self.breakdown.to_dict(),
            "categories": self.breakdown.categories(),
            "phases": [p.to_dict() for p in self.phases],
            "modules": [m.to_dict() for m in self.modules],
            "top_tensors": [t.to_dict() for t in self.top_tensors],
            "timeline_events": self.timeline_events,
            "timeline": {
                "seq": [p.seq for p in self.timeline],
                "live_bytes": [p.live_bytes for p in self.timeline],
                "phase": [p.phase for p in self.timeline],
                "step": [p.step for p in self.timeline],
            },
            "notes": list(self.notes),
            **({"per_rank": dict(self.per_rank)} if self.per_rank else {}),
        }


def downsample(points: list[TimelinePoint], max_points: int = MAX_TIMELINE_POINTS
               ) -> list[TimelinePoint]:
    """At most ``max_points`` points keeping each bucket's min and max (the envelope), the
    first and the last point; the global peak is a bucket max, so it is always kept."""
    if len(points) <= max_points:
        return list(points)
    buckets = max(1, (max_points - 2) // 2)
    size = -(-len(points) // buckets)
    keep: set[int] = {0, len(points) - 1}
    for start in range(0, len(points), size):
        idx = range(start, min(start + size, len(points)))
        keep.add(min(idx, key=lambda i: points[i].live_bytes))
        keep.add(max(idx, key=lambda i: points[i].live_bytes))
    return [points[i] for i in sorted(keep)]


def _end_of_run(tracker: MemoryTracker) -> int:
    """The sequence number at which the last step ended.

    ``predict.trace`` returns after its job was dropped, so the tracker also saw the teardown
    (parameters and optimizer state freed). zero_grad never frees those, so the first such
    free after the last phase mark is where the teardown began.
    """
    last_mark = tracker.phase_marks[-1][0] if tracker.phase_marks else 0
    teardown = [b.free_seq for b in tracker.blocks
                if b.free_seq is not None and b.free_seq > last_mark
                and b.category in ("params", "optimizer_state")]
    return min(teardown) - 1 if teardown else tracker.seq


def _phase_spans(tracker: MemoryTracker, points: list[TimelinePoint], end_seq: int
                 ) -> list[PhaseSpan]:
    seqs = [p.seq for p in points]

    def live_at(seq: int) -> int:
        i = bisect.bisect_right(seqs, seq)
        return points[i - 1].live_bytes if i else 0

    marks = list(tracker.phase_marks)
    if not marks or marks[0][0] > 0:
        marks.insert(0, (0, "setup", 0))
    spans = []
    for i, (start, phase, step) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else end_seq
        lo, hi = bisect.bisect_right(seqs, start), bisect.bisect_right(seqs, end)
        inside = [p.live_bytes for p in points[lo:hi]]
        first = live_at(start)
        spans.append(PhaseSpan(phase, step, start, end, first, live_at(end),
                               max([first, *inside])))
    return spans


def _module_rows(tracker: MemoryTracker) -> list[ModuleRow]:
    allocated: dict[str, int] = {}
    counts: dict[str, int] = {}
    saved_outside = 0
    for block in tracker.blocks:
        if block.phase != "forward" or block.step != 1:
            continue
        name = block.module or OUTSIDE
        allocated[name] = allocated.get(name, 0) + block.nbytes
        counts[name] = counts.get(name, 0) + 1
        if name == OUTSIDE and block.category == "activations":
            saved_outside += block.nbytes
    rows = []
    for name, record in tracker.modules.items():
        if record.params_bytes or allocated.get(name) or record.saved_bytes:
            rows.append(ModuleRow(name, record.kind, record.params_bytes, allocated.get(name, 0),
                                  record.saved_bytes, counts.get(name, 0)))
    if allocated.get(OUTSIDE):
        rows.append(ModuleRow(OUTSIDE, "loss and glue", 0, allocated[OUTSIDE], saved_outside,
                              counts[OUTSIDE]))
    return rows


def _tensor_rows(tracker: MemoryTracker, limit: int) -> list[TensorRow]:
    return [TensorRow(tuple(b.shape), b.dtype, b.nbytes,
                      b.module or (OUTSIDE if b.phase == "forward" else ""), b.phase, b.step,
                      b.category or "temporaries")
            for b in tracker.tensors_at_peak(limit)]


def _assemble(tracker: MemoryTracker, candidate: Candidate, device_model: DeviceModel, *,
              real: bool, steps: int, param_count: int, seconds: float, end_seq: int,
              top: int, allocated: int | None = None, reserved: int | None = None,
              device_name: str = "") -> Profile:
    points = [p for p in tracker.timeline if p.seq <= end_seq]
    breakdown = tracker.breakdown()
    traced = tracker.peak_bytes
    if allocated is None:
        allocated = device_model.allocated(traced, tracker.uses_blas)
    if reserved is None:
        reserved = device_model.reserved(traced, tracker.uses_blas)
    if device_model.kind == "cuda":
        breakdown.reserved_bytes = reserved
    notes = []
    if device_model.kind == "cuda":
        notes.append("the timeline counts live tensor bytes (512 B blocks); peak_bytes adds the "
                     "allocator's workspace, fragmentation and segment rounding"
                     + (" as measured" if real else " from the device model"))
    return Profile(
        candidate=candidate, breakdown=breakdown, peak_bytes=reserved, traced_peak_bytes=traced,
        peak_seq=tracker.peak_seq, timeline=downsample(points), timeline_events=len(points),
        phases=_phase_spans(tracker, points, end_seq), modules=_module_rows(tracker),
        top_tensors=_tensor_rows(tracker, top), device_kind=device_model.kind, real=real,
        steps=steps, param_count=param_count, seconds=seconds, allocated_bytes=allocated,
        reserved_bytes=reserved, device_name=device_name, notes=notes,
    )


def profile_step(spec: ExperimentSpec, candidate: Candidate, device_model: DeviceModel, *,
                 real: bool = False, steps: int = 2, device: str | None = None,
                 top: int = TOP_TENSORS) -> Profile:
    """Follow live memory through ``steps`` training steps of ``candidate``.

    Fake tensors by default (the very trace ``estimate`` makes, so the peaks agree). With
    ``real=True`` the same ``TrainingJob`` runs on real tensors in this process: on CUDA when
    ``device_model`` is the CUDA model (``device``: which one, default the spec's), else on
    CPU. Raises ``AutofitError`` for build errors and for a real run that runs out of memory.
    """
    if steps < 1:
        raise AutofitError(f"steps must be >= 1, got {steps}")
    if real and spec.parallel.strategy != "none":
        raise AutofitError(f"--real profiles one process, not a rank of parallel.strategy "
                           f"{spec.parallel.strategy}: drop --real for the per-rank profile "
                           f"(any world size); real ranks run in `autofit tune`'s trials")
    if not real and spec.parallel.strategy != "none":  # one rank of DDP / FSDP2, any N
        from autofit.predict.distributed import profile_rank

        return profile_rank(spec, candidate, device_model, steps=steps, top=top)
    if not real:
        from autofit.predict.calibrate import applied_for
        from autofit.predict.trace import trace

        applied = applied_for(spec, candidate, device_model.kind)  # a probe calibration in use
        tracker, params, seconds = trace(spec, candidate, device_model, steps=steps,
                                         per_layer=True, timeline=True,
                                         corrections=applied.corrections if applied else None)
        if applied is None:
            return _assemble(tracker, candidate, device_model, real=False, steps=steps,
                             param_count=params, seconds=seconds, end_seq=_end_of_run(tracker),
                             top=top)
        return _calibrated(tracker, candidate, device_model, applied, steps=steps,
                           param_count=params, seconds=seconds, top=top)
    return _profile_real(spec, candidate, device_model, steps=steps, device=device, top=top)


def _calibrated(tracker: MemoryTracker, candidate: Candidate, device_model: DeviceModel,
                applied: Any, *, steps: int, param_count: int, seconds: float,
                top: int) -> Profile:
    """A fake-tensor profile under a probe calibration (``predict.calibrate.Applied``): the
    op corrections are in the timeline (the trace added them to each storage), the residual
    no op explains is added to the peak as ``estimate`` adds it."""
    residual = applied.residual_bytes
    planned = tracker.peak_bytes + residual
    allocated = device_model.allocated(planned, tracker.uses_blas)
    reserved = device_model.reserved(planned, tracker.uses_blas)
    if applied.reserve_ratio and device_model.kind == "cuda":
        reserved = applied.reserved(allocated, device_model)
    prof = _assemble(tracker, candidate, device_model, real=False, steps=steps,
                     param_count=param_count, seconds=seconds, end_seq=_end_of_run(tracker),
                     top=top, allocated=allocated, reserved=reserved)
    prof.breakdown.temporaries_bytes += residual
    prof.breakdown.peak_bytes += residual
    if applied.corrections:
        ops = ", ".join(f"{op} {nbytes / 1e6:+.2f} MB per call"
                        for op, nbytes in sorted(applied.corrections.items()))
        prof.notes.append(f"trace corrected by the probe calibration: {ops} (in the timeline)")
    if residual:
        what = "the CPU allocator's scratch (cpu_limit: rlimit)" if applied.scratch_bytes \
            else "the probe's unexplained residual"
        prof.notes.append(f"peak includes {residual / 1e6:+.2f} MB of {what}, which no op "
                          "makes: not on the timeline")
    return prof


def _real_device(spec: ExperimentSpec, device_model: DeviceModel, device: str | None
                 ) -> tuple[torch.device, str]:
    """The device ``--real`` measures on, set up as a trial sets it up (no memory cap)."""
    if device_model.kind != "cuda":
        return torch.device("cpu"), cpu_name()
    name = device or resolve_device(spec.device)
    name = name if name.startswith("cuda") else "cuda"
    if not torch.cuda.is_available():
        raise AutofitError(f"--real: device {name!r} but CUDA is not available here "
                           f"(profile on CPU with --device cpu, or drop --real)")
    dev = cuda_device(name)
    prepare_cuda(dev)
    return dev, torch.cuda.get_device_properties(dev).name


def _run_real_steps(job: Any, tracker: MemoryTracker, candidate: Candidate, steps: int) -> None:
    try:
        with tracker:
            for _ in range(steps):
                job.run_step()
    except AutofitError:
        raise
    except Exception as exc:
        oom, _ = is_oom_error(exc)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        if oom:
            raise TrialError(
                f"--real: {candidate.label()} ran out of memory in {tracker.phase} of step "
                f"{tracker.step} ({first}); drop --real to see the predicted profile"
            ) from exc
        raise TrialError(f"--real: the step raised {type(exc).__name__} in {tracker.phase}: "
                         f"{first}") from exc
    finally:
        tracker.detach_hooks()


def _profile_real(spec: ExperimentSpec, candidate: Candidate, device_model: DeviceModel, *,
                  steps: int, device: str | None, top: int) -> Profile:
    from autofit.step import TrainingJob

    dev, device_name = _real_device(spec, device_model, device)
    start = time.perf_counter()
    tracker = MemoryTracker(round_to=device_model.block_bytes, record_timeline=True)
    job: Any = None
    try:
        try:
            job = TrainingJob(spec, candidate, dev, hooks=PhaseHooks(tracker))
        except AutofitError:
            raise
        except Exception as exc:
            raise BuildError(f"building {candidate.label()} failed: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
        for tensor in job.parameters_and_buffers():
            tracker.track(tensor, "params")
        param_count = sum(p.numel() for p in job.model.parameters())
        tracker.attach(job.model)
        _run_real_steps(job, tracker, candidate, steps)
        # as the trials count them: the process's peaks (a fresh CLI process holds nothing
        # else; in a longer-lived process, tensors it already holds are included)
        allocated, reserved = cuda_peaks(dev) if dev.type == "cuda" else (None, None)
        return _assemble(tracker, candidate, device_model, real=True, steps=steps,
                         param_count=param_count, seconds=time.perf_counter() - start,
                         end_seq=tracker.seq, top=top, allocated=allocated, reserved=reserved,
                         device_name=device_name)
    finally:
        del job
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- what-if


@dataclass
class WhatIf:
    """One knob turned, re-traced: its predicted peak and the saving against the baseline."""

    knob: str
    """Stable id: checkpoint_segments=2, precision=bf16, input_size/2, batch_size/2, ..."""
    change: str
    """Human-readable: "checkpoint_segments 0 -> 2"."""
    candidate: Candidate
    baseline_peak_bytes: int
    predicted_peak_bytes: int | None = None
    saving_bytes: int | None = None
    saving_pct: float | None = None
    breakdown: MemoryBreakdown | None = None
    reason: str = ""
    """Why the knob does not apply ("n/a: ...") or failed to trace; empty when it applies."""

    @property
    def applicable(self) -> bool:
        return self.predicted_peak_bytes is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "knob": self.knob,
            "change": self.change,
            "candidate": self.candidate.to_dict(),
            "applicable": self.applicable,
            "baseline_peak_bytes": self.baseline_peak_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "saving_bytes": self.saving_bytes,
            "saving_pct": None if self.saving_pct is None else round(self.saving_pct, 2),
            "breakdown": self.breakdown.to_dict() if self.breakdown else None,
            "reason": self.reason,
        }


INPLACE_SKIP = (nn.modules.dropout._DropoutNd,)
"""Modules with an ``inplace`` flag that are not activations (dropout changes semantics)."""


def _inplace_candidates(model: nn.Module) -> list[nn.Module]:
    """Activation modules that have an ``inplace`` option and do not use it."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "inplace", None), bool) and not m.inplace
            and not isinstance(m, INPLACE_SKIP)]


def inplace_activations(_autofit_target: str, _autofit_kwargs: dict[str, Any]) -> nn.Module:
    """Model factory used by the inplace what-if: the user's model with ``inplace=True`` set
    on every activation module that has the option (ReLU, LeakyReLU, SiLU, Hardtanh, ...)."""
    from autofit.build import import_object

    model = import_object(_autofit_target, "model")(**_autofit_kwargs)
    for module in _inplace_candidates(model):
        setattr(module, "inplace", True)  # noqa: B010
    return model


def _factory_inplace_kwarg(spec: ExperimentSpec) -> bool | None:
    """The value the model factory's ``inplace`` argument takes, None if it has none."""
    from autofit.build import import_object

    try:
        params = inspect.signature(import_object(spec.model.target, "model")).parameters
    except (TypeError, ValueError, AutofitError):
        return None
    if "inplace" not in params:
        return None
    if "inplace" in spec.model.kwargs:
        return bool(spec.model.kwargs["inplace"])
    default = params["inplace"].default
    return bool(default) if default is not inspect.Parameter.empty else None


def _count_inplace_candidates(spec: ExperimentSpec, candidate: Candidate) -> tuple[int, list[str]]:
    from torch._subclasses import FakeTensorMode

    from autofit.build import build_model
    from autofit.predict import lazy_dynamo

    lazy_dynamo.defer()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(spec, candidate.input_size)
    found = _inplace_candidates(model)
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if type(m).__module__.startswith("torch.nn.modules.activation")})
    return len(found), kinds


def _inplace_spec(spec: ExperimentSpec, candidate: Candidate) -> tuple[ExperimentSpec | None, str]:
    """A spec whose model uses inplace activations, or (None, why not)."""
    flag = _factory_inplace_kwarg(spec)
    if flag is False:
        kwargs = {**spec.model.kwargs, "inplace": True}
        return (dataclasses.replace(spec, model=dataclasses.replace(spec.model, kwargs=kwargs)),
                "model inplace=False -> True")
    try:
        count, kinds = _count_inplace_candidates(spec, candidate)
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        return None, f"n/a: building the model failed ({type(exc).__name__}: {str(exc)[:120]})"
    if count == 0:
        if flag:
            return None, "n/a: activations are already inplace (inplace=True)"
        have = f" ({', '.join(kinds)} only)" if kinds else ""
        return None, f"n/a: no activation module with an inplace option is off{have}"
    wrapped = ModelSpec(
        target=f"{__name__}.inplace_activations",
        kwargs={"_autofit_target": spec.model.target, "_autofit_kwargs": dict(spec.model.kwargs)},
        blocks=spec.model.blocks,
    )
    return dataclasses.replace(spec, model=wrapped), f"{count} activation module(s) inplace=True"


def what_if(spec: ExperimentSpec, candidate: Candidate, device_model: DeviceModel, *,
            baseline: int | None = None,
            on_knob: Callable[[WhatIf], None] | None = None) -> list[WhatIf]:
    """Re-trace the step with one knob changed at a time; predicted peak and saving of each.

    Knobs: checkpoint segments 2/4/8, bf16, fp16, half the input size, half the batch,
    inplace activations, SGD (no momentum, no state) instead of the spec's optimizer. Knobs
    that do not apply get ``reason`` "n/a: ..." and no peak. ``baseline`` (planned peak of
    ``candidate``) saves one trace when the caller has it.
    """
    from autofit.predict.trace import estimate

    if baseline is None:
        baseline = estimate(spec, candidate, device_model).peak_bytes
    results: list[WhatIf] = []
    for knob, change, cand, knob_spec, na in _knobs(spec, candidate, device_model):
        item = WhatIf(knob=knob, change=change, candidate=cand, baseline_peak_bytes=baseline)
        if na:
            item.reason = na
        else:
            _trace_knob(item, knob_spec or spec, device_model)
        results.append(item)
        if on_knob is not None:
            on_knob(item)
    return results


def _trace_knob(item: WhatIf, spec: ExperimentSpec, device_model: DeviceModel) -> None:
    """Fill ``item`` from a trace of its candidate (or why it could not be traced)."""
    from autofit.predict.trace import estimate

    base = item.baseline_peak_bytes
    try:
        est = estimate(spec, item.candidate, device_model)
    except AutofitError as exc:
        text = " ".join(exc.problems) if exc.problems else str(exc)
        structural = item.knob.startswith("checkpoint") and isinstance(exc, BuildError) and (
            "exceeds" in text or "needs an nn.Sequential" in text)
        item.reason = f"n/a: {text[:240]}" if structural else f"trace failed: {text[:240]}"
        return
    item.predicted_peak_bytes = est.peak_bytes
    item.saving_bytes = base - est.peak_bytes
    item.saving_pct = 100.0 * item.saving_bytes / base if base else 0.0
    item.breakdown = est.breakdown


_Knob = tuple[str, str, Candidate, "ExperimentSpec | None", str]


def _knobs(spec: ExperimentSpec, candidate: Candidate, device_model: DeviceModel) -> list[_Knob]:
    """(knob, change, candidate, spec override, n/a reason) for every what-if row."""
    knobs: list[_Knob] = []

    def run(knob: str, change: str, cand: Candidate, s: ExperimentSpec | None = None,
            na: str = "") -> None:
        knobs.append((knob, change, cand, s, na))

    c = candidate
    seg = c.checkpoint_segments
    for k in (2, 4, 8):
        new = dataclasses.replace(c, checkpoint_segments=k)
        change = f"checkpoint_segments {seg} -> {k}"
        run(f"checkpoint_segments={k}", change, new,
            na="n/a: the current setting" if seg == k else "")

    bf16_na = ""
    if c.precision == "bf16":
        bf16_na = "n/a: the current precision"
    elif (device_model.kind == "cuda" and torch.cuda.is_available()
          and not torch.cuda.is_bf16_supported()):
        bf16_na = "n/a: this GPU has no bf16"
    for precision, na in (("bf16", bf16_na),
                          ("fp16", "n/a: the current precision" if c.precision == "fp16" else "")):
        run(f"precision={precision}", f"precision {c.precision} -> {precision}",
            dataclasses.replace(c, precision=precision), na=na)

    size_na = ""
    if spec.data.kind not in ("image", "tokens"):
        size_na = f"n/a: data.kind {spec.data.kind} has no size axis"
    elif c.input_size < 2:
        size_na = f"n/a: input size {c.input_size} cannot be halved"
    half = max(1, c.input_size // 2)
    run("input_size/2", f"input_size {c.input_size} -> {half}" if not size_na else "input_size / 2",
        dataclasses.replace(c, input_size=half), na=size_na)

    run("batch_size/2", f"batch_size {c.batch_size} -> {max(1, c.batch_size // 2)}",
        c.with_batch(max(1, c.batch_size // 2)),
        na="n/a: batch size 1 cannot be halved" if c.batch_size < 2 else "")

    if spec.step and "." in spec.step:
        inplace_spec, note = None, "n/a: a user step builds its own computation"
    else:
        inplace_spec, note = _inplace_spec(spec, c)
    run("inplace_activations", note if inplace_spec is not None else "activations inplace=True",
        c, inplace_spec, na="" if inplace_spec is not None else note)

    current = spec.optimizer.target
    short = current.rsplit(".", 1)[-1]
    sgd = OptimizerSpec(target="torch.optim.SGD", kwargs={"lr": 0.01})
    sgd_na = ""
    if short == "SGD" and not spec.optimizer.kwargs.get("momentum"):
        sgd_na = "n/a: already plain SGD (no optimizer state)"
    run("optimizer=SGD", f"optimizer {short} -> SGD (no momentum, no state)", c,
        dataclasses.replace(spec, optimizer=sgd), na=sgd_na)
    return knobs

