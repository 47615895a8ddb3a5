"""Pin the largest fitting batch of one setting with real trials, from a predicted start.

A fit moves up (one step, or further by a secant step calibrated on the measured peak), an
OOM moves down (by the measured miss), always strictly inside the open interval between the
best fit and the first failure; the batch is pinned when it fits and the next step up ran
and did not fit (or is the spec's max).
"""

from __future__ import annotations

import math

from autofit.candidate import Candidate, Setting
from autofit.predict.batch_curve import MaxBatchEstimate
from autofit.spec import ExperimentSpec
from autofit.trials.result import TrialResult


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
        start = prediction.batch_size if prediction and prediction.batch_size else self.lo
        self.next: int | None = self._clamp(start)

    def _clamp(self, batch: int) -> int:
        return max(self.lo, min(self.hi, batch // self.mult * self.mult))

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

    def _propose(self, batch: int, result: TrialResult) -> int:
        lo_ok = self.best_fit
        hi_bad = self.first_fail
        guess: int | None = None
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
        elif result.fits:
            step_up = batch + self.mult
            candidate = max(step_up, self._clamp(guess) if guess is not None else step_up)
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
        return self._clamp(candidate)
