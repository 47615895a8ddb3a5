"""What a tune found: every trial as the tuner used it, per-setting summaries, the winner.

``TuneResult.to_dict()`` is the results schema (``SCHEMA_VERSION``) that ``results.json``
holds and that export, plot and profile read back through ``autofit.export.results_io``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autofit.candidate import Setting
from autofit.choices import LimitKind, Phase, Purpose, StepKind, Strategy
from autofit.export.results_io import SCHEMA_VERSION
from autofit.spec import ExperimentSpec
from autofit.trials.result import TrialResult
from autofit.version import __version__


@dataclass
class TrialRecord:
    """One real trial as the tuner used it."""

    number: int
    purpose: Purpose
    result: TrialResult
    predicted_peak_bytes: int | None
    steps: int
    resumed: bool = False
    reused: bool = False
    """A VERIFY record that is a search trial reused as the verification (CPU budget, see
    ``searches.reusable_verification``): no trial of its own was run."""

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "number": self.number,
            "purpose": Purpose(self.purpose).value,
            "config": r.candidate.to_dict(),
            "status": r.status.value,
            "message": r.message,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "measured_peak_bytes": r.peak_bytes,
            "memory": r.memory.to_dict() if r.memory else None,
            "step_time_s": r.step_time_s,
            "samples_per_s": r.samples_per_s,
            "units_per_s": r.units_per_s,
            "units_name": r.units_name,
            "seconds": round(r.wall_time_s, 3),
            "overhead_s": round(r.overhead_s, 3),
            "steps": self.steps,
            "limit_kind": LimitKind(r.limit_kind or "none").value,
            "phase": Phase(r.phase).value if r.phase else "",
            "warning": r.warning,
            "resumed": self.resumed,
        }


@dataclass
class SettingSummary:
    """One setting's largest batch: predicted, and measured where trials ran."""

    setting: Setting
    predicted_batch_size: int
    measured_batch_size: int | None = None
    """Largest batch that ran and fit at this setting (None: not tried)."""
    pinned: bool = False
    """True when the next step up ran and did not fit (or the spec's max fits)."""

    @property
    def input_size(self) -> int:
        return self.setting.input_size

    @property
    def precision(self) -> str:
        return self.setting.precision.value

    @property
    def checkpoint_segments(self) -> int:
        return self.setting.checkpoint_segments

    @property
    def batch_size(self) -> int:
        """Measured where trials ran, else predicted."""
        return self.measured_batch_size or self.predicted_batch_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.setting.input_size, "precision": self.setting.precision.value,
            "checkpoint_segments": self.setting.checkpoint_segments,
            **({"strategy": self.setting.strategy} if self.setting.strategy else {}),
            "predicted_batch_size": self.predicted_batch_size,
            "batch_size": self.measured_batch_size if self.measured_batch_size else self.predicted_batch_size,
            "measured": self.measured_batch_size is not None, "pinned": self.pinned,
        }


@dataclass
class TuneResult:
    spec: ExperimentSpec
    device: dict[str, Any]
    budget_bytes: int
    limit_bytes: int
    strategy: Strategy
    """The strategy that ran (``auto`` resolved)."""
    best: TrialRecord | None
    trials: list[TrialRecord]
    settings: list[SettingSummary]
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Decisions the user should read: step-downs, pruned settings, warnings."""
    predict_s: float = 0.0
    wall_time_s: float = 0.0
    curves: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    """Where ``autofit.tune`` wrote the files (None for ``run_search`` alone)."""
    files: list[Path] = field(default_factory=list)
    """results.json, tuned.yaml and the exports, as written."""
    plot_note: str = ""
    """What became of peak_vs_batch.png ("wrote ..." or why it was skipped)."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """Probe calibrations (``predict.calibrate.CalibrationStore.to_dict``); empty: none."""
    ranks: dict[str, Any] = field(default_factory=dict)
    """Fewer GPUs than the job's ranks: its world size, the one verified instead and the
    predicted-only answer at the job's (``predict.distributed.predicted_only``); empty: none."""

    @property
    def step_kind(self) -> StepKind:
        """The step the spec is proven with, as the trials ran it (the spec's, before any)."""
        ran = next((t.result.step_kind for t in self.trials if t.result.step_kind), "")
        if ran:
            return StepKind(ran)
        from autofit.loops import step_kind  # imports torch: only when no trial ran

        return step_kind(self.spec)

    @property
    def real_trials(self) -> int:
        return sum(1 for t in self.trials if not t.resumed)

    @property
    def real_steps(self) -> int:
        """Training steps run by this call, verification included (an OOM step counts)."""
        return sum(t.result.steps_run for t in self.trials if not t.resumed)

    @property
    def search_trials(self) -> int:
        """Trials spent finding the answer (this call), without the verification run."""
        return sum(1 for t in self.trials if not t.resumed and t.purpose != Purpose.VERIFY)

    @property
    def search_steps(self) -> int:
        return sum(t.result.steps_run for t in self.trials if not t.resumed and t.purpose != Purpose.VERIFY)

    def pareto(self) -> dict[str, list[dict[str, int]]]:
        """Per precision: (input size, largest batch) pairs no other pair dominates."""
        out: dict[str, list[dict[str, int]]] = {}
        for precision in dict.fromkeys(s.precision for s in self.settings):
            best_by_size: dict[int, int] = {}
            for s in self.settings:
                if s.precision != precision:
                    continue
                best_by_size[s.input_size] = max(best_by_size.get(s.input_size, 0), s.batch_size)
            front, top = [], 0
            for size in sorted(best_by_size, reverse=True):
                batch = best_by_size[size]
                if batch > top:
                    front.append({"input_size": size, "batch_size": batch})
                    top = batch
            out[precision] = sorted(front, key=lambda p: p["input_size"])
        return out

    def to_dict(self) -> dict[str, Any]:
        best = None
        if self.best is not None:
            r = self.best.result
            best = {
                **r.candidate.to_dict(),
                "peak_bytes": r.peak_bytes,
                "memory": r.memory.to_dict() if r.memory else None,
                "predicted_peak_bytes": self.best.predicted_peak_bytes,
                "step_time_s": r.step_time_s,
                "samples_per_s": r.samples_per_s,
                "units_per_s": r.units_per_s,
                "units_name": r.units_name,
                "verified": self.best.purpose == Purpose.VERIFY and r.fits,
                "verification": ("search trial reused" if self.best.reused else "own trial")
                if self.best.purpose == Purpose.VERIFY else "none",
                "trial": self.best.number,
                "step_kind": r.step_kind or self.step_kind.value,
            }
        return {
            "schema_version": SCHEMA_VERSION,
            "autofit_version": __version__,
            "name": self.spec.name,
            "spec": self.spec.raw,
            "spec_path": self.spec.source_path,
            "spec_hash": self.spec.spec_hash(),
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "budget_text": self.spec.memory.budget_text,
            "margin": self.spec.memory.margin,
            "limit_bytes": self.limit_bytes,
            "step": {"kind": self.step_kind.value, "description": self.step_kind.describe()},
            "objective": self.spec.search.objective.value,
            "strategy": Strategy(self.strategy).value,
            "best": best,
            "real_trials": self.real_trials,
            "real_steps": self.real_steps,
            "search_trials": self.search_trials,
            "search_steps": self.search_steps,
            "predict_s": round(self.predict_s, 3),
            "wall_time_s": round(self.wall_time_s, 3),
            "max_batch_by_setting": [s.to_dict() for s in self.settings],
            "pareto": self.pareto(),
            "targets": self.targets,
            "notes": self.notes,
            "curves": self.curves,
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"ranks": self.ranks} if self.ranks else {}),
            "trials": [t.to_dict() for t in self.trials],
        }
