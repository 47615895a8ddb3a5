"""The largest batch under a limit: peak memory as a function of batch size, from traces.

Peak is affine in batch size for fixed input size, precision and segments (piecewise affine
when the peak moves between phases: the optimizer step at small batches, backward at large
ones). ``predict_max_batch`` fits a line from two traces, inverts it, and pins the boundary
with traces there (regula falsi on the bracket), so the answer is traced, not extrapolated.

A single-setting ``tune`` on a CPU asks for ``confirm=False``: two traces that run the same
ops in the same order pair up allocation by allocation, each allocation's live bytes are a
line in batch, and the largest of those lines is the peak at any batch (exact wherever
tensor sizes are affine in batch, kinks included). Its first two real trials (the answer and
one above) then do what the third, confirming trace would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autofit.candidate import Candidate
from autofit.predict.device_model import DeviceModel
from autofit.predict.estimates import MemoryEstimate
from autofit.spec import ExperimentSpec


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

    def to_line(self) -> tuple[float, float]:
        return self.intercept_bytes, self.slope_bytes_per_sample

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
    confirmed: bool = True
    """False when it was read off two traces paired event by event (``confirm=False``),
    without the trace just above it that confirms the boundary: real trials pin it next."""

    @property
    def estimate(self) -> MemoryEstimate | None:
        return self.estimates.get(self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "limit_bytes": self.limit_bytes,
                "curve": self.curve.to_dict(), "traces": self.traces,
                "seconds": round(self.seconds, 3), "confirmed_by_trace": self.confirmed}


def _align_down(batch: int, multiple: int) -> int:
    return batch // multiple * multiple


class _Traces:
    """Planned peaks by batch size for one setting, each traced once, on demand."""

    def __init__(self, spec: ExperimentSpec, base: Candidate, model: DeviceModel,
                 known: list[MemoryEstimate] | None,
                 replay: list[MemoryEstimate] | None = None) -> None:
        self.spec, self.base, self.model = spec, base, model
        self.replay = {e.candidate.batch_size: e for e in replay or []
                       if e.candidate.with_batch(base.batch_size) == base
                       and e.device_kind == model.kind}
        """Traces read back (an answer record): each answers its batch when asked, as a
        trace would, so the search takes the same steps as the run that made them."""
        self.derived: dict[int, MemoryEstimate] = {}
        """Estimates read off segment lines proven affine (not traced; see _pin_by_segments)."""
        # estimates already traced for this setting (e.g. the one `autofit estimate` printed)
        self.cache: dict[int, MemoryEstimate] = {
            e.candidate.batch_size: e for e in known or []
            if e.candidate.with_batch(base.batch_size) == base and e.device_kind == model.kind}

    def peak(self, batch: int) -> int:
        if batch in self.replay:
            self.cache.setdefault(batch, self.replay[batch])
        if batch not in self.cache:
            # imported here: a search answered from replayed traces needs no torch
            from autofit.predict.trace import estimate

            self.cache[batch] = estimate(self.spec, self.base.with_batch(batch), self.model)
        return self.cache[batch].peak_bytes

    def bracket(self, limit_bytes: int) -> tuple[int, int | None]:
        """(largest traced batch that fits, smallest traced batch that does not or None)."""
        fits = [b for b in self.cache if self.cache[b].peak_bytes <= limit_bytes]
        fails = [b for b in self.cache if self.cache[b].peak_bytes > limit_bytes]
        return max(fits), (min(fails) if fails else None)

    def points(self) -> list[tuple[int, int]]:
        return [(b, self.cache[b].peak_bytes) for b in sorted(self.cache)]

    def line(self, x1: int, x2: int) -> BatchCurve:
        intercept, slope = fit_line([(x1, self.peak(x1)), (x2, self.peak(x2))])
        return BatchCurve(intercept, slope, [])


def predict_max_batch(spec: ExperimentSpec, base: Candidate, model: DeviceModel,
                      limit_bytes: int, *, exact: bool = True,
                      max_traces: int = 10,
                      known: list[MemoryEstimate] | None = None,
                      replay: list[MemoryEstimate] | None = None,
                      confirm: bool = True) -> MaxBatchEstimate:
    """Largest batch in the spec's range whose traced peak fits ``limit_bytes``.

    Two traces fit the line; the inverse gives a batch; traces there and one step above pin
    it (the peak is piecewise affine when the peak moves between phases, so re-fit on the
    latest two points until the boundary holds). With ``exact=False`` stop after the two
    traces (used to rank many combinations cheaply). ``known``: estimates already made for
    this setting; ``replay``: traces read back from an answer record, each used only when the
    search asks for its batch (``known`` up front would change the search's path).

    ``confirm=False`` (a search whose next step is real trials at the answer and one above
    it): when the two traces pair up event by event (``_event_plan``), the largest batch
    their event lines fit under the limit is the answer, without the confirming trace
    (``confirmed`` False); else the traces pin it as above.
    """
    start = time.perf_counter()
    rng = spec.search.batch_size
    traces = _Traces(spec, base, model, known, replay)

    def done(batch: int, curve: BatchCurve, is_exact: bool = True,
             confirmed: bool = True) -> MaxBatchEstimate:
        return MaxBatchEstimate(batch, limit_bytes, curve, {**traces.derived, **traces.cache},
                                len(traces.cache), time.perf_counter() - start, exact=is_exact,
                                confirmed=confirmed)

    b1 = rng.lowest
    if not confirm and exact and b1 == 1 and rng.multiple_of == 1 and rng.highest >= 2 \
            and traces.peak(2) <= limit_bytes:
        # batch 1 often allocates less than its share (a size-1 dim makes more layouts
        # contiguous: fewer copies), so its events may not pair with a larger batch's
        b1 = 2
    first = traces.peak(b1)
    if first > limit_bytes:
        return done(0, BatchCurve(0.0, first / max(b1, 1), [(b1, first)]))
    # Peak is affine with a non-negative intercept, so scaling the whole peak of b1 up to the
    # limit gives a batch that still fits; the slope comes from there and half of it, where
    # activations (not the optimizer step of a tiny batch) set the peak.
    b2 = min(rng.highest, _align_down(int(b1 * limit_bytes / max(first, 1)), rng.multiple_of))
    if b2 <= b1:
        b2 = min(rng.highest, b1 + rng.multiple_of)
    if b2 == b1:
        return done(b1, BatchCurve(0.0, first / max(b1, 1), [(b1, first)]))
    traces.peak(b2)
    if not exact:
        batch, curve = _quick_ranking(traces, b1, b2, limit_bytes, rng.highest, rng.multiple_of)
        return done(batch, curve, is_exact=False)
    if not confirm:
        planned = _plan_by_events(traces, b1, b2, limit_bytes, rng.highest, rng.multiple_of)
        if planned is not None:
            return done(*planned, confirmed=False)
    pinned = _pin_by_segments(traces, b1, b2, limit_bytes, rng.highest, rng.multiple_of)
    if pinned is not None:
        return done(*pinned)
    batch, curve = _pin_boundary(traces, b1, b2, limit_bytes, rng.highest, rng.multiple_of,
                                 max_traces)
    return done(batch, curve)


def _segment_lines(e1: MemoryEstimate, e2: MemoryEstimate) -> dict[str, tuple[float, float]]:
    """Per-stretch lines (intercept, slope) through two traces' segment peaks."""
    b1, b2 = e1.candidate.batch_size, e2.candidate.batch_size
    return {name: fit_line([(b1, e1.segment_peaks[name]), (b2, e2.segment_peaks[name])])
            for name in e1.segment_peaks.keys() & e2.segment_peaks.keys()}


def _on_lines(e1: MemoryEstimate, e2: MemoryEstimate, e3: MemoryEstimate) -> bool:
    """Every stretch's peak at the third batch exactly on its line through the first two
    (integer arithmetic: no tolerance)."""
    (x1, x2, x3) = (e.candidate.batch_size for e in (e1, e2, e3))
    names = e1.segment_peaks.keys()
    if not names or names != e2.segment_peaks.keys() or names != e3.segment_peaks.keys():
        return False
    return all((e3.segment_peaks[n] - e1.segment_peaks[n]) * (x2 - x1)
               == (e2.segment_peaks[n] - e1.segment_peaks[n]) * (x3 - x1) for n in names)


def _pin_by_segments(traces: _Traces, b1: int, b2: int, limit_bytes: int, highest: int,
                     mult: int, attempts: int = 2) -> tuple[int, BatchCurve] | None:
    """Two traces give a line per stretch of the step (forward, backward, optimizer step of
    each step); the planned peak is the device model over their maximum, so it follows the
    phase boundaries that defeat a single line. One trace just above the predicted boundary
    confirms it: each stretch's peak is convex in batch (a maximum of affine live-byte
    counts), so three collinear points make it affine between them, and the peak at the
    answer is then known exactly without tracing it. A stretch that bends between the two
    traces (a small batch peaks at another moment) fails the check: the lines are re-drawn
    through the two largest traces and one more probe tried. None when the evidence is
    still not exact (then regula falsi pins the boundary, reusing every trace)."""
    xa, xb = b1, b2
    for _ in range(attempts):
        found, probe = _segments_once(traces, xa, xb, limit_bytes, highest, mult)
        if found is not None or probe is None:
            return found
        xa, xb = sorted({xb, probe})[-2:] if probe != xb else (xa, xb)
        if xa == xb:
            return None
    return None


def _segments_once(traces: _Traces, xa: int, xb: int, limit_bytes: int, highest: int,
                   mult: int) -> tuple[tuple[int, BatchCurve] | None, int | None]:
    """One attempt of ``_pin_by_segments`` with lines through the traces at ``xa`` < ``xb``:
    (the answer and its curve, or None; the batch probed, or None when nothing was traced)."""
    ea, eb = traces.cache[xa], traces.cache[xb]
    lines = _segment_lines(ea, eb)
    if not lines:
        return None, None
    model, blas = traces.model, eb.uses_blas

    span = xb - xa
    ends = [(ea.segment_peaks[n], eb.segment_peaks[n]) for n in lines]

    def planned(batch: int) -> int:  # integer arithmetic: exact at the traced batches
        traced = max(_ceil_line(pa, pb, span, batch - xa) for pa, pb in ends)
        return model.reserved(traced, blas)

    if planned(xb) != eb.peak_bytes or planned(xa) != ea.peak_bytes:
        return None, None  # the stretches do not reproduce the traced peaks: no shortcut
    answer = _largest_fitting(planned, traces, limit_bytes, highest, mult)
    probe = answer if answer >= highest else answer + mult
    traced_before = probe in traces.cache
    traces.peak(probe)
    ep = traces.cache[probe]
    if answer >= highest:
        if ep.peak_bytes > limit_bytes:
            return None, (None if traced_before else probe)
    elif ep.peak_bytes <= limit_bytes or not _on_lines(ea, eb, ep):
        return None, (None if traced_before else probe)
    if answer not in traces.cache:
        lower = max(b for b in traces.cache if b < probe)
        traces.derived[answer] = _derived(traces.cache[lower], ep, answer, planned(answer), model)
    # the line of the stretch that peaks at the answer (CPU: planned == traced bytes); on CUDA
    # the device model is not affine, so the chord through the planned peaks around it
    top = max(lines, key=lambda n: lines[n][0] + lines[n][1] * answer)
    intercept, slope = lines[top] if model.kind == "cpu" else traces.line(xb, probe).to_line()
    curve = BatchCurve(intercept, slope, traces.points())
    near = [(b, p) for b, p in curve.points if b >= answer / 4] or curve.points
    curve.residual = max(abs(curve.peak_at(b) - p) / max(p, 1) for b, p in near)
    curve.first_fit_error = abs(curve.peak_at(probe) - ep.peak_bytes) / max(ep.peak_bytes, 1)
    return (answer, curve), probe


def _event_plan(ea: MemoryEstimate, eb: MemoryEstimate
                ) -> dict[str, list[tuple[int, int]]] | None:
    """Each stretch's events as (live bytes at xa, live bytes at xb) pairs, when the two
    traces pair up: the same stretches, each with the same ops making its allocations in the
    same order (``stretch_ops``) and so as many allocations. Every tensor whose size is
    affine in batch makes each event's live bytes affine in it, so a stretch's peak at any
    batch is the largest of its events' lines there: exact on both sides of a kink where
    another moment takes over the peak (which defeats one line per stretch). None when they
    do not pair up (or were not kept). A size that is not affine in batch (a batch x batch
    matrix) is not seen here: the trials at the answer catch it."""
    la, lb = ea.stretch_lives, eb.stretch_lives
    if not la or la.keys() != lb.keys() or any(len(la[n]) != len(lb[n]) for n in la) \
            or not ea.stretch_ops or ea.stretch_ops != eb.stretch_ops:
        return None
    return {n: sorted(set(zip(la[n], lb[n], strict=True))) for n in la}


def _plan_by_events(traces: _Traces, xa: int, xb: int, limit_bytes: int, highest: int,
                    mult: int) -> tuple[int, BatchCurve] | None:
    """The largest aligned batch whose event lines (``_event_plan``) stay under the limit, on
    a CPU device model (affine live bytes, no block rounding): the answer and the line of the
    event that peaks there; None when the traces do not pair up, or when the largest event
    of each trace is not its planned peak (a peak the stretches do not hold)."""
    ea, eb = traces.cache[xa], traces.cache[xb]
    events = _event_plan(ea, eb) if traces.model.kind == "cpu" else None
    if events is None:
        return None
    span = xb - xa
    # an event with no more bytes at xa and no steeper line than another never peaks at a
    # batch >= xa: by slope, steepest first, keep only an event above every one kept
    pairs = sorted({p for stretch in events.values() for p in stretch},
                   key=lambda p: (p[1] - p[0], p[0]), reverse=True)
    hull: list[tuple[int, int]] = []
    for pa, pb in pairs:
        if not hull or pa > hull[-1][0]:
            hull.append((pa, pb))
    model = traces.model

    def traced_at(batch: int) -> tuple[int, tuple[int, int]]:
        return max((_ceil_line(pa, pb, span, batch - xa), (pa, pb)) for pa, pb in hull)

    def planned(batch: int) -> int:
        return model.reserved(traced_at(batch)[0], eb.uses_blas)

    if planned(xa) != ea.peak_bytes or planned(xb) != eb.peak_bytes:
        return None
    answer = _largest_fitting(planned, traces, limit_bytes, highest, mult)
    if answer not in traces.cache:
        segments = {n: max(_ceil_line(pa, pb, span, answer - xa) for pa, pb in stretch)
                    for n, stretch in events.items()}
        traces.derived[answer] = _derived(ea, eb, answer, planned(answer), model,
                                          segments=segments)
    _, (pa, pb) = traced_at(answer)
    slope = (pb - pa) / span
    curve = BatchCurve(pa - slope * xa, slope, traces.points())
    return answer, curve


def _ceil_line(pa: int, pb: int, span: int, offset: int) -> int:
    """The line through (0, pa) and (span, pb) at ``offset``, rounded up (integers: exact at
    both ends)."""
    return -(-(pa * span + (pb - pa) * offset) // span)


def _largest_fitting(planned: Callable[[int], int], traces: _Traces, limit_bytes: int,
                     highest: int, mult: int) -> int:
    """The largest aligned batch ``planned`` (convex in batch) puts under the limit, between
    the best traced fit and the step below the smallest traced failure (or ``highest``)."""
    best_fit, best_fail = traces.bracket(limit_bytes)
    top_batch = min(highest, best_fail - mult) if best_fail is not None else highest
    if top_batch <= best_fit:
        return best_fit
    if planned(top_batch) <= limit_bytes:
        return top_batch
    low, high = best_fit // mult, top_batch // mult
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if planned(mid * mult) <= limit_bytes else (low, mid)
    return low * mult


def _derived(e2: MemoryEstimate, e3: MemoryEstimate, batch: int, peak: int,
             model: DeviceModel, segments: dict[str, int] | None = None) -> MemoryEstimate:
    """The estimate at ``batch`` between two traces on the same affine stretch: every
    category interpolated, temporaries absorbing the rounding so they sum to the peak."""
    from dataclasses import replace

    x2, x3 = e2.candidate.batch_size, e3.candidate.batch_size
    t = (batch - x2) / (x3 - x2)
    b2, b3 = e2.breakdown, e3.breakdown

    def mix(a: int, b: int) -> int:
        return round(a + (b - a) * t)

    if segments is None:  # on the stretch lines
        segments = {n: round(e2.segment_peaks[n] + (e3.segment_peaks[n] - e2.segment_peaks[n])
                             * t) for n in e2.segment_peaks}
    traced = max(segments.values())
    parts: dict[str, Any] = {f: mix(getattr(b2, f), getattr(b3, f)) for f in
             ("params_bytes", "grads_bytes", "optimizer_state_bytes", "activations_bytes")}
    breakdown = replace(b3, **parts, temporaries_bytes=traced - sum(parts.values()),
                        peak_bytes=traced,
                        reserved_bytes=peak if model.kind == "cuda" else None)
    return replace(e3, candidate=e3.candidate.with_batch(batch), breakdown=breakdown,
                   allocated_bytes=model.allocated(traced, e3.uses_blas), reserved_bytes=peak,
                   trace_time_s=0.0, cached=False, derived=True, layers=[],
                   segment_peaks=segments, stretch_lives={}, stretch_ops={})


def _quick_ranking(traces: _Traces, b1: int, b2: int, limit_bytes: int, highest: int,
                   mult: int) -> tuple[int, BatchCurve]:
    """The chord b1..b2 lies on or above a convex piecewise affine peak, so beyond b2 it
    under-predicts memory and over-predicts the batch: a ranking that errs high never prunes
    a setting that could win."""
    curve = traces.line(b1, b2)
    curve.points = traces.points()
    best_fit, best_fail = traces.bracket(limit_bytes)
    upper = highest if best_fail is None else best_fail - mult
    return max(best_fit, min(upper, _align_down(curve.max_batch(limit_bytes), mult))), curve


def _pin_boundary(traces: _Traces, b1: int, b2: int, limit_bytes: int, highest: int,
                  mult: int, max_traces: int) -> tuple[int, BatchCurve]:
    """Regula falsi on the traced bracket until batch fits and batch + step does not."""
    bm = max(b1, _align_down(b2 // 2, mult))
    curve = traces.line(bm if bm != b2 else b1, b2)
    residuals: list[float] = []
    guess = _align_down(curve.max_batch(limit_bytes), mult)
    for _ in range(max_traces):
        best_fit, best_fail = traces.bracket(limit_bytes)
        if best_fit >= highest or (best_fail is not None and best_fail <= best_fit + mult):
            break  # pinned: the next step up was traced and does not fit, or the spec's max fits
        low, high = best_fit, (best_fail if best_fail is not None else highest + mult)
        if not low < guess < high:
            guess = low + mult if guess <= low else min(high - mult, highest)
            if not low < guess < high:
                break
        guess = min(guess, highest)
        peak = traces.peak(guess)
        residuals.append(abs(curve.peak_at(guess) - peak) / max(peak, 1))
        best_fit, best_fail = traces.bracket(limit_bytes)
        # regula falsi on the bracket; peak(batch) is convex piecewise affine, so the secant is
        # exact once both ends sit on the same affine piece. Without a failing end, extrapolate
        # through the two largest traced batches.
        curve = (traces.line(best_fit, best_fail) if best_fail is not None
                 else traces.line(*sorted(traces.cache)[-2:]))
        nxt = _align_down(curve.max_batch(limit_bytes), mult)
        # at the boundary, test the step just above the best fit to pin it
        guess = nxt if nxt > best_fit else best_fit + mult
    best_fit, _ = traces.bracket(limit_bytes)
    curve.points = traces.points()
    # affinity check: the final line against every traced batch on the same piece (batches
    # far below the boundary may peak in another phase, e.g. the optimizer step)
    near = [(b, p) for b, p in curve.points if b >= best_fit / 4] or curve.points
    if traces.model.segment_bytes > 1 and len({b for b, _ in near}) >= 2:
        # reserved memory grows in whole segments (2 MiB): a secant between adjacent batches
        # is all rounding (slope 0 or 2 MiB, an intercept of minus gigabytes); the line that
        # is reported and planned with is fitted over the whole piece instead
        curve.intercept_bytes, curve.slope_bytes_per_sample = fit_line(near)
    curve.residual = max(abs(curve.peak_at(b) - p) / max(p, 1) for b, p in near)
    curve.first_fit_error = residuals[0] if residuals else 0.0
    return best_fit, curve


# ----------------------------------------------------------------- settings side by side
def predict_many(spec: ExperimentSpec, bases: list[Candidate], model: DeviceModel,
                 limit_bytes: int, *, exact: bool, server: Any = None,
                 on_each: Any = None, confirm: bool = True) -> list[MaxBatchEstimate]:
    """``predict_max_batch`` of every setting (``bases``), in order.

    With a trial fork server that has finished its imports (``server``, a
    ``ForkServer``) and an active trace cache, a forked helper traces settings from the last
    one down while this process traces from the first one up; each setting is claimed once
    (an exclusive file), and the helper's settings are then answered here from the cache it
    filled (the same traces, so the same answers; a setting it did not finish is traced here).
    Only for specs without ``parallel`` and without probe calibrations (their traces are keyed
    apart). ``on_each(index, estimate)`` is called as each answer is known.
    """
    results: list[MaxBatchEstimate | None] = [None] * len(bases)
    helper = _Helper.start_for(spec, bases, model, limit_bytes, exact, server)
    try:
        for i, base in enumerate(bases):
            if helper is not None:
                helper.submit_when_ready()
                if not helper.claim(i):
                    break
            results[i] = predict_max_batch(spec, base, model, limit_bytes, exact=exact,
                                           confirm=confirm)
            if on_each is not None:
                on_each(i, results[i])
        if helper is not None:
            helper.wait()
        for i, base in enumerate(bases):
            if results[i] is None:  # the helper's: its traces are in the cache now
                results[i] = predict_max_batch(spec, base, model, limit_bytes, exact=exact,
                                               confirm=confirm)
                if on_each is not None:
                    on_each(i, results[i])
    finally:
        if helper is not None:
            helper.close()
    return [r for r in results if r is not None]


class _Helper:
    """A forked process (from the trial fork server) predicting settings from the end."""

    def __init__(self, server: Any, folder: Path, request: dict[str, Any]) -> None:
        self.server, self.folder, self.request = server, folder, request
        self.pid: int | None = None

    @classmethod
    def start_for(cls, spec: ExperimentSpec, bases: list[Candidate], model: DeviceModel,
                  limit_bytes: int, exact: bool, server: Any) -> _Helper | None:
        from autofit.predict import cache as trace_cache
        from autofit.predict import calibrate as calib

        cache, store = trace_cache.active(), calib.active()
        if (server is None or cache is None or len(bases) < 3
                or spec.parallel.strategies != ("none",)
                or (store is not None and store.calibrations)):
            return None
        import tempfile
        from dataclasses import asdict

        folder = Path(tempfile.mkdtemp(prefix="autofit-predict-"))
        request = {"raw": spec.raw, "source": spec.source_path or "<spec>",
                   "model": asdict(model), "limit_bytes": limit_bytes, "exact": exact,
                   "bases": [b.to_dict() for b in bases], "cache": str(cache.directory),
                   "claims": str(folder)}
        return cls(server, folder, request)

    def claim(self, index: int) -> bool:
        return _claim(Path(self.request["claims"]), index)

    def submit_when_ready(self) -> None:
        if self.pid is not None or not self.server.alive() or not self.server.ready_now():
            return
        import json
        import os
        import sys

        path = self.folder / "request.json"
        path.write_text(json.dumps(self.request, default=str))
        try:
            self.pid = self.server.submit({
                "kind": "predict", "request": str(path), "log": str(self.folder / "helper.log"),
                "env": {k: v for k, v in os.environ.items() if k.startswith("AUTOFIT_")},
                "sys_path": [p for p in sys.path if p and os.path.isdir(p)]})
        except Exception:  # noqa: BLE001 - no helper: this process traces every setting
            self.pid = -1

    def wait(self) -> None:
        (self.folder / "stop").touch()  # it claims nothing more (never started: nothing)
        if self.pid is not None and self.pid > 0:
            self.pid = -1  # waited once
            try:
                self.server.wait(None)  # its exit line: the server is free for trials again
            except Exception:  # noqa: BLE001 - its unfinished settings are traced here
                pass

    def close(self) -> None:
        """After an error here too: stop the helper and read its exit line before the
        folder goes (a trial's submit must not read it as its own reply)."""
        import shutil

        self.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _claim(folder: Path, index: int) -> bool:
    """Claim setting ``index`` for this process (False: the other one has it)."""
    import os

    if (folder / "stop").exists():
        return False
    try:
        os.close(os.open(folder / f"claim-{index}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def predict_job(request_path: str) -> None:
    """The helper's side of ``predict_many`` (run in a process forked by the fork server):
    predict settings from the last one down, each stored in the trace cache, until it meets
    a setting the parent claimed."""
    import json

    from autofit.predict.cache import TraceCache, using
    from autofit.spec import spec_from_dict

    request = json.loads(Path(request_path).read_text())
    spec = spec_from_dict(request["raw"], request["source"])
    model = DeviceModel(**request["model"])
    folder = Path(request["claims"])
    bases = [Candidate.from_dict(b) for b in request["bases"]]
    with using(TraceCache(Path(request["cache"]))):
        for i in reversed(range(len(bases))):
            if not _claim(folder, i):
                return
            predict_max_batch(spec, bases[i], model, int(request["limit_bytes"]),
                              exact=bool(request["exact"]))
