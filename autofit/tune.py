"""``tune``: prediction-seeded search with real trials, recorded in an optuna study.

For each setting of the discrete axes (input size x precision x checkpoint segments) the
predictor gives the largest batch under ``budget * (1 - margin)``. Real trials then pin the
boundary: the first trial is the predicted batch; a fit moves up (one step, or further by a
secant step calibrated on the measured peak), an OOM moves down; the search stops when a
batch fits and the next step up ran and did not fit (or is the spec's max). The winner is
re-run over ``verify_steps`` steps; if that fails the search steps down and says so. Nothing
is ever returned that was not run.

Every trial is an optuna trial (ask/tell) in a journal file in the output dir, so an
interrupted tune resumes without repeating a finished trial and optuna-dashboard can open it.
OOM is recorded as an infeasible COMPLETE trial with a graded constraint violation, so
optuna's constrained samplers learn from it; user errors are FAIL and stop the search.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autofit import __version__
from autofit.candidate import Candidate
from autofit.device_model import DeviceModel, device_model_for
from autofit.errors import AutofitError, SearchError, TrialError
from autofit.predict import MaxBatchEstimate, predict_max_batch
from autofit.spec import ExperimentSpec
from autofit.trial import TrialResult, TrialStatus, resolve_device, run_trial

Setting = tuple[int, str, int]  # (input_size, precision, checkpoint_segments)


@dataclass
class TrialRecord:
    """One real trial as the tuner used it."""

    number: int
    purpose: str
    """predicted | refine | verify | explore | probe"""
    result: TrialResult
    predicted_peak_bytes: int | None
    steps: int
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "number": self.number,
            "purpose": self.purpose,
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
            "limit_kind": r.limit_kind,
            "phase": r.phase,
            "warning": r.warning,
            "resumed": self.resumed,
        }


@dataclass
class SettingSummary:
    input_size: int
    precision: str
    checkpoint_segments: int
    predicted_batch_size: int
    measured_batch_size: int | None = None
    """Largest batch that ran and fit at this setting (None: not tried)."""
    pinned: bool = False
    """True when the next step up ran and did not fit (or the spec's max fits)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size, "precision": self.precision,
            "checkpoint_segments": self.checkpoint_segments,
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
    strategy: str
    best: TrialRecord | None
    trials: list[TrialRecord]
    settings: list[SettingSummary]
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predict_s: float = 0.0
    wall_time_s: float = 0.0
    curves: dict[str, Any] = field(default_factory=dict)

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
        return sum(1 for t in self.trials if not t.resumed and t.purpose != "verify")

    @property
    def search_steps(self) -> int:
        return sum(t.result.steps_run for t in self.trials if not t.resumed and t.purpose != "verify")

    def pareto(self) -> dict[str, list[dict[str, int]]]:
        """Per precision: (input size, largest batch) pairs no other pair dominates."""
        out: dict[str, list[dict[str, int]]] = {}
        for precision in dict.fromkeys(s.precision for s in self.settings):
            best_by_size: dict[int, int] = {}
            for s in self.settings:
                if s.precision != precision:
                    continue
                batch = s.measured_batch_size if s.measured_batch_size else s.predicted_batch_size
                best_by_size[s.input_size] = max(best_by_size.get(s.input_size, 0), batch)
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
                "verified": self.best.purpose == "verify" and r.fits,
                "trial": self.best.number,
            }
        return {
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
            "objective": self.spec.search.objective,
            "strategy": self.strategy,
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
            "trials": [t.to_dict() for t in self.trials],
        }


# --------------------------------------------------------------------------- trial ledger


def _key(candidate: Candidate, steps: int) -> tuple:
    return (candidate.batch_size, candidate.input_size, candidate.precision,
            candidate.checkpoint_segments, steps)


class Ledger:
    """Runs trials once: every result goes to the optuna study; resumed ones come from it."""

    def __init__(self, spec: ExperimentSpec, limit_bytes: int, device: str, study: Any,
                 runner: Callable[..., TrialResult], on_trial: Callable[[TrialRecord], None],
                 max_trials: int, on_start: Callable[[Candidate, str], None] | None = None) -> None:
        self.spec = spec
        self.limit_bytes = limit_bytes
        self.device = device
        self.study = study
        self.runner = runner
        self.on_trial = on_trial
        self.on_start = on_start or (lambda candidate, purpose: None)
        self.max_trials = max_trials
        # Searching for a size only needs fit / out-of-memory, settled by the peak of step 2:
        # those trials run one timed step after the warm-up, and the winner's verification
        # run (verify_steps) measures its speed. max_throughput times every trial.
        s = spec.search
        self.default_steps = (s.steps_per_trial if s.objective == "max_throughput" or s.verify_steps == 0
                              else 1)
        self.records: list[TrialRecord] = []
        self.cache: dict[tuple, TrialRecord] = {}
        self.new_trials = 0
        if study is not None:
            self._load()

    def _load(self) -> None:
        import optuna

        for frozen in self.study.get_trials(deepcopy=False):
            attrs = frozen.user_attrs
            if "result" not in attrs or frozen.state not in (
                    optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL):
                continue
            result = TrialResult.from_dict(attrs["result"])
            record = TrialRecord(number=frozen.number, purpose=attrs.get("purpose", "predicted"),
                                 result=result, predicted_peak_bytes=attrs.get("predicted_peak_bytes"),
                                 steps=int(attrs.get("steps", 0)), resumed=True)
            self.cache[_key(result.candidate, record.steps)] = record

    @property
    def exhausted(self) -> bool:
        return self.max_trials > 0 and self.new_trials >= self.max_trials

    def run(self, candidate: Candidate, purpose: str, predicted_peak: int | None,
            steps: int | None = None, asked: Any = None) -> TrialRecord:
        """Run (or recall) one candidate. ``asked``: an optuna trial the sampler proposed."""
        steps = self.default_steps if steps is None else steps
        key = _key(candidate, steps)
        if key in self.cache:
            record = self.cache[key]
            if asked is not None:  # the sampler re-proposed a finished point: answer from memory
                self._tell(asked, record.result, record.predicted_peak_bytes)
            if record not in self.records:
                self.records.append(record)
                self.on_trial(record)
            return record
        self.on_start(candidate, purpose)
        result = self.runner(self.spec, candidate, limit_bytes=self.limit_bytes, steps=steps,
                             device=self.device)
        self.new_trials += 1
        number = self._store(candidate, result, purpose, predicted_peak, steps, asked)
        record = TrialRecord(number=number, purpose=purpose, result=result,
                             predicted_peak_bytes=predicted_peak, steps=steps)
        self.cache[key] = record
        self.records.append(record)
        self.on_trial(record)
        if result.status in (TrialStatus.ERROR, TrialStatus.TIMEOUT, TrialStatus.CRASHED):
            raise TrialError(
                f"trial {candidate.label()} ended as {result.status.value}: {result.message}"
                + ("" if result.status is TrialStatus.ERROR else
                   " (not an out-of-memory: the search stops rather than read it as 'too big')")
            )
        return record

    def _store(self, candidate: Candidate, result: TrialResult, purpose: str,
               predicted_peak: int | None, steps: int, asked: Any = None) -> int:
        if self.study is None:
            return len(self.records)
        from optuna.distributions import CategoricalDistribution, IntDistribution

        def choices(values: tuple[Any, ...], value: Any) -> CategoricalDistribution:
            return CategoricalDistribution(list(values) + ([] if value in values else [value]))

        s = self.spec.search
        dists = {
            "batch_size": IntDistribution(1, max(s.batch_size.max, candidate.batch_size)),
            "input_size": choices(self.spec.input_sizes, candidate.input_size),
            "precision": choices(s.precisions, candidate.precision),
            "checkpoint_segments": choices(s.checkpoint_segments, candidate.checkpoint_segments),
        }
        if asked is None:
            self.study.enqueue_trial(candidate.to_dict())
            trial = self.study.ask(dists)
        else:
            trial = asked
            trial.set_user_attr("batch_size", candidate.batch_size)
        trial.set_user_attr("result", result.to_dict())
        trial.set_user_attr("purpose", purpose)
        trial.set_user_attr("steps", steps)
        trial.set_user_attr("predicted_peak_bytes", predicted_peak)
        self._tell(trial, result, predicted_peak)
        return trial.number

    def _tell(self, trial: Any, result: TrialResult, predicted_peak: int | None) -> None:
        """Finish an optuna trial: feasible fit, graded infeasible OOM, or FAIL."""
        import optuna

        peak = result.peak_bytes
        if result.status is TrialStatus.FITS:
            violation = (peak or 0) / self.limit_bytes - 1.0
            _set_constraint(trial, min(violation, 0.0))
            self.study.tell(trial, objective_value(self.spec, result))
        elif result.status is TrialStatus.OOM:
            # graded: how far past the limit it was predicted/measured to go
            over = max(peak or 0, predicted_peak or 0) / self.limit_bytes - 1.0
            _set_constraint(trial, max(over, 1e-3))
            self.study.tell(trial, objective_value(self.spec, result))
        else:
            trial.set_user_attr("error", result.message)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)


def objective_value(spec: ExperimentSpec, result: TrialResult) -> float:
    c = result.candidate
    objective = spec.search.objective
    if objective == "max_throughput":
        if not result.fits:
            return 0.0
        return float(result.units_per_s or result.samples_per_s or 0.0) if len(spec.input_sizes) > 1 \
            else float(result.samples_per_s or 0.0)
    if objective == "max_input_size":
        return float(c.input_size)
    return float(c.batch_size)


def _set_constraint(trial: Any, value: float) -> None:
    """peak / limit - 1: <= 0 feasible; an OOM is graded by how far past the limit it went."""
    trial.set_user_attr("constraint", value)
    if hasattr(trial, "set_constraint"):  # optuna >= 5
        trial.set_constraint("memory", value)


def _constraints(trial: Any) -> list[float]:
    return [float(trial.user_attrs.get("constraint", 0.0))]


# --------------------------------------------------------------------------- one-axis pinning


class BatchPinner:
    """Pins the largest fitting batch of one setting from a predicted starting point."""

    def __init__(self, spec: ExperimentSpec, setting: Setting, prediction: MaxBatchEstimate | None,
                 limit_bytes: int) -> None:
        rng = spec.search.batch_size
        self.mult = rng.multiple_of
        self.lo, self.hi = rng.lowest, rng.highest
        self.setting = setting
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
        return setting_candidate(self.setting, batch)

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


# --------------------------------------------------------------------------- tune


@dataclass
class Plan:
    device: str
    device_info: dict[str, Any]
    device_model: DeviceModel
    budget_bytes: int
    limit_bytes: int


def plan_limits(spec: ExperimentSpec, device: str | None = None, *,
                require_device: bool = True) -> Plan:
    """Resolve device, budget ('auto' = the device's capacity) and the usable limit.

    With ``require_device=False`` (validate, estimate) a CUDA spec on a machine without CUDA
    still gets the CUDA device model; an 'auto' budget is then unknown (0).
    """
    import platform

    import torch

    device = device or resolve_device(spec.device)
    info: dict[str, Any] = {"kind": "cuda" if device.startswith("cuda") else "cpu",
                            "torch": torch.__version__.split("+")[0], "cuda": torch.version.cuda}
    if device.startswith("cuda") and not torch.cuda.is_available():
        if require_device:
            raise AutofitError(f"device: {device!r} requested but CUDA is not available here")
        from autofit.device_model import CUDA_DEFAULT

        info.update(name="(no CUDA device here: modelled)", total_bytes=0)
        budget = spec.memory.budget_bytes or 0
        return Plan(device, info, CUDA_DEFAULT, budget, int(budget * (1.0 - spec.memory.margin)))
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=props.name, total_bytes=int(props.total_memory))
        model = device_model_for("cuda", props.name)
        capacity = int(props.total_memory) - model.context_bytes
    else:
        from autofit.worker import _cpu_total_bytes

        info.update(name=platform.processor() or platform.machine() or "cpu",
                    total_bytes=_cpu_total_bytes())
        model = device_model_for("cpu")
        capacity = info["total_bytes"]
    budget = spec.memory.budget_bytes if spec.memory.budget_bytes is not None else capacity
    limit = int(budget * (1.0 - spec.memory.margin))
    return Plan(device, info, model, budget, limit)


def settings_of(spec: ExperimentSpec) -> list[Setting]:
    s = spec.search
    return list(itertools.product(spec.input_sizes, s.precisions, s.checkpoint_segments))


def choose_strategy(spec: ExperimentSpec) -> str:
    if spec.search.strategy != "auto":
        return spec.search.strategy
    return "binary" if len(settings_of(spec)) == 1 and spec.search.objective == "max_batch" else "optuna"


def open_study(spec: ExperimentSpec, out_dir: Path | None, storage: str | None,
               resume: bool) -> Any:
    """The optuna study holding every trial (journal file in the output dir by default)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is None and out_dir is None:
        storage_obj: Any = None  # in-memory
    elif storage is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        assert out_dir is not None
        storage_obj = JournalStorage(JournalFileBackend(str(out_dir / "study.journal")))
    else:
        storage_obj = storage
    if hasattr(optuna.trial.Trial, "set_constraint"):
        sampler = optuna.samplers.TPESampler(seed=spec.search.seed, n_startup_trials=4)
    else:  # optuna < 5 reads constraints through constraints_func
        sampler = optuna.samplers.TPESampler(seed=spec.search.seed, constraints_func=_constraints,
                                             n_startup_trials=4)
    name = f"autofit-{spec.name}-{spec.spec_hash()}"
    direction = "maximize"
    try:
        return optuna.create_study(study_name=name, storage=storage_obj, sampler=sampler,
                                   direction=direction, load_if_exists=resume or storage is not None)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage_obj, sampler=sampler)
        if any("result" in t.user_attrs for t in study.get_trials(deepcopy=False)):
            raise AutofitError(
                f"a study named {name!r} with finished trials already exists in the storage; "
                f"pass --resume to continue it"
            ) from None
        return study  # an earlier run that measured nothing: nothing to protect
    except Exception as exc:
        raise AutofitError(f"cannot open optuna storage {storage or out_dir}: {exc}") from exc


def tune(spec: ExperimentSpec, *, out_dir: str | Path | None = None, resume: bool = False,
         storage: str | None = None, device: str | None = None,
         on_trial: Callable[[TrialRecord], None] | None = None,
         on_event: Callable[[str], None] | None = None,
         on_start: Callable[[Candidate, str], None] | None = None,
         runner: Callable[..., TrialResult] = run_trial) -> TuneResult:
    """Find the best configuration of ``spec`` with real trials (see module docstring).

    ``out_dir`` holds the optuna journal (resume); files are written by ``autofit.output``.
    ``runner`` is the trial function (tests inject OOM landscapes through it).
    """
    started = time.perf_counter()
    say = on_event or (lambda message: None)
    plan = plan_limits(spec, device)
    strategy = choose_strategy(spec)
    out_path = Path(out_dir) if out_dir is not None else None
    study = open_study(spec, out_path, storage, resume)
    s = spec.search
    max_trials = s.max_trials
    ledger = Ledger(spec, plan.limit_bytes, plan.device, study, runner, on_trial or (lambda r: None),
                    max_trials, on_start)
    if ledger.cache:
        say(f"resuming: {len(ledger.cache)} finished trials loaded from the study; none will be repeated")

    if runner is run_trial:
        from autofit.trial import prestart

        prestart()
    # ---- predictions for every setting
    t0 = time.perf_counter()
    settings = settings_of(spec)
    predictions: dict[Setting, MaxBatchEstimate] = {}
    exact = len(settings) <= 2
    for setting in settings:
        base = setting_candidate(setting, s.batch_size.min)
        predictions[setting] = predict_max_batch(spec, base, plan.device_model, plan.limit_bytes,
                                                 exact=exact)
        say(f"predicted max batch {predictions[setting].batch_size:>6} at "
            f"{base.with_batch(predictions[setting].batch_size).label()} "
            f"({predictions[setting].traces} traces, {predictions[setting].seconds:.1f} s)")
    predict_s = time.perf_counter() - t0
    summaries = {st: SettingSummary(st[0], st[1], st[2], predictions[st].batch_size)
                 for st in settings}

    notes: list[str] = []
    best: TrialRecord | None = None
    try:
        if s.objective == "max_batch":
            best = _search_max_batch(spec, settings, predictions, summaries, ledger, plan, say)
        elif s.objective == "max_input_size":
            best = _search_max_input(spec, settings, predictions, summaries, ledger, plan, say)
        else:
            best = _search_throughput(spec, settings, predictions, summaries, ledger, plan, say, study)
        if best is not None and s.verify_steps > 0:
            best = _verify(spec, best, summaries, ledger, plan, notes, say)
    except (AutofitError, KeyboardInterrupt) as exc:
        # nothing measured is lost: the caller can write what finished (the study has it too)
        exc.partial = _partial(spec, plan, strategy, ledger, summaries, notes, predict_s,  # type: ignore[union-attr]
                               predictions, started)
        raise
    result = _partial(spec, plan, strategy, ledger, summaries, notes, predict_s, predictions, started)
    if best is None:
        error = SearchError(_nothing_fits_message(spec, plan, settings))
        error.partial = result  # type: ignore[attr-defined]
        raise error
    result.best = best
    result.targets = _targets(spec, best, plan, ledger.runner, say)
    result.wall_time_s = time.perf_counter() - started
    return result


def _partial(spec: ExperimentSpec, plan: Plan, strategy: str, ledger: Ledger,
             summaries: dict[Setting, SettingSummary], notes: list[str], predict_s: float,
             predictions: dict[Setting, MaxBatchEstimate], started: float) -> TuneResult:
    return TuneResult(
        spec=spec, device=plan.device_info, budget_bytes=plan.budget_bytes,
        limit_bytes=plan.limit_bytes, strategy=strategy, best=None, trials=list(ledger.records),
        settings=list(summaries.values()), notes=notes, predict_s=predict_s,
        curves={f"{k[0]}/{k[1]}/{k[2]}": v.to_dict() for k, v in predictions.items()},
        wall_time_s=time.perf_counter() - started,
    )


def setting_candidate(setting: Setting, batch: int) -> Candidate:
    size, precision, segments = setting
    return Candidate(batch_size=batch, input_size=size, precision=precision,
                     checkpoint_segments=segments)


def _exact_prediction(spec: ExperimentSpec, setting: Setting,
                      predictions: dict[Setting, MaxBatchEstimate],
                      summaries: dict[Setting, SettingSummary], plan: Plan) -> MaxBatchEstimate:
    """The setting's prediction pinned by traces (settings are ranked on quick ones)."""
    if not predictions[setting].exact:
        predictions[setting] = predict_max_batch(
            spec, setting_candidate(setting, spec.search.batch_size.min), plan.device_model,
            plan.limit_bytes, exact=True)
        summaries[setting].predicted_batch_size = predictions[setting].batch_size
    return predictions[setting]


def _nothing_fits_message(spec: ExperimentSpec, plan: Plan, settings: list[Setting]) -> str:
    from autofit.units import format_bytes

    s = spec.search
    tips = []
    if max(s.checkpoint_segments) == 0:
        tips.append("activation checkpointing (search.checkpoint_segments: [2, 4])")
    if "bf16" not in s.precisions and "fp16" not in s.precisions:
        tips.append("lower precision (search.precision: [bf16])")
    if spec.data.kind in ("image", "tokens"):
        tips.append(f"a smaller input size (search.input_size below {min(spec.input_sizes)})")
    tips.append("a larger memory.budget or a smaller memory.margin")
    return (f"nothing fits: batch {s.batch_size.min} does not fit under "
            f"{format_bytes(plan.limit_bytes)} (budget x (1 - margin)) at any of "
            f"{len(settings)} setting(s); try " + "; ".join(tips))


def _pin(spec: ExperimentSpec, pinner: BatchPinner, ledger: Ledger, purpose_first: str,
         summary: SettingSummary) -> TrialRecord | None:
    """Run trials for one setting until its largest fitting batch is pinned."""
    best: TrialRecord | None = None
    purpose = purpose_first
    while pinner.next is not None and not ledger.exhausted:
        batch = pinner.next
        record = ledger.run(pinner.candidate(batch), purpose, pinner.predicted_peak(batch))
        purpose = "refine"
        pinner.observe(batch, record.result)
        if record.result.fits and (best is None or batch > best.result.candidate.batch_size):
            best = record
    summary.measured_batch_size = pinner.best_fit
    summary.pinned = pinner.pinned
    return best


def _better(a: TrialRecord | None, b: TrialRecord) -> bool:
    """Is b better than a for max_batch (bigger batch; then faster)?"""
    if a is None:
        return True
    ca, cb = a.result.candidate, b.result.candidate
    if cb.batch_size != ca.batch_size:
        return cb.batch_size > ca.batch_size
    return (b.result.samples_per_s or 0) > (a.result.samples_per_s or 0)


def _search_max_batch(spec: ExperimentSpec, settings: list[Setting],
                      predictions: dict[Setting, MaxBatchEstimate],
                      summaries: dict[Setting, SettingSummary], ledger: Ledger, plan: Plan,
                      say: Callable[[str], None]) -> TrialRecord | None:
    """Pin settings in order of predicted max batch; stop when none left can beat the best."""
    ranked = sorted(settings, key=lambda st: (-predictions[st].batch_size, st[2], st[1] != "fp32"))
    best: TrialRecord | None = None
    for setting in ranked:
        pred = predictions[setting]
        if best is not None and pred.batch_size * 1.05 < best.result.candidate.batch_size:
            say(f"skipping {setting}: predicted {pred.batch_size} cannot beat {best.result.candidate.batch_size}")
            continue
        if ledger.exhausted:
            break
        # settings were ranked on quick predictions; pin from an exact one
        pred = _exact_prediction(spec, setting, predictions, summaries, plan)
        record = _pin(spec, BatchPinner(spec, setting, pred, plan.limit_bytes), ledger,
                      "predicted", summaries[setting])
        if record is not None and _better(best, record):
            best = record
    return best


def _search_max_input(spec: ExperimentSpec, settings: list[Setting],
                      predictions: dict[Setting, MaxBatchEstimate],
                      summaries: dict[Setting, SettingSummary], ledger: Ledger, plan: Plan,
                      say: Callable[[str], None]) -> TrialRecord | None:
    """Largest input size that trains at the minimum batch; per size, the leanest setting first."""
    bmin = spec.search.batch_size.lowest
    for size in sorted(spec.input_sizes, reverse=True):
        options = [st for st in settings if st[0] == size]
        order = {p: i for i, p in enumerate(spec.search.precisions)}
        # cheapest compute first among settings predicted to fit the minimum batch
        # (no recomputation, the precision listed first); then the leanest of the rest
        options.sort(key=lambda st: (predictions[st].batch_size < bmin, st[2], order[st[1]])
                     if predictions[st].batch_size >= bmin else (True, -predictions[st].batch_size, 0))
        for setting in options:
            if predictions[setting].batch_size < bmin and setting != options[-1] and any(
                    predictions[o].batch_size >= bmin for o in options):
                continue
            if ledger.exhausted:
                return None
            pinner = BatchPinner(spec, setting, predictions[setting], plan.limit_bytes)
            record = ledger.run(pinner.candidate(bmin), "predicted", pinner.predicted_peak(bmin))
            if record.result.fits:
                return record
            say(f"input size {size} does not fit at batch {bmin} with {setting[1]}, ckpt={setting[2]}")
            if predictions[setting].batch_size < bmin:
                break
    return None


def _search_throughput(spec: ExperimentSpec, settings: list[Setting],
                       predictions: dict[Setting, MaxBatchEstimate],
                       summaries: dict[Setting, SettingSummary], ledger: Ledger, plan: Plan,
                       say: Callable[[str], None], study: Any) -> TrialRecord | None:
    """Measure samples/s at each promising setting's largest fitting batch.

    Settings whose checkpointing buys less than 25% more batch than a cheaper setting of the
    same precision and size are pruned (recomputation costs ~30% time). The survivors are
    proposed in predicted order, then by optuna's TPE sampler over the remaining settings.
    """
    feasible = [st for st in settings if predictions[st].batch_size > 0]
    pruned: list[Setting] = []
    for st in feasible:
        cheaper = [o for o in feasible if o[0] == st[0] and o[1] == st[1] and o[2] < st[2]]
        if cheaper and predictions[st].batch_size < 1.25 * max(predictions[o].batch_size for o in cheaper):
            continue
        pruned.append(st)
    # one trial per surviving setting plus room for a couple of step-downs, still fewer than
    # the combinations when prediction prunes any
    budget = spec.search.max_trials or max(4, min(len(pruned) + 2, 2 * len(pruned)))
    ledger.max_trials = budget
    order = sorted(pruned, key=lambda st: (-predictions[st].batch_size * max(st[0], 1), st[2]))
    best: TrialRecord | None = None
    tried: set[Setting] = set()

    def measure(setting: Setting) -> None:
        nonlocal best
        tried.add(setting)
        pinner = BatchPinner(spec, setting, _exact_prediction(spec, setting, predictions, summaries, plan),
                             plan.limit_bytes)
        # one trial at the predicted max; step down only on OOM (throughput rarely needs the
        # last sample, and each extra trial costs more than it can gain)
        while pinner.next is not None and not ledger.exhausted:
            batch = pinner.next
            record = ledger.run(pinner.candidate(batch), "predicted", pinner.predicted_peak(batch))
            pinner.observe(batch, record.result)
            if record.result.fits:
                summaries[setting].measured_batch_size = batch
                if best is None or objective_value(spec, record.result) > objective_value(spec, best.result):
                    best = record
                break

    for setting in order[:max(1, budget // 2)]:
        if ledger.exhausted:
            break
        measure(setting)
    # the rest of the budget: optuna's TPE sampler proposes settings (constrained by the OOMs
    # it has seen), each run at that setting's predicted largest batch
    import optuna

    labels = {f"{st[0]}/{st[1]}/{st[2]}": st for st in pruned}
    stale = 0
    while not ledger.exhausted and len(tried) < len(pruned) and stale < 3:
        asked = study.ask() if study is not None else None
        if asked is None:
            break
        setting = labels[asked.suggest_categorical("setting", sorted(labels))]
        if setting in tried:
            stale += 1
            record = next((r for r in reversed(ledger.records)
                           if (r.result.candidate.input_size, r.result.candidate.precision,
                               r.result.candidate.checkpoint_segments) == setting), None)
            if record is not None:
                ledger.run(record.result.candidate, record.purpose, record.predicted_peak_bytes,
                           steps=record.steps, asked=asked)
            else:
                study.tell(asked, state=optuna.trial.TrialState.PRUNED)
            continue
        tried.add(setting)
        pinner = BatchPinner(spec, setting, _exact_prediction(spec, setting, predictions, summaries, plan),
                             plan.limit_bytes)
        batch = pinner.next or pinner.lo
        record = ledger.run(pinner.candidate(batch), "explore", pinner.predicted_peak(batch), asked=asked)
        if record.result.fits:
            summaries[setting].measured_batch_size = batch
            if best is None or objective_value(spec, record.result) > objective_value(spec, best.result):
                best = record
        elif not ledger.exhausted:
            measure(setting)  # step down from an OOM the prediction did not foresee
    if best is None:
        # the trial budget ran out before anything fit: keep going, one setting at a time,
        # rather than report "nothing fits" for settings that were never tried
        ledger.max_trials = 0
        for setting in order:
            if best is not None:
                break
            measure(setting)
    say(f"throughput: measured {len(tried)} of {len(settings)} settings ({len(settings) - len(pruned)} pruned by prediction)")
    return best


def _verify(spec: ExperimentSpec, best: TrialRecord, summaries: dict[Setting, SettingSummary],
            ledger: Ledger, plan: Plan, notes: list[str], say: Callable[[str], None]) -> TrialRecord | None:
    """Re-run the winner for ``verify_steps`` steps; step down while it fails."""
    candidate = best.result.candidate
    mult = spec.search.batch_size.multiple_of
    steps = spec.search.verify_steps
    saved_max = ledger.max_trials
    ledger.max_trials = 0  # verification always runs
    try:
        for _ in range(8):
            record = ledger.run(candidate, "verify", best.predicted_peak_bytes, steps=steps)
            if record.result.fits:
                if candidate != best.result.candidate:
                    setting = (candidate.input_size, candidate.precision, candidate.checkpoint_segments)
                    if setting in summaries:
                        summaries[setting].measured_batch_size = candidate.batch_size
                return record
            lower = candidate.batch_size - mult
            note = (f"verification over {steps} steps failed at {candidate.label()} "
                    f"({record.result.status.value}); stepping down to batch {lower}")
            notes.append(note)
            say(note)
            if lower < spec.search.batch_size.min:
                return None
            candidate = candidate.with_batch(lower)
    finally:
        ledger.max_trials = saved_max
    return None


def _targets(spec: ExperimentSpec, best: TrialRecord, plan: Plan,
             runner: Callable[..., TrialResult] = run_trial,
             say: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Predicted configs for each target GPU type; on CUDA, targets smaller than the present
    card are verified by a real trial with the memory fraction capped to the target's size."""
    from autofit.device_model import CUDA_DEFAULT

    on_cuda = plan.device.startswith("cuda") and plan.device_model.kind == "cuda"
    card_bytes = int(plan.device_info.get("total_bytes") or 0)
    out: list[dict[str, Any]] = []
    c = best.result.candidate
    for target in spec.targets:
        precision = c.precision
        note = "predicted from the fake-tensor trace and the CUDA device model"
        if precision == "bf16" and not target.bf16:
            precision = "fp16"
            note += "; bf16 unsupported on this GPU, fp16 used instead"
        model = plan.device_model if plan.device_model.kind == "cuda" else CUDA_DEFAULT
        usable = int((target.memory_bytes - model.context_bytes) * (1.0 - spec.memory.margin))
        base = Candidate(batch_size=spec.search.batch_size.min, input_size=c.input_size,
                         precision=precision, checkpoint_segments=c.checkpoint_segments)
        entry: dict[str, Any] = {
            "name": target.name, "memory_bytes": target.memory_bytes, "bf16": target.bf16,
            "precision": precision, "checkpoint_segments": c.checkpoint_segments,
            "input_size": c.input_size, "verified": False,
        }
        try:
            pred = predict_max_batch(spec, base, model, usable, exact=True)
            entry["batch_size"] = pred.batch_size
            est = pred.estimate
            entry["predicted_peak_bytes"] = est.peak_bytes if est else None
        except AutofitError as exc:
            entry.update(batch_size=0, predicted_peak_bytes=None)
            note = f"prediction failed: {exc}"
        batch = int(entry.get("batch_size") or 0)
        if batch == 0:
            note += "; does not fit even at the minimum batch"
        elif on_cuda and target.memory_bytes < card_bytes:
            # emulate the target: cap the allocator at its usable bytes; step down on OOM
            for _ in range(4):
                result = runner(spec, base.with_batch(batch), limit_bytes=usable,
                                steps=spec.search.steps_per_trial, device=plan.device)
                if result.fits:
                    entry.update(batch_size=batch, verified=True, measured_peak_bytes=result.peak_bytes)
                    note += f"; verified on {plan.device_info.get('name')} capped to the target's memory"
                    break
                if result.status is not TrialStatus.OOM:
                    note += f"; verification {result.status.value}: {result.message[:120]}"
                    break
                batch = max(spec.search.batch_size.min, batch - max(1, batch // 20))
            say(f"target {target.name}: batch {entry['batch_size']} "
                f"({'verified' if entry['verified'] else 'predicted only'})")
        elif on_cuda:
            note += "; not verified (the target is not smaller than this card)"
        else:
            note += "; not verified (no CUDA device in this run)"
        entry["note"] = note
        out.append(entry)
    return out
