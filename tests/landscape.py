"""A fake trial runner with an analytic OOM landscape, and the tiny spec the tune tests share.

Importable as ``landscape.X`` from the test files (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import copy
from typing import Any

from autofit.candidate import Candidate
from autofit.choices import LimitKind
from autofit.memory import MemoryBreakdown
from autofit.predict import estimate
from autofit.predict.device_model import CPU
from autofit.spec import ExperimentSpec, spec_from_dict
from autofit.trials import TrialResult, TrialStatus

RAW: dict[str, Any] = {
    "name": "tiny-mlp",
    "model": {"_target_": "autofit.zoo.mlp", "in_features": 64, "hidden": 64, "depth": 2,
              "out_features": 8},
    "data": {"kind": "tensor", "shape": [64], "num_classes": 8},
    "device": "cpu",
    "memory": {"budget": "4MiB", "margin": 0.10},
    "search": {"steps_per_trial": 1, "verify_steps": 3},
}


def make_raw(**search: Any) -> dict[str, Any]:
    """``RAW`` with these ``search`` keys set (a deep copy)."""
    raw = copy.deepcopy(RAW)
    raw["search"].update(search)
    return raw


def make_spec(**search: Any) -> ExperimentSpec:
    return spec_from_dict(make_raw(**search))


class Landscape:
    """A fake trial runner: peak = traced peak * factor; fits iff peak <= limit.

    ``fail_at``: that batch reports a user error; ``interrupt_after``: Ctrl-C after that many
    trials. ``calls`` records (batch, size, precision, segments, steps) of every trial run.
    """

    def __init__(self, factor: float = 1.0, speed: Any = None, fail_at: int | None = None,
                 interrupt_after: int | None = None) -> None:
        self.factor = factor
        self.speed = speed or (lambda c: 100.0 * c.batch_size / (1 + 0.01 * c.batch_size))
        self.calls: list[tuple[int, int, str, int, int]] = []
        self.fail_at = fail_at
        self.interrupt_after = interrupt_after
        self._cache: dict[Candidate, int] = {}

    def peak(self, spec: ExperimentSpec, c: Candidate) -> int:
        if c not in self._cache:
            self._cache[c] = int(estimate(spec, c, CPU).peak_bytes * self.factor)
        return self._cache[c]

    def __call__(self, spec: ExperimentSpec, candidate: Candidate, *, limit_bytes: int,
                 steps: int, device: str) -> TrialResult:
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append((candidate.batch_size, candidate.input_size, candidate.precision,
                           candidate.checkpoint_segments, steps))
        if self.fail_at is not None and candidate.batch_size == self.fail_at:
            return TrialResult(candidate=candidate, status=TrialStatus.ERROR,
                               message="RuntimeError in forward: mat1 and mat2 shapes cannot be multiplied")
        peak = self.peak(spec, candidate)
        if peak > limit_bytes:
            return TrialResult(candidate=candidate, status=TrialStatus.OOM, message="oom",
                               memory=MemoryBreakdown(peak_bytes=limit_bytes + 1),
                               limit_bytes=limit_bytes, limit_kind=LimitKind.CPU_BUDGET,
                               steps_run=1)
        return TrialResult(candidate=candidate, status=TrialStatus.FITS,
                           memory=MemoryBreakdown(peak_bytes=peak), limit_bytes=limit_bytes,
                           step_time_s=candidate.batch_size / self.speed(candidate),
                           samples_per_s=self.speed(candidate), steps_run=2 + steps,
                           limit_kind=LimitKind.CPU_BUDGET)
