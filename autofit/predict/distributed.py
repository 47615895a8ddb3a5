"""Per-rank prediction for data-parallel jobs (``parallel.strategy: ddp | fsdp``).

* fsdp: the step is traced on one rank of a fake process group of the world size, with
  ``fully_shard`` on each block then the root (``autofit.parallel``), under a tracker that
  follows ``UntypedStorage.resize_``. The peak is read from the second step on.
* ddp: the single-process step is traced and replayed with DDP's gradient buckets alive
  throughout (``gradient_as_bucket_view``: the gradients live in them instead).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch._subclasses import FakeTensorMode

from autofit.candidate import Candidate
from autofit.choices import Category, Phase
from autofit.errors import AutofitError, BuildError
from autofit.memory import MemoryBreakdown, MemoryTracker, PhaseHooks
from autofit.parallel import (
    MEASURE_FROM_STEP,
    RankPlan,
    breakdown_at,
    ddp_bucket_bytes,
    fake_process_group,
    fsdp_wrapper,
    local_tensor,
    rank_tracker,
    replay_peak,
    track_resizes,
)
from autofit.predict.device_model import DeviceModel
from autofit.predict.trace import (
    TRACE_STEPS,
    MemoryEstimate,
    _failure_site,
    _friendly,
    _quiet_fake_tensor_log,
    segment_peaks,
)
from autofit.spec import ExperimentSpec
from autofit.step import TrainingJob


@dataclass
class RankEstimate(MemoryEstimate):
    """A ``MemoryEstimate`` of one rank of a data-parallel job."""

    strategy: str = "none"
    world_size: int = 1
    rank_bytes: dict[str, int] = field(default_factory=dict)
    """Per-rank extras: ``ddp_buckets``, ``unsharded_params`` (FSDP all-gathered parameters
    alive at the peak), ``sharded_params``."""

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        data = super().to_dict(full)
        data.update(strategy=self.strategy, world_size=self.world_size,
                    rank_bytes=dict(self.rank_bytes))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankEstimate:
        """From ``to_dict(full=True)`` (the trace cache)."""
        base = MemoryEstimate.from_dict(data)
        return cls(**{f: getattr(base, f) for f in base.__dataclass_fields__},
                   strategy=str(data["strategy"]), world_size=int(data["world_size"]),
                   rank_bytes={k: int(v) for k, v in (data.get("rank_bytes") or {}).items()})


def _job(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel, hooks: PhaseHooks,
         wrap: Any) -> TrainingJob:
    return TrainingJob(spec, candidate, torch.device("cpu"), fake=True, hooks=hooks,
                       target_kind=model.kind, wrap=wrap)


def trace_rank(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
               plan: RankPlan, *, steps: int = TRACE_STEPS, timeline: bool = False
               ) -> tuple[MemoryTracker, int, int, float]:
    """Trace one rank's step on fake tensors: (tracker, parameter count, DDP bucket bytes,
    seconds). ``timeline``: record it, with the modules' forward attributed (``profile``)."""
    start = time.perf_counter()
    tracker = rank_tracker(round_to=model.block_bytes, record_timeline=timeline)
    hooks = PhaseHooks(tracker)
    job: TrainingJob | None = None
    buckets = 0
    try:
        with _quiet_fake_tensor_log():
            if plan.strategy == "fsdp":
                with fake_process_group(plan.world_size) as mesh, \
                        FakeTensorMode(allow_non_fake_inputs=True):
                    job = _job(spec, candidate, model, hooks, fsdp_wrapper(plan, spec, mesh))
                    params = _run(job, tracker, steps, timeline)
            else:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    job = _job(spec, candidate, model, hooks, None)
                    buckets = ddp_bucket_bytes(job.model) if plan.strategy == "ddp" else 0
                    params = _run(job, tracker, steps, timeline)
    except AutofitError:
        raise
    except Exception as exc:
        site = _failure_site(exc, job.model if job is not None else None)
        raise BuildError(f"tracing {candidate.label()} on {plan.label()} failed"
                         + (f" {site}" if site else "") + f": {_friendly(exc)}") from exc
    return tracker, params, buckets, time.perf_counter() - start


def _run(job: TrainingJob, tracker: MemoryTracker, steps: int, modules: bool = False) -> int:
    for tensor in job.parameters_and_buffers():
        tracker.track(local_tensor(tensor), Category.PARAMS)
    if modules:
        tracker.attach(job.model)
    try:
        with track_resizes(tracker), tracker:
            for _ in range(steps):
                job.run_step()
                _tag_locals(job, tracker)
    finally:
        tracker.detach_hooks()
    return sum(p.numel() for p in job.model.parameters())


def _tag_locals(job: TrainingJob, tracker: MemoryTracker) -> None:
    """Categorise DTensor gradients and optimizer state by their local shards."""
    grads = [local_tensor(p.grad) for p in job.model.parameters() if p.grad is not None]
    tracker.tag(grads, Category.GRADS)
    for optimizer in job.optimizers:
        tracker.tag([local_tensor(v) for s in optimizer.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor)], Category.OPTIMIZER_STATE)


def rank_peak(tracker: MemoryTracker, plan: RankPlan, buckets: int = 0
              ) -> tuple[MemoryBreakdown, dict[str, int]]:
    """The per-rank peak breakdown from step ``MEASURE_FROM_STEP`` on, with the DDP bucket
    model applied; and the per-rank extras."""
    drop = Category.GRADS if plan.strategy == "ddp" and plan.gradient_as_bucket_view else None
    extra = buckets if plan.strategy == "ddp" else 0
    peak, seq = replay_peak(tracker, from_step=MEASURE_FROM_STEP, extra_bytes=extra, drop=drop)
    cats = breakdown_at(tracker, seq, drop=drop)
    rank: dict[str, int] = {}
    if plan.strategy == "ddp":
        rank["ddp_buckets"] = buckets
        cats[Category.GRADS.value] += buckets  # the buckets hold gradients
    phase, step = _phase_at(tracker, seq)
    breakdown = MemoryBreakdown(
        params_bytes=cats[Category.PARAMS.value], grads_bytes=cats[Category.GRADS.value],
        optimizer_state_bytes=cats[Category.OPTIMIZER_STATE.value],
        activations_bytes=cats[Category.ACTIVATIONS.value],
        temporaries_bytes=cats[Category.TEMPORARIES.value],
        peak_bytes=peak, peak_phase=phase, peak_step=step)
    if plan.strategy == "fsdp":
        live = tracker.live_at(seq)
        resized: set[int] = getattr(tracker, "resized_seqs", set())
        rank["unsharded_params"] = sum(b.nbytes for b in live if b.alloc_seq in resized)
        rank["sharded_params"] = breakdown.params_bytes - rank["unsharded_params"]
    return breakdown, rank


def profile_rank(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel, *,
                 steps: int = TRACE_STEPS, top: int = 20) -> Any:
    """``autofit profile`` of one rank of the spec's ddp/fsdp plan, for any world size: the
    timeline, phases, modules and tensors of one rank traced on a fake process group (fsdp)
    or on one process (ddp), with the peak and its breakdown read as ``estimate_rank`` reads
    them (from step ``MEASURE_FROM_STEP`` on, DDP's buckets added); ``Profile.per_rank``
    holds the strategy, world size and per-rank extras."""
    from autofit.predict.profile import _assemble, _end_of_run

    plan = RankPlan.from_spec(spec)
    steps = max(steps, MEASURE_FROM_STEP)
    tracker, params, buckets, seconds = trace_rank(spec, candidate, model, plan, steps=steps,
                                                   timeline=True)
    breakdown, rank = rank_peak(tracker, plan, buckets)
    drop = Category.GRADS if plan.strategy == "ddp" and plan.gradient_as_bucket_view else None
    tracker.peak_bytes, tracker.peak_seq = replay_peak(tracker, from_step=MEASURE_FROM_STEP,
                                                       drop=drop)
    traced = breakdown.peak_bytes
    reserved = model.reserved(traced, tracker.uses_blas)
    prof = _assemble(tracker, candidate, model, real=False, steps=steps, param_count=params,
                     seconds=seconds, end_seq=_end_of_run(tracker), top=top,
                     allocated=model.allocated(traced, tracker.uses_blas), reserved=reserved)
    breakdown.reserved_bytes = reserved if model.kind == "cuda" else None
    prof.breakdown = breakdown
    prof.per_rank = {"strategy": plan.strategy, "world_size": plan.world_size,
                     "peak_bytes": reserved, "rank_bytes": rank}
    prof.notes.append(
        f"one rank of {plan.strategy} over {plan.world_size} ranks"
        + (" (traced on a fake process group)" if plan.strategy == "fsdp" else "")
        + f"; its peak is read from step {MEASURE_FROM_STEP} on"
        + (f"; DDP's gradient buckets ({rank['ddp_buckets']:,} bytes) are alive throughout "
           "and not on the timeline" if plan.strategy == "ddp" else ""))
    return prof


def _phase_at(tracker: MemoryTracker, seq: int) -> tuple[Phase | None, int]:
    phase, step = None, 0
    for mark_seq, mark_phase, mark_step in sorted(tracker.phase_marks, key=lambda m: m[0]):
        if mark_seq >= seq:
            break
        phase, step = Phase(mark_phase), mark_step
    return phase, step


def estimate_rank(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
                  plan: RankPlan | None = None) -> RankEstimate:
    """Predicted peak of one rank of ``plan`` (default: the spec's strategy and world size)."""
    plan = plan or RankPlan.from_spec(spec)
    tracker, params, buckets, seconds = trace_rank(spec, candidate, model, plan)
    breakdown, rank = rank_peak(tracker, plan, buckets)
    traced = breakdown.peak_bytes
    reserved = model.reserved(traced, tracker.uses_blas)
    breakdown.reserved_bytes = reserved if model.kind == "cuda" else None
    return RankEstimate(
        candidate=candidate, breakdown=breakdown, device_kind=model.kind,
        allocated_bytes=model.allocated(traced, tracker.uses_blas), reserved_bytes=reserved,
        trace_time_s=seconds, param_count=params, uses_blas=tracker.uses_blas,
        segment_peaks=segment_peaks(tracker), strategy=plan.strategy,
        world_size=plan.world_size, rank_bytes=rank)


def ranks_needed(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
                 limit_bytes: int, *, max_world_size: int = 1024, above: int = 1) -> int | None:
    """The smallest world size (a power of two above ``above``) at which one fsdp rank fits
    ``candidate`` under ``limit_bytes``; None when none up to ``max_world_size`` does."""
    n = 2
    while n <= above:
        n *= 2
    while n <= max_world_size:
        plan = replace(RankPlan.from_spec(spec), strategy="fsdp", world_size=n)
        if estimate_rank(spec, candidate, model, plan).peak_bytes <= limit_bytes:
            return n
        n *= 2
    return None


def sharding_line(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
                  limit_bytes: int) -> str | None:
    """"needs sharding over >=N ranks" when batch 1 does not fit one rank of the spec's
    strategy (unsharded, or fsdp over fewer ranks than needed); None when it fits."""
    one = candidate.with_batch(1)
    plan = replace(RankPlan.from_spec(spec), world_size=max(1, spec.world_size))
    if estimate_rank(spec, one, model, plan).peak_bytes <= limit_bytes:
        return None
    fsdp = plan.strategy == "fsdp"
    n = ranks_needed(spec, one, model, limit_bytes, above=plan.world_size if fsdp else 1)
    if n is None:
        return "batch 1 does not fit one rank even with fsdp over 1024 ranks"
    now = (f"fsdp over {plan.world_size} ranks" if fsdp else f"strategy {plan.strategy}")
    return (f"needs sharding over >={n} ranks: batch 1 does not fit one rank with {now}, "
            f"and fits with fsdp at world size {n}")


def sharding_note(spec: ExperimentSpec, model: DeviceModel, limit_bytes: int,
                  predictions: dict[Any, Any]) -> str | None:
    """``sharding_line`` for a search whose every setting is predicted not to fit its
    smallest batch: asked of the setting predicted leanest there (None: some setting fits,
    or tracing the sharded step failed)."""
    from autofit.parallel import spec_for

    if not predictions or any(p.batch_size for p in predictions.values()):
        return None
    lowest = spec.search.batch_size.lowest
    setting = min(predictions, key=lambda st: predictions[st].curve.peak_at(lowest))
    candidate = setting.candidate(lowest)
    try:
        return sharding_line(spec_for(spec, candidate), candidate, model, limit_bytes)
    except AutofitError:
        return None


def predicted_only(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
                   limit_bytes: int, short: Any) -> dict[str, Any] | None:
    """The answer at the job's own world size when the trials could only run fewer ranks
    (``short``: ``autofit.trials.ranks.RankShortfall``; ``spec`` at the job's world size,
    ``candidate`` the winner verified at ``short.verified_world_size``): the predicted max
    batch per rank at N and the per-rank peak of the verified batch at N, marked
    predicted-only. None when the winner runs one process (nothing depends on N)."""
    from autofit.parallel import spec_for
    from autofit.predict.batch_curve import predict_max_batch
    from autofit.predict.trace import estimate

    run = spec_for(spec, candidate)
    if run.parallel.strategy == "none":
        return None
    pred = predict_max_batch(run, candidate.with_batch(spec.search.batch_size.min), model,
                             limit_bytes, exact=True)
    at_n = estimate(run, candidate, model)
    n, k = short.world_size, short.verified_world_size
    return {**short.to_dict(), "strategy": run.parallel.strategy,
            "verified_batch_size": candidate.batch_size,
            "predicted_batch_size": pred.batch_size,
            "predicted_peak_bytes_at_verified_batch": at_n.peak_bytes,
            "note": (f"{short.note()}: {run.parallel.strategy} over {n} ranks is predicted to "
                     f"fit batch {pred.batch_size} per rank (batch {candidate.batch_size}, "
                     f"verified on {k} ranks, is predicted to peak {at_n.peak_bytes:,} bytes "
                     f"per rank at {n}); the tuned batch is the verified one")}
