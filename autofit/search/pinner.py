"""Pin the largest fitting batch of one setting with real trials, from a predicted start.

A fit moves up (one step, or further by a secant step calibrated on the measured peak), an
OOM moves down (by the measured miss), always strictly inside the open interval between the
best fit and the first failure; the batch is pinned when it fits and the next step up ran
and did not fit (or is the spec's max).

An OOM that a limit other than the planned one produced (``limit_kind`` rlimit: the real
allocator; cuda-device: the whole card) far below the limit is evidence that the device holds
less than the budget: the measured OOM point becomes the capacity planned against, and the
next trial jumps to the largest batch predicted to fit under it instead of stepping down.
"""

from __future__ import annotations

import math

from autofit.candidate import Candidate, Setting
from autofit.choices import LimitKind
from autofit.predict.batch_curve import MaxBatchEstimate
from autofit.spec import ExperimentSpec
from autofit.trials.result import TrialResult
from autofit.units import format_bytes

DEVICE_LIMITS = (LimitKind.RLIMIT, LimitKind.CUDA_DEVICE)
"""Limits that are the machine's own: an OOM from one far below the planned limit measures
the real capacity. (The CPU budget and the CUDA fraction cap are the planned limit itself.)"""

FAR_BELOW = 0.9
"""An OOM whose measured peak is under this share of the limit and of its predicted peak
says the device is smaller than planned."""


class BatchPinner:
    """Pins the largest fitting batch of one setting from a predicted starting point."""

    def __init__(self, spec: ExperimentSpec, setting: Setting, prediction: MaxBatchEstimate | None,
                 limit_bytes: int) -> None:
        rng = spec.search.batch_size
        self.mult = rng.multiple_of
        self.lo, self.hi = rng.lowest, rng.highest
        self.setting = Setting(*setting)
        self.prediction = prediction
        self.limit = limit_bytes
        self.best_fit: int | None = None
        self.best_fit_peak: int | None = None
        self.measured: dict[int, int] = {}
        self.first_fail: int | None = None
        self.capacity: int | None = None
        """The measured OOM point planned against after a device limit fired far below the
        limit (a lower bound of what the device holds: the failing allocation is not in it)."""
        self._gallop = 0
        self.capacity_note: str | None = None
        """Set when an OOM showed the device holds less than the limit (the jump it caused)."""
        start = prediction.batch_size if prediction and prediction.batch_size else self.lo
        self.next: int | None = self._clamp(start)

    def _clamp(self, batch: int) -> int:
        return max(self.lo, min(self.hi, batch // self.mult * self.mult))

    def aim(self, batch: int) -> None:
        """Run ``batch`` next (clamped to the spec's range and multiple)."""
        self.next = self._clamp(batch)

    def candidate(self, batch: int) -> Candidate:
        return self.setting.candidate(batch)

    def predicted_peak(self, batch: int) -> int | None:
        if self.prediction is None:
            return None
        if batch in self.prediction.estimates:
            return self.prediction.estimates[batch].peak_bytes
        return int(self.prediction.curve.peak_at(batch))

    @property
    def pinned(self) -> bool:
        if self.best_fit is None:
            return self.first_fail is not None and self.first_fail <= self.lo
        return self.best_fit >= self.hi or (
            self.first_fail is not None and self.first_fail <= self.best_fit + self.mult)

    def observe(self, batch: int, result: TrialResult) -> None:
        if result.fits:
            if self.best_fit is None or batch > self.best_fit:
                self.best_fit, self.best_fit_peak = batch, result.peak_bytes
        elif self.first_fail is None or batch < self.first_fail:
            self.first_fail = batch
        self.next = None if self.pinned else self._propose(batch, result)

    def _measured_capacity(self, batch: int, result: TrialResult) -> int | None:
        """The live bytes at which a device limit fired, when that is far below both the
        planned limit and the batch's predicted peak (else None)."""
        held = result.peak_bytes
        predicted = self.predicted_peak(batch)
        if (result.fits or result.status.value != "oom" or not held or predicted is None
                or LimitKind(result.limit_kind) not in DEVICE_LIMITS):
            return None
        if held >= FAR_BELOW * self.limit or held >= FAR_BELOW * predicted:
            return None
        return held

    def _batch_under(self, capacity: int) -> int:
        """The largest batch predicted to peak under ``capacity``: interpolated between the
        traced batches around it (the peak is convex piecewise affine, so the chord errs
        low: the jump lands on a fit), else the fitted line."""
        assert self.prediction is not None
        points = sorted((b, e.peak_bytes) for b, e in self.prediction.estimates.items())
        below = [(b, p) for b, p in points if p <= capacity]
        above = [(b, p) for b, p in points if p > capacity]
        if not below:
            return self.lo
        if not above:
            return self.prediction.curve.max_batch(capacity)
        (b1, p1), (b2, p2) = below[-1], above[0]
        if b2 <= b1 or p2 <= p1:
            return b1
        return b1 + math.floor((capacity - p1) * (b2 - b1) / (p2 - p1))

    def _propose(self, batch: int, result: TrialResult) -> int:
        lo_ok = self.best_fit
        hi_bad = self.first_fail
        guess: int | None = None
        jumped = ""
        curve = self.prediction.curve if self.prediction else None
        if result.fits and result.peak_bytes:
            self.measured[batch] = result.peak_bytes
        if result.fits and curve is not None and result.peak_bytes and curve.slope_bytes_per_sample > 0:
            # secant step: move the fitted line to pass through the measured point; with two
            # measured fits, use their slope instead of the predicted one
            slope = curve.slope_bytes_per_sample
            if len(self.measured) >= 2:
                (b1, p1), (b2, p2) = sorted(self.measured.items())[-2:]
                if p2 > p1:
                    slope = (p2 - p1) / (b2 - b1)
            guess = batch + math.floor((self.limit - result.peak_bytes) / slope)
        low = (lo_ok if lo_ok is not None else self.lo - self.mult)
        high = (hi_bad if hi_bad is not None else self.hi + self.mult)
        if curve is None:
            # no prediction: gallop up until something fails, then bisect
            candidate = max(batch + self.mult, batch * 2) if hi_bad is None else (low + high) // 2
        elif result.fits and self.capacity is not None and result.peak_bytes \
                and result.peak_bytes >= self.capacity:
            # past the measured OOM point, which only bounds the capacity from below: gallop
            # up (1, 2, 4, ... steps) until a trial fails, then bisect
            self._gallop = max(self.mult, 2 * self._gallop)
            candidate = batch + self._gallop
        elif result.fits:
            step_up = batch + self.mult
            candidate = max(step_up, self._clamp(guess) if guess is not None else step_up)
        elif (capacity := self._measured_capacity(batch, result)) is not None:
            # plan against what the device held; every later secant step aims at it too
            self.limit = self.capacity = capacity
            guess = max(self.lo, _align(self._batch_under(capacity), self.mult))
            jumped = (f"batch {batch} ran out of memory ({LimitKind(result.limit_kind).value}) "
                      f"at {format_bytes(capacity)}, far below its predicted peak "
                      f"{format_bytes(self.predicted_peak(batch) or 0)} and the limit: the device "
                      f"holds less than the budget; jumping to batch")
            candidate = min(batch - self.mult, guess)
            if lo_ok is None and candidate <= self.lo:
                candidate = self.lo
        else:
            if curve is not None and self.predicted_peak(batch):
                # the prediction undershot: shrink by the miss, at least one step
                ratio = self.limit / max(result.peak_bytes or self.limit, self.limit)
                guess = math.floor(batch * ratio * 0.97)
            candidate = min(batch - self.mult, self._clamp(guess) if guess else batch - self.mult)
            if lo_ok is None and candidate <= self.lo:
                candidate = self.lo
        # stay strictly inside the open interval (lo_ok, hi_bad); bisect when the guess leaves it
        candidate = candidate // self.mult * self.mult
        if not low < candidate < high:
            candidate = (low + high) // 2 // self.mult * self.mult
            if candidate <= low:
                candidate = low + self.mult
        candidate = self._clamp(candidate)
        if jumped:
            self.capacity_note = f"{jumped} {candidate}, the largest predicted to fit under it"
        return candidate


def _align(batch: int, multiple: int) -> int:
    return batch // multiple * multiple
