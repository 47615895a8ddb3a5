"""Analytic memory prediction: trace the shared training step on fake tensors.

A trace builds the model inside ``FakeTensorMode`` (no real memory, so a model far larger
than RAM traces in seconds), runs ``TRACE_STEPS`` full steps of the very step the trials run
(optimizer state appears at the first ``optimizer.step()``) under ``MemoryTracker``, and
returns a ``MemoryEstimate``. Peak is affine in batch size for fixed input size, precision and
segments, so ``predict_max_batch`` fits a line from a few traces, inverts it, and checks the
answer with traces at the boundary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses import FakeTensorMode

from autofit.candidate import Candidate
from autofit.device_model import DeviceModel
from autofit.errors import AutofitError, BuildError
from autofit.memory import MemoryBreakdown, MemoryTracker, ModuleRecord, PhaseHooks
from autofit.spec import ExperimentSpec
from autofit.step import TrainingJob

TRACE_STEPS = 2


@dataclass
class LayerRow:
    name: str
    kind: str
    params_bytes: int
    saved_bytes: int
    cumulative_bytes: int


@dataclass
class MemoryEstimate:
    """Predicted memory of one candidate on one device kind."""

    candidate: Candidate
    breakdown: MemoryBreakdown
    """Traced live bytes at the peak (block-rounded for CUDA)."""
    device_kind: str
    allocated_bytes: int
    """Predicted peak as the device counts it (CUDA: max_memory_allocated)."""
    reserved_bytes: int
    """Predicted reserved peak (CUDA allocator); equals allocated on CPU."""
    trace_time_s: float
    param_count: int
    layers: list[LayerRow] = field(default_factory=list)
    uses_blas: bool = False

    @property
    def peak_bytes(self) -> int:
        """The number planned against the budget."""
        return self.reserved_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "peak_bytes": self.peak_bytes,
            "allocated_bytes": self.allocated_bytes,
            "reserved_bytes": self.reserved_bytes,
            "breakdown": self.breakdown.to_dict(),
            "device_kind": self.device_kind,
            "trace_time_s": round(self.trace_time_s, 4),
            "param_count": self.param_count,
        }


def _friendly(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    name = type(exc).__name__
    if "DataDependent" in name or "data-dependent" in text.lower() or "_local_scalar_dense" in text:
        return (f"the step calls .item()/bool() on a tensor or uses a data-dependent shape, which "
                f"a fake-tensor trace cannot follow ({text[:160]}); use a static-shape step")
    return text[:400]


def trace(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel, *,
          steps: int = TRACE_STEPS, per_layer: bool = False,
          timeline: bool = False) -> tuple[MemoryTracker, int, float]:
    """Run ``steps`` training steps on fake CPU tensors under a tracker.

    Returns the tracker, the parameter count and the wall time. CUDA targets are traced on
    fake *CPU* tensors (a CPU build cannot run fake CUDA backward) with the CUDA optimizer
    choice (foreach) and 512 B block rounding.
    """
    start = time.perf_counter()
    tracker = MemoryTracker(round_to=model.block_bytes, record_timeline=timeline)
    hooks = PhaseHooks(tracker)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            job = TrainingJob(spec, candidate, torch.device("cpu"), fake=True, hooks=hooks,
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
        raise BuildError(f"tracing {candidate.label()} failed: {_friendly(exc)}") from exc
    return tracker, param_count, time.perf_counter() - start


def estimate(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel, *,
             per_layer: bool = False) -> MemoryEstimate:
    """Predict peak memory of one candidate (fake-tensor trace + device model)."""
    tracker, params, seconds = trace(spec, candidate, model, per_layer=per_layer)
    breakdown = tracker.breakdown()
    traced = breakdown.peak_bytes
    reserved = model.reserved(traced, tracker.uses_blas)
    breakdown.reserved_bytes = reserved if model.kind == "cuda" else None
    layers = _layer_rows(tracker.modules) if per_layer else []
    return MemoryEstimate(
        candidate=candidate, breakdown=breakdown, device_kind=model.kind,
        allocated_bytes=model.allocated(traced, tracker.uses_blas), reserved_bytes=reserved,
        trace_time_s=seconds, param_count=params, layers=layers, uses_blas=tracker.uses_blas,
    )


def _layer_rows(modules: dict[str, ModuleRecord]) -> list[LayerRow]:
    rows, total = [], 0
    for record in modules.values():
        if record.params_bytes == 0 and record.saved_bytes == 0:
            continue
        total += record.params_bytes + record.saved_bytes
        rows.append(LayerRow(record.name, record.kind, record.params_bytes, record.saved_bytes, total))
    return rows


# --------------------------------------------------------------------------- batch curve


@dataclass
class BatchCurve:
    """peak(batch) = intercept + slope * batch, fitted from traces."""

    intercept_bytes: float
    slope_bytes_per_sample: float
    points: list[tuple[int, int]]
    """(batch, planned peak bytes) of every trace taken."""
    residual: float = 0.0
    """Largest |fit - trace| / trace of the final line over traces near the boundary."""
    first_fit_error: float = 0.0
    """|fit - trace| / trace of the two-point fit at its first inverted guess."""

    def peak_at(self, batch: int) -> float:
        return self.intercept_bytes + self.slope_bytes_per_sample * batch

    def max_batch(self, limit_bytes: float) -> int:
        """Largest batch with fitted peak <= limit (0 if even batch 0 does not fit)."""
        if self.slope_bytes_per_sample <= 0:
            return 2**31
        return max(0, math.floor((limit_bytes - self.intercept_bytes) / self.slope_bytes_per_sample))

    def to_dict(self) -> dict[str, Any]:
        return {"intercept_bytes": self.intercept_bytes,
                "slope_bytes_per_sample": self.slope_bytes_per_sample,
                "points": self.points, "residual": self.residual,
                "first_fit_error": self.first_fit_error}


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares line through (batch, bytes) points; exact for two."""
    n = len(points)
    if n == 1:
        b, y = points[0]
        return 0.0, y / max(b, 1)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    slope = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


@dataclass
class MaxBatchEstimate:
    """The predicted largest batch under a limit, with the evidence."""

    batch_size: int
    """0 when even the smallest allowed batch is predicted not to fit."""
    limit_bytes: int
    curve: BatchCurve
    estimates: dict[int, MemoryEstimate]
    traces: int
    seconds: float
    exact: bool = True
    """True when traces pinned it (batch fits, batch + step does not); False = quick ranking."""

    @property
    def estimate(self) -> MemoryEstimate | None:
        return self.estimates.get(self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "limit_bytes": self.limit_bytes,
                "curve": self.curve.to_dict(), "traces": self.traces,
                "seconds": round(self.seconds, 3)}


def _align_down(batch: int, multiple: int) -> int:
    return batch // multiple * multiple


def predict_max_batch(spec: ExperimentSpec, base: Candidate, model: DeviceModel,
                      limit_bytes: int, *, exact: bool = True,
                      max_traces: int = 10,
                      known: list[MemoryEstimate] | None = None) -> MaxBatchEstimate:
    """Largest batch in the spec's range whose traced peak fits ``limit_bytes``.

    Two traces fit the line; the inverse gives a batch; traces there and one step above pin
    it (the peak is piecewise affine when the peak moves between phases, so re-fit on the
    latest two points until the boundary holds). With ``exact=False`` stop after the first
    check trace (used to rank many combinations cheaply).
    """
    start = time.perf_counter()
    rng = spec.search.batch_size
    mult = rng.multiple_of
    lo_allowed, hi_allowed = rng.lowest, rng.highest
    # estimates already traced for this setting (e.g. the one `autofit estimate` printed)
    cache: dict[int, MemoryEstimate] = {
        e.candidate.batch_size: e for e in known or []
        if e.candidate.with_batch(base.batch_size) == base and e.device_kind == model.kind}

    def planned(batch: int) -> int:
        if batch not in cache:
            cache[batch] = estimate(spec, base.with_batch(batch), model)
        return cache[batch].peak_bytes

    b1 = lo_allowed
    first = planned(b1)
    if first > limit_bytes:
        curve = BatchCurve(0.0, first / max(b1, 1), [(b1, first)])
        return MaxBatchEstimate(0, limit_bytes, curve, cache, len(cache), time.perf_counter() - start)
    # Peak is affine with a non-negative intercept, so scaling the whole peak of b1 up to the
    # limit gives a batch that still fits; the slope comes from there and half of it, where
    # activations (not the optimizer step of a tiny batch) set the peak.
    b2 = min(hi_allowed, _align_down(int(b1 * limit_bytes / max(first, 1)), mult))
    if b2 <= b1:
        b2 = min(hi_allowed, b1 + mult)
    if b2 == b1:
        curve = BatchCurve(0.0, first / max(b1, 1), [(b1, first)])
        return MaxBatchEstimate(b1, limit_bytes, curve, cache, len(cache), time.perf_counter() - start)
    planned(b2)
    if not exact:
        # quick ranking from two traces: the chord b1..b2 lies on or above a convex piecewise
        # affine peak, so beyond b2 it under-predicts memory and over-predicts the batch. A
        # ranking that errs high never prunes a setting that could win.
        intercept, slope = fit_line([(b1, first), (b2, cache[b2].peak_bytes)])
        curve = BatchCurve(intercept, slope, [(b, cache[b].peak_bytes) for b in sorted(cache)])
        fits = [b for b in cache if cache[b].peak_bytes <= limit_bytes]
        fails = [b for b in cache if cache[b].peak_bytes > limit_bytes]
        upper = hi_allowed if not fails else min(fails) - mult
        quick = max(max(fits), min(upper, _align_down(curve.max_batch(limit_bytes), mult)))
        return MaxBatchEstimate(quick, limit_bytes, curve, cache, len(cache),
                                time.perf_counter() - start, exact=False)
    bm = max(b1, _align_down(b2 // 2, mult))
    if bm not in (b1, b2):
        planned(bm)
    x1 = bm if bm != b2 else b1
    intercept, slope = fit_line([(x1, cache[x1].peak_bytes), (b2, cache[b2].peak_bytes)])
    curve = BatchCurve(intercept, slope, [])

    def bracket() -> tuple[int, int | None]:
        fits = [b for b in cache if cache[b].peak_bytes <= limit_bytes]
        fails = [b for b in cache if cache[b].peak_bytes > limit_bytes]
        return max(fits), (min(fails) if fails else None)

    residuals: list[float] = []
    guess = _align_down(curve.max_batch(limit_bytes), mult)
    for _ in range(max_traces):
        best_fit, best_fail = bracket()
        if best_fit >= hi_allowed or (best_fail is not None and best_fail <= best_fit + mult):
            break  # pinned: the next step up was traced and does not fit, or the spec's max fits
        low, high = best_fit, (best_fail if best_fail is not None else hi_allowed + mult)
        if not low < guess < high:
            guess = low + mult if guess <= low else min(high - mult, hi_allowed)
            if not low < guess < high:
                break
        guess = min(guess, hi_allowed)
        peak = planned(guess)
        residuals.append(abs(curve.peak_at(guess) - peak) / max(peak, 1))
        best_fit, best_fail = bracket()
        if best_fail is not None:
            # regula falsi on the bracket; peak(batch) is convex piecewise affine, so the
            # secant is exact once both ends sit on the same affine piece
            p_fit, p_fail = cache[best_fit].peak_bytes, cache[best_fail].peak_bytes
            slope = (p_fail - p_fit) / (best_fail - best_fit)
            intercept = p_fit - slope * best_fit
        else:
            # extrapolate through the two largest traced batches
            x1, x2 = sorted(cache)[-2:]
            intercept, slope = fit_line([(x1, cache[x1].peak_bytes), (x2, cache[x2].peak_bytes)])
        curve = BatchCurve(intercept, slope, [])
        if not exact:
            break
        nxt = _align_down(curve.max_batch(limit_bytes), mult)
        # at the boundary, test the step just above the best fit to pin it
        guess = nxt if nxt > best_fit else best_fit + mult
    best_fit, best_fail = bracket()
    if not exact:
        # quick mode: the refitted line's answer, inside the traced bracket (for ranking)
        inverse = _align_down(curve.max_batch(limit_bytes), mult)
        upper = hi_allowed if best_fail is None else best_fail - mult
        best_fit = max(best_fit, min(inverse, upper))
    curve.points = [(b, cache[b].peak_bytes) for b in sorted(cache)]
    # affinity check: the final line against every traced batch on the same piece (batches
    # far below the boundary may peak in another phase, e.g. the optimizer step)
    near = [(b, p) for b, p in curve.points if b >= best_fit / 4] or curve.points
    curve.residual = max(abs(curve.peak_at(b) - p) / max(p, 1) for b, p in near)
    curve.first_fit_error = residuals[0] if residuals else 0.0
    return MaxBatchEstimate(best_fit, limit_bytes, curve, cache, len(cache),
                            time.perf_counter() - start, exact=exact)


def naive_estimate_bytes(spec: ExperimentSpec, candidate: Candidate) -> int:
    """The classic hand formula: params (+ grads + Adam's 2 states) + layer outputs x 2.

    As in torchstat-style calculators: sum every leaf module's output size from one forward,
    double it for backward, add 4x the parameter bytes. Kept for the benchmark comparison.
    """
    outputs = 0

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        nonlocal outputs
        if isinstance(output, torch.Tensor) and not list(module.children()):
            outputs += output.numel() * output.element_size()

    with FakeTensorMode(allow_non_fake_inputs=True):
        job = TrainingJob(spec, candidate, torch.device("cpu"), fake=True)
        params = sum(p.numel() * p.element_size() for p in job.model.parameters())
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            with torch.no_grad(), job._autocast():
                from autofit.build import make_input
                job.model(make_input(spec, candidate, torch.device("cpu")))
        finally:
            handle.remove()
    return 4 * params + 2 * outputs
