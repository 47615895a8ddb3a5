"""Configs for each target GPU type: predicted, and on CUDA verified by capped trials.

A target smaller than the card in this run is emulated by capping the allocator at the
target's usable bytes (``set_per_process_memory_fraction``); the predicted batch is run and
stepped down (by ``multiple_of``) while it does not fit. A target whose every verification
trial failed is marked failed, never written with a batch that did not run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autofit.candidate import Candidate
from autofit.choices import Precision
from autofit.errors import AutofitError
from autofit.predict.batch_curve import predict_max_batch
from autofit.predict.calibrate import applied_for as calibration_applied
from autofit.predict.device_model import CUDA_DEFAULT
from autofit.search.events import Note, emitter
from autofit.search.plan import Plan, batch_cap_note
from autofit.search.results import TrialRecord
from autofit.spec import ExperimentSpec
from autofit.trials.result import TrialResult, TrialStatus
from autofit.trials.runner import run_trial


def _target_entry(spec: ExperimentSpec, target: Any, best: Candidate, plan: Plan
                  ) -> tuple[dict[str, Any], Candidate, int]:
    """The predicted configuration of one target: (entry, base candidate, usable bytes)."""
    precision = best.precision
    note = "predicted from the fake-tensor trace and the CUDA device model"
    if precision == Precision.BF16 and not target.bf16:
        precision = Precision.FP16
        note += "; bf16 unsupported on this GPU, fp16 used instead"
    model = plan.device_model if plan.device_model.kind == "cuda" else CUDA_DEFAULT
    usable = int((target.memory_bytes - model.context_bytes) * (1.0 - spec.memory.margin))
    base = Candidate(batch_size=spec.search.batch_size.lowest, input_size=best.input_size,
                     precision=precision, checkpoint_segments=best.checkpoint_segments,
                     strategy=best.strategy)
    entry: dict[str, Any] = {
        "name": target.name, "memory_bytes": target.memory_bytes, "bf16": target.bf16,
        "precision": precision.value, "checkpoint_segments": best.checkpoint_segments,
        "input_size": best.input_size, "verified": False, "failed": False,
    }
    try:
        pred = predict_max_batch(spec, base, model, usable, exact=True)
        entry["batch_size"] = pred.batch_size
        entry["predicted_peak_bytes"] = pred.estimate.peak_bytes if pred.estimate else None
    except AutofitError as exc:
        entry.update(batch_size=0, predicted_peak_bytes=None)
        note = f"prediction failed: {exc}"
    applied = calibration_applied(spec, base, model.kind)
    if applied is not None and entry["batch_size"]:
        ops = ", ".join(sorted({op.split("#")[0] for op in applied.corrections})) or "total"
        note += f"; trace corrected by the probe calibration ({ops})"
    if not entry["batch_size"]:
        note += "; does not fit even at the minimum batch"
    elif cap := batch_cap_note(spec, entry["batch_size"], entry["predicted_peak_bytes"], usable):
        note += f"; {cap}"
        entry["batch_capped"] = True
    entry["note"] = note
    return entry, base, usable


def _verify_target(spec: ExperimentSpec, entry: dict[str, Any], base: Candidate, usable: int,
                   plan: Plan, runner: Callable[..., TrialResult]) -> None:
    """Run the predicted batch with the allocator capped at the target's usable bytes; step
    down (by ``multiple_of``, never re-running a batch) while it does not fit. A target
    with no fitting run is marked failed, with batch 0: nothing unverified is handed over."""
    rng = spec.search.batch_size
    batch, tried = int(entry["batch_size"]), set()
    for _ in range(4):
        tried.add(batch)
        result = runner(spec, base.with_batch(batch), limit_bytes=usable,
                        steps=spec.search.steps_per_trial, device=plan.device)
        if result.fits:
            entry.update(batch_size=batch, verified=True, measured_peak_bytes=result.peak_bytes)
            entry["note"] += f"; verified on {plan.device_info.get('name')} capped to the target's memory"
            return
        if result.status is not TrialStatus.OOM:
            entry["note"] += f"; verification {result.status.value}: {result.message[:120]}"
            break
        lower = (batch - max(rng.multiple_of, batch // 20)) // rng.multiple_of * rng.multiple_of
        if lower < rng.lowest or lower in tried:
            break
        batch = lower
    entry.update(batch_size=0, failed=True)
    entry["note"] += (f"; FAILED: no verified batch (tried {', '.join(map(str, sorted(tried)))} "
                      f"capped to the target's memory)")


def configure_targets(spec: ExperimentSpec, best: TrialRecord, plan: Plan,
                      runner: Callable[..., TrialResult] = run_trial,
                      on_event: Any = None) -> list[dict[str, Any]]:
    """Predicted configs for each target GPU type; on CUDA, targets smaller than the present
    card are verified by a real trial with the memory fraction capped to the target's size."""
    emit = emitter(on_event)
    on_cuda = plan.device.startswith("cuda") and plan.device_model.kind == "cuda"
    card_bytes = int(plan.device_info.get("total_bytes") or 0)
    out: list[dict[str, Any]] = []
    for target in spec.targets:
        entry, base, usable = _target_entry(spec, target, best.result.candidate, plan)
        if not entry["batch_size"]:
            out.append(entry)  # the note says it does not fit; nothing to verify
            continue
        if on_cuda and target.memory_bytes < card_bytes:
            _verify_target(spec, entry, base, usable, plan, runner)
            status = "verified" if entry["verified"] else "failed"
            emit(Note(f"target {target.name}: batch {entry['batch_size']} ({status})"))
        elif on_cuda:
            entry["note"] += "; not verified (the target is not smaller than this card)"
        else:
            entry["note"] += "; not verified (no CUDA device in this run)"
        out.append(entry)
    return out
