"""``run_search``: prediction-seeded search with real trials, recorded in an optuna study.

For each setting of the discrete axes (input size x precision x checkpoint segments) the
predictor gives the largest batch under ``budget * (1 - margin)``; real trials then pin the
boundary (``pinner``) in the order the objective's search (``searches``) chooses; the winner
is verified and the target GPUs are configured (``targets``). Nothing is ever returned that
was not run. Files are the caller's job (``autofit.api.tune``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autofit.candidate import Setting
from autofit.choices import Objective
from autofit.errors import AutofitError, SearchError, TuneFailed, TuneInterrupted
from autofit.parallel import with_world_size
from autofit.predict import calibrate as calib
from autofit.predict.batch_curve import MaxBatchEstimate, predict_many, predict_max_batch
from autofit.predict.distributed import sharding_note
from autofit.search.events import EventHandler, emitter
from autofit.search.plan import (
    Plan,
    choose_strategy,
    nothing_fits_message,
    plan_limits,
    settings_of,
)
from autofit.search.results import SettingSummary, TuneResult
from autofit.search.searches import (
    Search,
    ranks_entry,
    search_max_batch,
    search_max_input,
    search_throughput,
    verify_best,
)
from autofit.search.study import Ledger, open_study
from autofit.search.targets import configure_targets
from autofit.spec import ExperimentSpec
from autofit.trials.ranks import spec_shortfall
from autofit.trials.result import TrialResult
from autofit.trials.runner import prestart, run_trial

SEARCHES = {
    Objective.MAX_BATCH: search_max_batch,
    Objective.MAX_INPUT_SIZE: search_max_input,
    Objective.MAX_THROUGHPUT: search_throughput,
}


def predict_settings(spec: ExperimentSpec, plan: Plan, settings: list[Setting],
                     say: Callable[[str], None]) -> dict[Setting, MaxBatchEstimate]:
    """The predicted largest batch of every setting (quick two-trace ranking past two)."""
    from autofit.trials.runner import running_server

    exact = len(settings) <= 2
    confirm = not trials_confirm(spec, plan, settings)
    bases = [setting.candidate(spec.search.batch_size.min) for setting in settings]

    def report(i: int, pred: MaxBatchEstimate) -> None:
        say(f"predicted max batch {pred.batch_size:>6} at "
            f"{bases[i].with_batch(pred.batch_size).label()} "
            f"({pred.traces} traces, {pred.seconds:.1f} s"
            + ("" if pred.confirmed else "; two traces paired event by event, the trials at "
               "it and one above confirm it") + ")")

    # past two settings, a process forked from the trial fork server traces from the last
    # setting down meanwhile (``predict_many``: needs the trace cache)
    found = predict_many(spec, bases, plan.device_model, plan.limit_bytes, exact=exact,
                         server=running_server(), on_each=report, confirm=confirm)
    return dict(zip(settings, found, strict=True))


def trials_confirm(spec: ExperimentSpec, plan: Plan, settings: list[Setting]) -> bool:
    """Whether the first real trials stand in for the prediction's confirming trace.

    A max-batch search of one setting on a CPU device model, without ranks (``tune`` and
    ``tune --workers`` alike): its next step is the trial at the predicted batch and the one
    above it, which prove the boundary, so the trace above it (on a CPU about as long as such
    a trial) would only repeat them. The prediction then comes from two traces paired event
    by event (``batch_curve``), and a trial at or below it that runs out of memory has it
    pinned by traces (``searches.pin_setting``). Not with several settings (ranked on their
    predictions), ranks, or CUDA (a trial costs far more than a trace there)."""
    return (len(settings) == 1 and spec.search.objective == Objective.MAX_BATCH
            and plan.device_model.kind == "cpu" and spec.parallel.strategies == ("none",))


def run_search(spec: ExperimentSpec, *, out_dir: str | Path | None = None, resume: bool = False,
               storage: str | None = None, device: str | None = None,
               on_event: EventHandler | None = None,
               runner: Callable[..., TrialResult] = run_trial) -> TuneResult:
    """Find the best configuration of ``spec`` with real trials (see module docstring).

    ``out_dir`` holds the optuna journal (resume) unless ``storage`` (an RDB URL) is given.
    ``runner`` is the trial function (tests inject OOM landscapes through it). Raises
    ``TuneFailed`` (``TuneInterrupted`` on Ctrl-C) with every finished trial in ``partial``.
    The first fitting trial of each setting calibrates the trace (``predict.calibrate``):
    the corrections apply to every later prediction and the targets, and are kept in
    ``<out_dir>/calibration.json`` (resumed, with the study) and in the result.
    """
    store = (calib.load_for(spec, out_dir) if out_dir is not None  # probed on this spec
             else calib.CalibrationStore(spec_key=calib.spec_key(spec)))
    with calib.using(store):
        result = _run_search(spec, out_dir=out_dir, resume=resume, storage=storage,
                             device=device, on_event=on_event, runner=runner, store=store)
    result.calibration = store.to_dict() if store.calibrations else {}
    return result


def out_of_process(runner: Callable[..., TrialResult]) -> bool:
    """Whether ``runner`` runs each trial in another process (``run_trial``, or a runner
    marked ``out_of_process = True``): this process only waits meanwhile, so the probe
    calibration's trace can run beside the trial (``calib.PendingTrace``)."""
    return runner is run_trial or bool(getattr(runner, "out_of_process", False))


def _calibrating(runner: Callable[..., TrialResult], store: calib.CalibrationStore,
                 out_dir: str | Path | None, search: Callable[[], Search | None]
                 ) -> Callable[..., TrialResult]:
    """``runner`` that calibrates the trace on the first fitting trial of each setting key.

    With an out-of-process runner, a trial that would calibrate if it fits (its setting key
    not calibrated yet, predicted to fit) has its candidate's plain trace started beside it
    where there is room (``room_beside_trial``);
    the calibration then reads that trace instead of tracing after the trial. The thread is
    always waited for before this returns (nothing else traces meanwhile)."""
    overlap = out_of_process(runner)

    def run(spec: ExperimentSpec, candidate: Any, **kwargs: Any) -> TrialResult:
        s = search()
        pending = _pending_trace(s, store, candidate) if overlap and s is not None else None
        try:
            result = runner(spec, candidate, **kwargs)
            if s is not None:
                calibrate_on(s, store, result, out_dir, pending=pending)
        finally:
            if pending is not None:
                pending.join()
        return result

    return run


def _pending_trace(search: Search, store: calib.CalibrationStore,
                   candidate: Any) -> calib.PendingTrace | None:
    """The plain trace ``calibrate_on`` would need if this trial fits, started now; None
    when it would not calibrate (rank trial, key calibrated) or the trial is predicted not
    to fit (a trace for a calibration that would then not happen)."""
    from autofit.parallel import spec_for

    model = search.plan.device_model
    if spec_for(search.spec, candidate).parallel.strategy != "none" \
            or calib.setting_key(candidate, model.kind) in store.calibrations \
            or not room_beside_trial(search.spec, model.kind):
        return None
    for setting, pred in search.predictions.items():
        if setting.candidate(candidate.batch_size) == candidate:
            if not 0 < candidate.batch_size <= pred.batch_size:
                return None
            return calib.PendingTrace(search.spec, candidate, model)
    return None


def room_beside_trial(spec: ExperimentSpec, device_kind: str) -> bool:
    """Whether a trace in this process can run beside a trial without slowing it: a CUDA
    trial steps on the GPU; a CPU trial steps on torch's intra-op threads, so only with one
    thread (``OMP_NUM_THREADS=1``; unset, torch takes every core) and a CPU idle now
    (``trace.idle_cpu``), and never under ``max_throughput``, whose trials' step times decide
    the answer. On a busy machine the trace would take CPU from the trial beside it (measured:
    the wait saved, the wall unchanged)."""
    import os

    if device_kind == "cuda":
        return True
    if spec.search.objective == Objective.MAX_THROUGHPUT \
            or os.environ.get("OMP_NUM_THREADS", "").strip() != "1":
        return False
    from autofit.predict.trace import idle_cpu

    return idle_cpu()


def calibrate_on(search: Search, store: calib.CalibrationStore, result: TrialResult,
                 out_dir: str | Path | None, pending: calib.PendingTrace | None = None) -> None:
    """Calibrate from ``result`` unless its setting key already is; say what was corrected
    and let the settings it covers be re-predicted when they are searched. ``pending``: the
    trial candidate's plain trace, started beside the trial (``_calibrating``)."""
    model = search.plan.device_model
    if result.extra.get("world_size"):
        return  # a rank trial: its ops are local shards, the trace's are DTensor ops
    if not result.fits or not result.op_log or \
            calib.setting_key(result.candidate, model.kind) in store.calibrations:
        return
    try:
        cal = calib.calibrate_from_trial(search.spec, result, model, store, pending=pending)
    except AutofitError as exc:
        search.say(f"probe calibration skipped: {exc}", note=True)
        return
    if cal is None:
        return
    for message in cal.messages:
        search.say(f"calibration: {message}", note=True)
    if out_dir is not None:
        try:
            store.save(Path(out_dir) / calib.CALIBRATION_FILE)
        except OSError:
            pass
    if cal.ops or cal.unexplained_slope:
        for setting, pred in search.predictions.items():
            if calib.setting_key(setting.candidate(1), model.kind) == cal.key:
                # in place: a pinner under way holds this very object
                fresh = predict_max_batch(search.spec, setting.candidate(
                    search.spec.search.batch_size.min), model, search.plan.limit_bytes,
                    exact=pred.exact, confirm=pred.confirmed)
                vars(pred).update(vars(fresh))


def _run_search(spec: ExperimentSpec, *, out_dir: str | Path | None, resume: bool,
                storage: str | None, device: str | None, on_event: EventHandler | None,
                runner: Callable[..., TrialResult], store: calib.CalibrationStore) -> TuneResult:
    started = time.perf_counter()
    emit = emitter(on_event)
    plan = plan_limits(spec, device)
    job_spec, short = spec, spec_shortfall(spec, plan.device)
    if short is not None:  # fewer GPUs than ranks: search and verify at the largest world size
        spec = with_world_size(spec, short.verified_world_size)
        plan.notes.append(short.note())
    strategy = choose_strategy(spec)
    study = open_study(spec, Path(out_dir) if out_dir is not None else None, storage, resume)
    holder: list[Search] = []
    ledger = Ledger(spec, plan.limit_bytes, plan.device, study,
                    _calibrating(runner, store, out_dir, lambda: holder[0] if holder else None),
                    emit, spec.search.max_trials)
    search = Search(spec, plan, {}, {}, ledger, emit, strategy, study)
    holder.append(search)
    for note in plan.notes:
        search.say(note, note=True)
    if strategy is not spec.search.strategy and spec.search.strategy != "auto":
        search.say(f"search.strategy {spec.search.strategy} does not apply to "
                   f"{spec.search.objective}: ran {strategy}", note=True)
    if ledger.cache:
        search.say(f"resuming: {len(ledger.cache)} finished trials loaded from the study; "
                   f"none will be repeated")
    elif resume:
        search.say("--resume: the study holds no finished trial; started fresh", note=True)
    if runner is run_trial:
        prestart()  # the fork server's torch import overlaps the traces
    settings = settings_of(spec)
    t0 = time.perf_counter()
    search.predictions = predict_settings(spec, plan, settings, search.say)
    predict_s = time.perf_counter() - t0
    search.summaries = {st: SettingSummary(st, p.batch_size) for st, p in search.predictions.items()}
    sharding = sharding_note(spec, plan.device_model, plan.limit_bytes, search.predictions)
    if sharding:  # nothing is predicted to fit one rank as the spec runs it
        search.say(sharding, note=True)
    for record in list(ledger.cache.values()):  # resumed trials calibrate as new ones do
        calibrate_on(search, store, record.result, out_dir)

    def partial() -> TuneResult:
        return _result(search, predict_s, started)

    try:
        best = SEARCHES[spec.search.objective](search, settings)
        if best is not None and spec.search.verify_steps > 0:
            best = verify_best(search, best)
        if best is None:
            raise SearchError(nothing_fits_message(spec, plan, settings, sharding))
    except KeyboardInterrupt:
        raise TuneInterrupted(partial()) from None
    except AutofitError as exc:
        raise TuneFailed(exc, partial()) from exc
    result = partial()
    result.best = best
    if short is not None:  # the answer at the job's own world size, marked predicted-only
        result.ranks = ranks_entry(job_spec, best, plan, short)
        result.notes.append(result.ranks["note"])
    result.targets = configure_targets(spec, best, plan, ledger.runner, emit)
    result.wall_time_s = time.perf_counter() - started
    return result


def _result(search: Search, predict_s: float, started: float) -> TuneResult:
    plan = search.plan
    return TuneResult(
        spec=search.spec, device=plan.device_info, budget_bytes=plan.budget_bytes,
        limit_bytes=plan.limit_bytes, strategy=search.strategy, best=None,
        trials=list(search.ledger.records), settings=list(search.summaries.values()),
        notes=search.notes, predict_s=predict_s,
        curves={k.key: v.to_dict() for k, v in search.predictions.items()},
        wall_time_s=time.perf_counter() - started,
    )
