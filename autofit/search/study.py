"""The optuna study every trial is recorded in, and the ledger that runs each trial once.

Every trial is an optuna trial (ask/tell) in a journal file in the output dir (or an RDB
``--storage``), so an interrupted tune resumes without repeating a finished trial and
optuna-dashboard can open it. OOM is recorded as an infeasible COMPLETE trial with a graded
constraint violation, so optuna's constrained samplers learn from it; user errors are FAIL
and stop the search.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from autofit.candidate import Candidate, Setting
from autofit.choices import Objective, Precision, Purpose
from autofit.errors import AutofitError, TrialError
from autofit.search.events import Emit, TrialFinished, TrialStarted
from autofit.search.results import TrialRecord
from autofit.spec import ExperimentSpec
from autofit.trials.result import TrialResult, TrialStatus


def _key(candidate: Candidate, steps: int) -> tuple:
    return (candidate.batch_size, candidate.input_size, candidate.precision.value,
            candidate.checkpoint_segments, candidate.strategy, steps)


def search_space(spec: ExperimentSpec) -> dict[str, Any]:
    """The distributions every trial is recorded with, and the sampler is asked over.

    One space for both, so that each recorded trial (its OOM constraint included) is history
    the TPE sampler learns from when it proposes the next setting.
    """
    from optuna.distributions import CategoricalDistribution, IntDistribution

    s = spec.search
    space = {
        "input_size": CategoricalDistribution(list(spec.input_sizes)),
        "precision": CategoricalDistribution([p.value for p in s.precisions]),
        "checkpoint_segments": CategoricalDistribution(list(s.checkpoint_segments)),
        "batch_size": IntDistribution(1, max(s.batch_size.highest, 1)),
    }
    if len(spec.parallel.strategies) > 1:  # an axis only when several are listed
        space["strategy"] = CategoricalDistribution(list(spec.parallel.strategies))
    return space


def propose_setting(study: Any, spec: ExperimentSpec) -> tuple[Any, Setting]:
    """Ask the study's sampler for the next setting, over the recorded trials' own space.

    Returns the optuna trial (to be told through ``Ledger.run(asked=...)``) and the setting.
    """
    space = search_space(spec)
    asked = study.ask()
    values = {name: asked.suggest_categorical(name, space[name].choices)
              for name in ("input_size", "precision", "checkpoint_segments", "strategy")
              if name in space}
    return asked, Setting(int(values["input_size"]), Precision(values["precision"]),
                          int(values["checkpoint_segments"]), str(values.get("strategy", "")))


class Ledger:
    """Runs trials once: every result goes to the optuna study; resumed ones come from it."""

    def __init__(self, spec: ExperimentSpec, limit_bytes: int, device: str, study: Any,
                 runner: Callable[..., TrialResult], emit: Emit, max_trials: int) -> None:
        self.spec = spec
        self.limit_bytes = limit_bytes
        self.device = device
        self.study = study
        self.runner = runner
        self.emit = emit
        self.max_trials = max_trials
        # Searching for a size only needs fit / out-of-memory, settled by the peak of step 2:
        # those trials run one timed step after the warm-up, and the winner's verification
        # run (verify_steps) measures its speed. max_throughput times every trial.
        s = spec.search
        self.default_steps = (s.steps_per_trial if s.objective == Objective.MAX_THROUGHPUT
                              or s.verify_steps == 0 else 1)
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
            record = TrialRecord(number=frozen.number,
                                 purpose=Purpose(attrs.get("purpose", "predicted")),
                                 result=result, predicted_peak_bytes=attrs.get("predicted_peak_bytes"),
                                 steps=int(attrs.get("steps", 0)), resumed=True)
            self.cache[_key(result.candidate, record.steps)] = record

    @property
    def exhausted(self) -> bool:
        return self.max_trials > 0 and self.new_trials >= self.max_trials

    def run(self, candidate: Candidate, purpose: Purpose, predicted_peak: int | None,
            steps: int | None = None, asked: Any = None) -> TrialRecord:
        """Run (or recall) one candidate. ``asked``: an optuna trial the sampler proposed."""
        steps = self.default_steps if steps is None else steps
        key = _key(candidate, steps)
        # a verification must run, even where a search trial had the same steps
        stale = purpose is Purpose.VERIFY and key in self.cache \
            and self.cache[key].purpose is not Purpose.VERIFY
        if key in self.cache and not stale:
            record = self.cache[key]
            if asked is not None:  # the sampler re-proposed a finished point: answer from memory
                self._tell(asked, record.result, record.predicted_peak_bytes)
            if record not in self.records:
                self.records.append(record)
                self.emit(TrialFinished(record))
            return record
        self.emit(TrialStarted(candidate, purpose))
        result = self.runner(self.spec, candidate, limit_bytes=self.limit_bytes, steps=steps,
                             device=self.device)
        self.new_trials += 1
        number = self._store(candidate, result, purpose, predicted_peak, steps, asked)
        record = TrialRecord(number=number, purpose=purpose, result=result,
                             predicted_peak_bytes=predicted_peak, steps=steps)
        self.cache[key] = record
        self.records.append(record)
        self.emit(TrialFinished(record))
        if result.status in (TrialStatus.ERROR, TrialStatus.TIMEOUT, TrialStatus.CRASHED):
            raise TrialError(
                f"trial {candidate.label()} ended as {result.status.value}: {result.message}"
                + ("" if result.status is TrialStatus.ERROR else
                   " (not an out-of-memory: the search stops rather than read it as 'too big')")
            )
        return record

    def _store(self, candidate: Candidate, result: TrialResult, purpose: Purpose,
               predicted_peak: int | None, steps: int, asked: Any = None) -> int:
        if self.study is None:
            return len(self.records)
        if asked is None:
            # the point itself, in the shared space: enqueued, then asked, so its params are
            # recorded with the distributions the sampler proposes from
            self.study.enqueue_trial(candidate.to_dict())
            trial = self.study.ask(search_space(self.spec))
        else:
            trial = asked
        trial.set_user_attr("batch_size", candidate.batch_size)
        trial.set_user_attr("result", result.to_dict())
        trial.set_user_attr("purpose", purpose.value)
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
    if objective == Objective.MAX_THROUGHPUT:
        if not result.fits:
            return 0.0
        return float(result.units_per_s or result.samples_per_s or 0.0) if len(spec.input_sizes) > 1 \
            else float(result.samples_per_s or 0.0)
    if objective == Objective.MAX_INPUT_SIZE:
        return float(c.input_size)
    return float(c.batch_size)


def _set_constraint(trial: Any, value: float) -> None:
    """peak / limit - 1: <= 0 feasible; an OOM is graded by how far past the limit it went."""
    trial.set_user_attr("constraint", value)
    if hasattr(trial, "set_constraint"):  # optuna >= 5
        trial.set_constraint("memory", value)


def _constraints(trial: Any) -> list[float]:
    return [float(trial.user_attrs.get("constraint", 0.0))]


def _storage(out_dir: Path | None, storage: str | None) -> Any:
    if storage is not None:
        return storage
    if out_dir is None:
        return None  # in-memory
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(out_dir / "study.journal")))


def _sampler(spec: ExperimentSpec) -> Any:
    import optuna

    if hasattr(optuna.trial.Trial, "set_constraint"):
        return optuna.samplers.TPESampler(seed=spec.search.seed, n_startup_trials=4)
    # optuna < 5 reads constraints through constraints_func
    return optuna.samplers.TPESampler(seed=spec.search.seed, constraints_func=_constraints,
                                      n_startup_trials=4)


def _refuse_other_spec(spec: ExperimentSpec, storage_obj: Any, name: str, where: str,
                       dedicated: bool) -> None:
    """--resume must continue this spec's study, not start a second one beside another's."""
    import optuna

    names = optuna.get_all_study_names(storage_obj)
    if name in names:
        return
    prefix = "autofit-" if dedicated else f"autofit-{spec.name}-"
    others = [n for n in names if n.startswith(prefix)]
    if others:
        raise AutofitError(
            f"--resume: {where} holds the study {others[0]!r} of a different spec (this spec's "
            f"hash is {spec.spec_hash()}); resume with the spec that made it, or start over "
            f"with --force (or another --out)")


def open_study(spec: ExperimentSpec, out_dir: Path | None, storage: str | None,
               resume: bool) -> Any:
    """The optuna study holding every trial (journal file in the output dir by default).

    The same rule for a journal and an RDB ``storage``: an existing study with finished
    trials is continued only with ``resume``; ``resume`` refuses a storage whose study was
    made by a different spec.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = _storage(out_dir, storage)
    where = storage or str(out_dir)
    name = f"autofit-{spec.name}-{spec.spec_hash()}"
    try:
        if resume and storage_obj is not None:
            _refuse_other_spec(spec, storage_obj, name, where, dedicated=storage is None)
        return optuna.create_study(study_name=name, storage=storage_obj, sampler=_sampler(spec),
                                   direction="maximize", load_if_exists=resume)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage_obj, sampler=_sampler(spec))
        if any("result" in t.user_attrs for t in study.get_trials(deepcopy=False)):
            raise AutofitError(
                f"a study named {name!r} with finished trials already exists in {where}; "
                f"pass --resume to continue it, or --force to start over"
            ) from None
        return study  # an earlier run that measured nothing: nothing to protect
    except AutofitError:
        raise
    except Exception as exc:
        raise AutofitError(f"cannot open optuna storage {where}: {exc}") from exc
