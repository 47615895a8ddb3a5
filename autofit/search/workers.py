"""Many workers on one optuna study: settings handed out through the storage, and leases.

Every worker (``autofit worker``, or one of the processes ``autofit tune --workers N`` starts)
opens the same study (``create_study(load_if_exists)``) in a shared storage: PostgreSQL or any
RDB URL across nodes, or a journal file on one host. The worker that creates the study
enqueues the work: one WAITING trial per setting, in the order the objective's search visits
them, then one ``finish`` item. A worker claims an item the way optuna's ``ask()`` pops an
enqueued trial (WAITING -> RUNNING, which exactly one process wins), and pins that setting
with the same pinner the single-process search uses; each measured trial is its own COMPLETE
(or FAIL) trial, written as soon as it is measured.

ask/tell has no heartbeat, so a claim carries a lease in the study's user attrs
(``autofit_lease:<trial number>``), renewed by a thread. A claim whose lease is older than
``lease_s`` (or whose process is gone, on the same host) is put back to WAITING by whichever
worker notices; the next claimant reloads the study first, so the dead worker's measured
trials are recalled, never re-run.

When no setting is waiting or running, one worker claims ``finish`` and replays the
objective's own search over the study (the single-process code, every trial answered from the
study, anything missing run now), verifies the winner and configures the targets. Any worker
or ``autofit results`` assembles the same result from a finished study.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from autofit.candidate import Candidate, Setting
from autofit.choices import Objective, Precision, Purpose, Strategy
from autofit.errors import AutofitError, SearchError, TuneFailed, TuneInterrupted
from autofit.search.events import EventHandler, Note, TrialFinished, emitter
from autofit.search.plan import choose_strategy, nothing_fits_message, plan_limits, settings_of
from autofit.search.results import SettingSummary, TrialRecord, TuneResult
from autofit.search.study import Ledger, _key, search_space
from autofit.spec import ExperimentSpec
from autofit.trials.result import TrialResult

WORK_ATTR = "autofit_work"
"""User attr of a work-item trial: ``{"kind": "setting" | "finish", "setting": key}``."""
QUEUED_ATTR = "autofit_queued"
"""Study user attr: the work items are all enqueued (their count)."""
TARGETS_ATTR = "autofit_targets"
"""Study user attr: the target configs the finishing worker wrote (verified on its device)."""
LIMIT_ATTR = "autofit_limit"
"""Study user attr: the memory limit (and device) every worker of the study measures under."""
TARGET_ATTR = "autofit_target"
"""Study user attr of a target's study (``worker --target``): the target's measured config."""
LEASE_PREFIX = "autofit_lease:"
"""Study user attr per claimed work item: who holds it, and when it was last renewed."""

LEASE_S = 60.0
"""A claim not renewed for this long is stale (a worker on another node died)."""
RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Backoff (seconds) of a storage operation that fails mid-run before the worker stops."""


class StorageUnavailable(AutofitError):
    """The study's storage cannot be reached (at start, or after the retries mid-run)."""


# -- storage ------------------------------------------------------------------------------

def describe_storage(url: str) -> str:
    """The URL with its password hidden (for messages)."""
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL sqlalchemy cannot parse is shown without its host part
        return url.split("://", 1)[0] + "://..."


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def journal_path(url: str) -> str | None:
    """The file of a journal storage URL (``journal:PATH`` or ``PATH``); None for an RDB URL."""
    if url.startswith("journal:") or ("://" not in url):
        return url[len("journal:"):] if url.startswith("journal:") else url
    return None


def open_storage(url: str) -> Any:
    """An optuna storage for ``url``: an RDB URL (``postgresql+psycopg://...``, ``sqlite:///...``)
    or a journal file (``journal:PATH``, or a path ending in ``.journal``).

    Raises:
        StorageUnavailable: one line: the driver is missing, or the server refused or is down.
    """
    import optuna

    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return JournalStorage(JournalFileBackend(path))
        except OSError as exc:
            raise StorageUnavailable(f"cannot open journal storage {path}: "
                                     f"{exc.strerror or exc}") from None
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            except Exception as exc:  # noqa: BLE001
                # workers starting together on an empty database race to create its tables
                if attempt == 4 or type(exc).__name__ not in ("IntegrityError", "ProgrammingError"):
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover
    except ModuleNotFoundError as exc:
        extra = " (pip install 'autofit[postgres]')" if url.startswith("postgresql") else ""
        raise StorageUnavailable(f"cannot open storage {describe_storage(url)}: the database "
                                 f"driver is not installed: {exc}{extra}") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors of every kind
        raise StorageUnavailable(f"cannot open storage {describe_storage(url)}: "
                                 f"{_first_line(exc)}") from None


def _transient(exc: BaseException) -> bool:
    import optuna

    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy ships with optuna
        return isinstance(exc, OSError)
    return isinstance(exc, OperationalError | DBAPIError | OSError
                      | optuna.exceptions.StorageInternalError)


def retry(op: Callable[[], Any], what: str, delays: tuple[float, ...] = RETRIES,
          say: Callable[[str], None] | None = None) -> Any:
    """Run a storage operation; on a connection error retry with backoff, then give up with
    one line (``StorageUnavailable``)."""
    for attempt in range(len(delays) + 1):
        try:
            return op()
        except Exception as exc:  # noqa: BLE001 - filtered by _transient
            if not _transient(exc):
                raise
            if attempt == len(delays):
                raise StorageUnavailable(
                    f"storage unreachable while {what} (gave up after {len(delays)} retries "
                    f"over {sum(delays):.0f} s): {_first_line(exc)}") from None
            if say is not None:
                say(f"storage error while {what}: {_first_line(exc)}; retrying in "
                    f"{delays[attempt]:g} s")
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")  # pragma: no cover


def study_name(spec: ExperimentSpec, target: str | None = None) -> str:
    """``autofit-<name>-<hash>``; a target's own study (``worker --target``) adds ``@<slug>``."""
    base = f"autofit-{spec.name}-{spec.spec_hash()}"
    return base if target is None else f"{base}@{_target_slug(spec, target)}"


# -- targets measured on their own GPU type ------------------------------------------------

def _target_slug(spec: ExperimentSpec, name: str) -> str:
    from autofit.export.targets import target_slugs

    slugs = target_slugs([{"name": t.name} for t in spec.targets])
    return slugs[[t.name for t in spec.targets].index(name)]


def find_target(spec: ExperimentSpec, name: str) -> Any:
    """The spec's target called ``name`` (or by its slug); one line listing them otherwise."""
    from autofit.export.targets import target_slugs

    slugs = target_slugs([{"name": t.name} for t in spec.targets])
    for target, slug in zip(spec.targets, slugs, strict=True):
        if name in (target.name, slug):
            return target
    known = ", ".join(t.name for t in spec.targets) or "none (add targets: [{name, memory}])"
    raise AutofitError(f"--target {name!r}: the spec has no such target (targets: {known})")


def target_spec(spec: ExperimentSpec, target: Any, device: str | None) -> ExperimentSpec:
    """The spec as measured on ``target``'s own GPU type: the budget is the target's memory
    (on CUDA less the CUDA context, as the predicted target rows count it; on a CPU the
    target's memory is the budget the CPU trials enforce), fp16 for bf16 where the target has
    no bf16, no targets of its own. The raw spec (and so its hash) is unchanged."""
    from autofit.device import resolve_device
    from autofit.predict.device_model import CUDA_DEFAULT

    on_cuda = (device or resolve_device(spec.device)).startswith("cuda")
    budget = target.memory_bytes - (CUDA_DEFAULT.context_bytes if on_cuda else 0)
    if budget <= 0:
        raise AutofitError(f"target {target.name}: memory {target.memory_text} leaves nothing "
                           f"after the CUDA context")
    precisions = spec.search.precisions
    if not target.bf16:
        precisions = tuple(dict.fromkeys(Precision.FP16 if p == Precision.BF16 else p
                                         for p in precisions))
    return replace(spec, targets=(),
                   memory=replace(spec.memory, budget_bytes=budget,
                                  budget_text=f"{target.memory_text} (target {target.name})"),
                   search=replace(spec.search, precisions=precisions))


def measured_on(plan: Any) -> str:
    """The device that measured a study: the GPU's name, or the CPU and its host."""
    name = str(plan.device_info.get("name") or plan.device)
    if plan.device_info.get("kind") == "cuda":
        return name
    return f"CPU {name} on {socket.gethostname()}"


def target_entry(target: Any, result: TuneResult, plan: Any) -> dict[str, Any]:
    """A ``targets`` row for a target measured on its own device (its study's winner)."""
    from autofit.units import format_bytes

    assert result.best is not None
    best = result.best
    candidate = best.result.candidate
    device = measured_on(plan)
    real = len(result.trials)
    return {
        "name": target.name, "memory_bytes": target.memory_bytes, "bf16": target.bf16,
        "precision": candidate.precision.value, "checkpoint_segments": candidate.checkpoint_segments,
        "input_size": candidate.input_size, "batch_size": candidate.batch_size,
        "predicted_peak_bytes": best.predicted_peak_bytes,
        "measured_peak_bytes": best.result.peak_bytes,
        "samples_per_s": best.result.samples_per_s,
        "verified": True, "failed": False, "measured": True, "measured_on": device,
        "limit_bytes": plan.limit_bytes,
        "note": (f"measured on {device} by `autofit worker --target` ({real} trials under "
                 f"{format_bytes(plan.limit_bytes)}, the target's memory less the margin)"),
    }


def with_measured_targets(spec: ExperimentSpec, storage: Any,
                          targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``targets`` with each row a target's own study has measured replaced by that
    measurement (the predicted batch kept as ``predicted_batch_size``); a target whose study
    is still working says so in its note."""
    import optuna

    names = set(retry(lambda: optuna.get_all_study_names(storage), "listing studies"))
    out = []
    for entry in targets:
        name = study_name(spec, entry["name"]) if any(
            t.name == entry.get("name") for t in spec.targets) else None
        if name is None or name not in names:
            out.append(entry)
            continue
        study = retry(lambda name=name: optuna.load_study(study_name=name, storage=storage),
                      "opening a target's study")
        measured = retry(lambda study=study: study.user_attrs, "reading a target's study"
                         ).get(TARGET_ATTR)
        if measured is None:
            pending = WorkQueue(study, "check").pending("setting")
            out.append({**entry, "note": f"{entry.get('note', '')}; being measured on its own "
                                         f"GPU type (study {name}: {pending} setting(s) "
                                         f"left)"})
            continue
        out.append({**measured, "predicted_batch_size": entry.get("batch_size")})
    return out


# -- the queue and its leases --------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    """Is the process there and not a zombie (killed, not yet waited for by its parent)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


@dataclass
class Item:
    """A claimed work item."""

    trial_id: int
    number: int
    kind: str
    setting_key: str | None


class WorkQueue:
    """Work items as enqueued trials of the study; claims, leases, stale-claim recovery."""

    def __init__(self, study: Any, worker_id: str, lease_s: float = LEASE_S,
                 say: Callable[[str], None] | None = None) -> None:
        self.study = study
        self.storage = study._storage
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.say = say or (lambda message: None)
        self.host = socket.gethostname()
        self.pid = os.getpid()

    def _call(self, op: Callable[[], Any], what: str) -> Any:
        return retry(op, what, say=self.say)

    def items(self, *states: Any) -> list[Any]:
        """Work-item trials in these states (all states when none), by number."""
        def get() -> list[Any]:
            trials = self.study.get_trials(deepcopy=False, states=states or None)
            return [t for t in trials if WORK_ATTR in t.user_attrs]
        return sorted(self._call(get, "reading the work queue"), key=lambda t: t.number)

    @property
    def queued(self) -> bool:
        return QUEUED_ATTR in self._call(lambda: self.study.user_attrs, "reading the study")

    def enqueue(self, settings: list[Setting]) -> None:
        """The study's work: one item per setting, in order, then ``finish``."""
        for setting in settings:
            self.study.enqueue_trial(
                {"input_size": setting.input_size, "precision": setting.precision.value,
                 "checkpoint_segments": setting.checkpoint_segments},
                user_attrs={WORK_ATTR: {"kind": "setting", "setting": setting.key}})
        self.study.enqueue_trial({}, user_attrs={WORK_ATTR: {"kind": "finish"}})
        self.study.set_user_attr(QUEUED_ATTR, len(settings) + 1)

    def pending(self, kind: str) -> int:
        import optuna

        states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
        return sum(1 for t in self.items(*states) if t.user_attrs[WORK_ATTR]["kind"] == kind)

    def claim(self, kind: str) -> Item | None:
        """Take the first waiting item of ``kind`` (WAITING -> RUNNING: one process wins)."""
        import optuna

        for t in self.items(optuna.trial.TrialState.WAITING):
            work = t.user_attrs[WORK_ATTR]
            if work["kind"] != kind:
                continue
            try:
                won = self._call(lambda t=t: self.storage.set_trial_state_values(
                    t._trial_id, state=optuna.trial.TrialState.RUNNING), "claiming work")
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            if won:
                item = Item(t._trial_id, t.number, kind, work.get("setting"))
                self.renew(item)
                return item
        return None

    def _lease_key(self, item: Item) -> str:
        return f"{LEASE_PREFIX}{item.number}"

    def renew(self, item: Item) -> None:
        lease = {"worker": self.worker_id, "host": self.host, "pid": self.pid, "at": time.time()}
        self._call(lambda: self.study.set_user_attr(self._lease_key(item), lease),
                   "renewing a lease")

    def holds(self, item: Item) -> bool:
        """Is the item still this worker's claim (not reclaimed as stale meanwhile)?"""
        import optuna

        lease = self._call(lambda: self.study.user_attrs, "reading the study").get(
            self._lease_key(item), {})
        state = self._call(lambda: self.storage.get_trial(item.trial_id), "reading work").state
        return state is optuna.trial.TrialState.RUNNING and lease.get("worker") == self.worker_id

    def done(self, item: Item) -> None:
        """The item is finished (recorded PRUNED: a work item is no measurement)."""
        import optuna

        if not self.holds(item):  # reclaimed as stale meanwhile: its new holder finishes it
            return
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self._call(lambda: self.storage.set_trial_user_attr(
                item.trial_id, "done_by", self.worker_id), "finishing work")
            self._call(lambda: self.storage.set_trial_state_values(
                item.trial_id, state=optuna.trial.TrialState.PRUNED), "finishing work")

    def release(self, item: Item) -> None:
        """Give the item back (WAITING) for another worker: Ctrl-C, or a stop."""
        import optuna

        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, AutofitError):
            if self.holds(item):
                self._call(lambda: self.storage.set_trial_state_values(
                    item.trial_id, state=optuna.trial.TrialState.WAITING), "releasing work")

    def stale(self, trial: Any, leases: dict[str, Any], now: float) -> str | None:
        """Why a RUNNING item's claim is dead, or None while it is alive."""
        started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
        lease = leases.get(f"{LEASE_PREFIX}{trial.number}")
        if not lease or float(lease.get("at", 0.0)) < started - 1.0:
            # claimed, lease not written yet (or left from an earlier claim)
            return (f"claimed {now - started:.0f} s ago without a lease"
                    if now - started > self.lease_s else None)
        if lease.get("host") == self.host and lease.get("pid") != self.pid \
                and not _pid_alive(int(lease.get("pid", 0))):
            return f"worker {lease.get('worker')} (pid {lease.get('pid')}) is gone"
        if now - float(lease["at"]) > self.lease_s:
            return (f"worker {lease.get('worker')} has not renewed its lease for "
                    f"{now - float(lease['at']):.0f} s")
        return None

    def reap(self) -> list[int]:
        """Put every stale claim back to WAITING; returns the item numbers."""
        import optuna

        running = self.items(optuna.trial.TrialState.RUNNING)
        if not running:
            return []
        leases = self._call(lambda: self.study.user_attrs, "reading leases")
        reaped = []
        for t in running:
            why = self.stale(t, leases, time.time())
            if why is None:
                continue
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self._call(lambda t=t: self.storage.set_trial_state_values(
                    t._trial_id, state=optuna.trial.TrialState.WAITING), "re-queuing work")
                reaped.append(t.number)
                work = t.user_attrs[WORK_ATTR]
                self.say(f"re-queued {work.get('setting') or work['kind']} (work item "
                         f"{t.number}): {why}")
        return reaped


class Heartbeat:
    """Renews a claim's lease every ``lease_s / 4`` from a thread while the item runs."""

    def __init__(self, queue: WorkQueue, item: Item) -> None:
        self.queue, self.item = queue, item
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="autofit-lease")

    def _run(self) -> None:
        while not self.stop.wait(self.queue.lease_s / 4):
            with contextlib.suppress(Exception):  # a missed renewal is retried next beat
                self.queue.renew(self.item)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


# -- measured trials, written without ask() (which would pop a work item) ------------------

class WorkerLedger(Ledger):
    """The tuner's ledger on a shared study: ``refresh`` reloads every worker's trials, and
    each measured trial is created directly (never through ``ask()``, which pops work)."""

    own: set[int]

    def refresh(self) -> None:
        """Reload every worker's finished trials (this worker's own stay not 'resumed')."""
        retry(self._load, "loading the study's trials")
        own = getattr(self, "own", set())
        for key, record in self.cache.items():
            if record.number in own and record.resumed:
                self.cache[key] = replace(record, resumed=False)

    def _store(self, candidate: Candidate, result: TrialResult, purpose: Purpose,
               predicted_peak: int | None, steps: int, asked: Any = None) -> int:
        import optuna

        study = self.study

        def store() -> int:
            storage = study._storage
            tid = storage.create_new_trial(study._study_id)
            storage.set_trial_system_attr(tid, "fixed_params", candidate.to_dict())
            trial = optuna.trial.Trial(study, tid)
            for name, dist in search_space(self.spec).items():
                if name == "batch_size":
                    trial.suggest_int(name, dist.low, dist.high)
                else:
                    trial.suggest_categorical(name, dist.choices)
            trial.set_user_attr("worker", getattr(self, "worker_id", ""))  # who measured it
            return Ledger._store(self, candidate, result, purpose, predicted_peak, steps,
                                 asked=trial)

        number = retry(store, "recording a trial")
        self.own = getattr(self, "own", set()) | {number}
        return number


def measured_trials(study: Any) -> list[Any]:
    """Every finished trial of the study that holds a measurement (work items excluded)."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in done and "result" in t.user_attrs and WORK_ATTR not in t.user_attrs]


def duplicates(study: Any) -> int:
    """Measured trials that repeat another's (candidate, steps, verification) exactly."""
    seen: set[tuple] = set()
    dup = 0
    for t in measured_trials(study):
        result = TrialResult.from_dict(t.user_attrs["result"])
        key = (_key(result.candidate, int(t.user_attrs.get("steps", 0))),
               t.user_attrs.get("purpose") == Purpose.VERIFY.value)
        dup += key in seen
        seen.add(key)
    return dup


# -- the worker ----------------------------------------------------------------------------

def work_order(search: Any, settings: list[Setting]) -> list[Setting]:
    """Settings in the order the objective's single-process search visits them."""
    from autofit.search.searches import _throughput_candidates

    p = search.predictions
    objective = search.spec.search.objective
    if objective == Objective.MAX_BATCH:
        return sorted(settings, key=lambda st: (-p[st].batch_size, st.checkpoint_segments,
                                                st.precision != "fp32"))
    if objective == Objective.MAX_THROUGHPUT:
        return _throughput_candidates(search, settings)
    return input_walk(search, settings)


def input_walk(search: Any, settings: list[Setting]) -> list[Setting]:
    """max_input_size: the (size, setting) trials ``search_max_input`` walks, in its order
    (sizes from the largest predicted to fit down; per size, cheapest compute first among the
    settings predicted to fit the minimum batch, then the leanest of the rest)."""
    spec, p = search.spec, search.predictions
    bmin = spec.search.batch_size.lowest
    order = {prec: i for i, prec in enumerate(spec.search.precisions)}
    fitting = [st.input_size for st in settings if p[st].batch_size >= bmin]
    top = max(fitting) if fitting else min(spec.input_sizes)
    walk = []
    for size in sorted((s for s in spec.input_sizes if s <= top), reverse=True):
        options = [st for st in settings if st.input_size == size]
        options.sort(key=lambda st: (False, st.checkpoint_segments, order[st.precision])
                     if p[st].batch_size >= bmin else (True, -p[st].batch_size, 0))
        walk += options
    return walk


def _best_fit(ledger: Ledger) -> int:
    return max((r.result.candidate.batch_size for r in ledger.cache.values()
                if r.result.fits), default=0)


def process_setting(search: Any, setting: Setting) -> None:
    """Measure one setting as the single-process search would (pin it, or time it)."""
    from autofit.search.searches import _time_setting, pin_setting

    search.ledger.refresh()  # a dead worker's trials of this setting are recalled, not re-run
    objective = search.spec.search.objective
    if objective == Objective.MAX_BATCH:
        best = _best_fit(search.ledger)
        predicted = search.predictions[setting].batch_size
        if best and predicted * 1.05 < best:
            search.say(f"skipping {setting.describe()}: predicted {predicted} cannot beat {best}")
            return
        pin_setting(search, setting)
    elif objective == Objective.MAX_THROUGHPUT:
        _time_setting(search, setting, None)
    else:  # max_input_size: this size's trial at the minimum batch, unless a larger size fits
        from autofit.search.pinner import BatchPinner

        bmin = search.spec.search.batch_size.lowest
        fitted = [r.result.candidate.input_size for r in search.ledger.cache.values()
                  if r.result.fits]
        if fitted and max(fitted) > setting.input_size:
            search.say(f"skipping {setting.describe()}: input size {max(fitted)} fits already")
            return
        pinner = BatchPinner(search.spec, setting, search.predictions[setting],
                             search.plan.limit_bytes)
        search.ledger.run(pinner.candidate(bmin), Purpose.PREDICTED, pinner.predicted_peak(bmin))


def finish(search: Any, settings: list[Setting], runner_for_targets: Any) -> TuneResult:
    """The objective's own search replayed over the study, verification, targets."""
    from autofit.search.searches import ranks_entry, verify_best
    from autofit.search.targets import configure_targets
    from autofit.search.tuner import SEARCHES

    ledger = search.ledger
    ledger.refresh()
    ledger.records = []
    ledger.max_trials = search.spec.search.max_trials
    emit = ledger.emit
    known = {record.number for record in ledger.cache.values()}
    # the replay recalls what the workers measured: only trials run now are news
    ledger.emit = lambda event: None if isinstance(event, TrialFinished) \
        and event.record.number in known else emit(event)
    try:
        best = SEARCHES[search.spec.search.objective](search, settings)
        if best is not None and search.spec.search.verify_steps > 0:
            best = verify_best(search, best)
    finally:
        ledger.emit = emit
    if best is None:
        raise SearchError(nothing_fits_message(search.spec, search.plan, settings))
    result = _with_all_trials(search)
    result.best = best
    short = getattr(search, "short", None)
    if short is not None:  # the answer at the job's own world size, as `tune` writes it
        result.ranks = ranks_entry(search.job_spec, best, search.plan, short)
        result.notes.append(result.ranks["note"])
    stored = retry(lambda: search.ledger.study.user_attrs, "reading the study").get(TARGETS_ATTR)
    if stored is not None and search.ledger.runner is _recall_only:
        result.targets = stored  # as the finishing worker configured them (on its device)
    else:
        result.targets = configure_targets(search.spec, best, search.plan, runner_for_targets,
                                           search.emit)
        retry(lambda: search.ledger.study.set_user_attr(TARGETS_ATTR, result.targets),
              "recording the targets")
    # targets measured on their own GPU type (``worker --target``) replace predicted rows
    result.targets = with_measured_targets(search.spec, search.ledger.study._storage,
                                           result.targets)
    return result


def _with_all_trials(search: Any) -> TuneResult:
    from autofit.search.tuner import _result

    result = _result(search, search.predict_s, search.started)
    listed = {r.number for r in result.trials}
    extra = []  # every measured trial of the study, those the replay did not visit too
    for t in retry(lambda: measured_trials(search.ledger.study), "loading the study's trials"):
        if t.number in listed:
            continue
        attrs = t.user_attrs
        extra.append(TrialRecord(number=t.number, purpose=Purpose(attrs.get("purpose", "predicted")),
                                 result=TrialResult.from_dict(attrs["result"]),
                                 predicted_peak_bytes=attrs.get("predicted_peak_bytes"),
                                 steps=int(attrs.get("steps", 0)),
                                 resumed=t.number not in getattr(search.ledger, "own", set())))
    result.trials = sorted(result.trials + extra, key=lambda r: r.number)
    return result


def _recall_only(spec: ExperimentSpec, candidate: Candidate, **_: Any) -> TrialResult:
    raise AutofitError(f"the study has no trial of {candidate.label()} yet: its work is not "
                       f"finished (run `autofit worker` against it)")


def open_worker_study(spec: ExperimentSpec, storage_url: str, *, create: bool,
                      say: Callable[[str], None], name: str | None = None) -> tuple[Any, bool]:
    """The spec's study (or ``name``: a target's) in the shared storage: (study, created).

    Refuses a storage whose same-named spec with a different hash still has work running.
    """
    import optuna

    from autofit.search.study import _sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = name or study_name(spec)
    mine = study_name(spec)  # this spec's studies: its own and its targets' (``@<slug>``)
    where = describe_storage(storage_url)
    journal = journal_path(storage_url)
    if not create and journal is not None and not os.path.exists(journal):
        # opening would create the file (and its dir) only to say it is empty
        raise AutofitError(f"{where} holds no study {name!r} for this spec (studies: none)")
    storage = open_storage(storage_url)

    def names() -> list[str]:
        return optuna.get_all_study_names(storage)

    existing = retry(names, "listing studies")
    for other in existing:
        if other in (name, mine) or other.startswith(f"{mine}@") \
                or not other.startswith(f"autofit-{spec.name}-"):
            continue
        queue = WorkQueue(optuna.load_study(study_name=other, storage=storage), "check")
        if queue.pending("setting") or queue.pending("finish"):
            raise AutofitError(
                f"{where}: the study {other!r} of a different spec named {spec.name!r} still "
                f"has work pending (this spec's hash is {spec.spec_hash()}); run the workers "
                f"with the same spec file, or give this spec another name")
    if name in existing:
        return retry(lambda: optuna.load_study(study_name=name, storage=storage,
                                               sampler=_sampler(spec)), "opening the study"), False
    if not create:
        raise AutofitError(f"{where} holds no study {name!r} for this spec "
                           f"(studies: {', '.join(existing) or 'none'})")
    try:
        study = retry(lambda: optuna.create_study(study_name=name, storage=storage,
                                                  sampler=_sampler(spec), direction="maximize"),
                      "creating the study")
        return study, True
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
        say(f"joined the study {name} another worker created")
        return optuna.load_study(study_name=name, storage=storage, sampler=_sampler(spec)), False


def run_worker(spec: ExperimentSpec, storage: str, *, device: str | None = None,
               worker_id: str | None = None, on_event: EventHandler | None = None,
               runner: Callable[..., TrialResult] | None = None, lease_s: float = LEASE_S,
               poll_s: float = 1.0, assemble_only: bool = False,
               target: str | None = None) -> TuneResult:
    """Work on the spec's study in ``storage`` until it is finished; return the result.

    ``assemble_only``: run nothing, answer from the study (``autofit results``); raises
    ``TuneFailed`` with the partial result while work is pending.
    ``target``: measure that target of the spec on this device instead, in the target's own
    study (``target_spec``: its memory is the budget); the finishing worker records the
    winner as the target's measured row (``TARGET_ATTR``), which every assembly of the
    spec's own study then puts into ``targets`` in place of the predicted one.
    Raises ``TuneFailed`` (``TuneInterrupted`` on Ctrl-C) with every trial of the study in
    ``partial``; ``StorageUnavailable`` when the storage cannot be opened.
    """
    from autofit.search.searches import Search
    from autofit.search.tuner import predict_settings
    from autofit.trials.runner import prestart, run_trial

    started = time.perf_counter()
    emit = emitter(on_event)
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    runner = runner or run_trial
    if assemble_only:
        runner = _recall_only
    name, measuring = None, None
    if target is not None:
        measuring = find_target(spec, target)
        name = study_name(spec, measuring.name)
        spec = target_spec(spec, measuring, device)
    plan = plan_limits(spec, device)
    from autofit.trials.ranks import spec_shortfall

    job_spec = spec
    if (short := spec_shortfall(spec, plan.device)) is not None:  # fewer GPUs than ranks
        from autofit.parallel import with_world_size

        spec = with_world_size(spec, short.verified_world_size)  # raw (and hash) unchanged
        plan.notes.append(short.note())
    study, created = open_worker_study(spec, storage, create=not assemble_only,
                                       say=lambda m: emit(Note(m)), name=name)
    ledger = WorkerLedger(spec, plan.limit_bytes, plan.device, study, runner, emit, 0)
    ledger.worker_id = worker_id  # type: ignore[attr-defined]
    search = Search(spec, plan, {}, {}, ledger, emit, Strategy.BINARY, None)
    search.started, search.predict_s = started, 0.0  # type: ignore[attr-defined]
    search.job_spec, search.short = job_spec, short  # type: ignore[attr-defined]
    for note in plan.notes:
        search.say(note, note=True)
    if choose_strategy(spec) is Strategy.OPTUNA:
        search.say("workers hand settings out in predicted order: the optuna sampler's "
                   "one-at-a-time proposals do not apply (strategy binary)", note=True)
    if runner is run_trial:
        prestart()
    settings = settings_of(spec)
    t0 = time.perf_counter()
    search.predictions = predict_settings(spec, plan, settings, search.say)
    search.predict_s = time.perf_counter() - t0  # type: ignore[attr-defined]
    search.summaries = {st: SettingSummary(st, p.batch_size) for st, p in search.predictions.items()}
    queue = WorkQueue(study, worker_id, lease_s, search.say)
    if created:
        _same_limit(study, plan, created)
        retry(lambda: queue.enqueue(work_order(search, settings)), "queuing the work")
        search.say(f"created the study {study.study_name} and queued "
                   f"{len(work_order(search, settings))} setting(s)")
    item: Item | None = None
    try:
        _wait_queued(queue, lease_s, poll_s)
        if not created:
            _same_limit(study, plan, created)
        if assemble_only:
            pending = queue.pending("setting") + queue.pending("finish")
            if pending:
                raise AutofitError(f"the study is not finished: {pending} work item(s) waiting "
                                   f"or running (start `autofit worker` to finish it)")
            return _done(search, finish(search, settings, runner), started)
        by_key = {st.key: st for st in settings}
        while True:
            queue.reap()
            item = queue.claim("setting")
            if item is not None:
                setting = by_key[item.setting_key]
                search.say(f"{worker_id}: measuring {setting.describe()}")
                with Heartbeat(queue, item):
                    process_setting(search, setting)
                queue.done(item)
                item = None
                continue
            if queue.pending("setting"):
                time.sleep(poll_s)
                continue
            item = queue.claim("finish")
            if item is not None:
                with Heartbeat(queue, item):
                    result = finish(search, settings, runner)
                    if measuring is not None:
                        row = target_entry(measuring, result, plan)
                        retry(lambda row=row: study.set_user_attr(TARGET_ATTR, row),
                              "recording the target's measurement")
                        search.say(f"target {measuring.name}: batch {row['batch_size']} "
                                   f"{row['precision']} ckpt={row['checkpoint_segments']}, "
                                   f"measured on {row['measured_on']}")
                queue.done(item)
                item = None
                return _done(search, result, started)
            if queue.pending("finish"):
                time.sleep(poll_s)
                continue
            # finished by another worker: the same answer, from the study
            search.ledger.runner = _recall_only
            return _done(search, finish(search, settings, runner), started)
    except KeyboardInterrupt:
        if item is not None:
            queue.release(item)
        raise TuneInterrupted(_partial(search)) from None
    except AutofitError as exc:
        if item is not None:
            queue.release(item)
        raise TuneFailed(exc, _partial(search)) from exc


def _same_limit(study: Any, plan: Any, created: bool) -> None:
    """Every worker of a study measures under the same limit: the first one's."""
    mine = {"limit_bytes": plan.limit_bytes, "device": str(plan.device_info.get("name"))}
    if created:
        retry(lambda: study.set_user_attr(LIMIT_ATTR, mine), "recording the limit")
        return
    theirs = retry(lambda: study.user_attrs, "reading the study").get(LIMIT_ATTR)
    if theirs is not None and int(theirs["limit_bytes"]) != plan.limit_bytes:
        raise AutofitError(
            f"the study {study.study_name} measures under {theirs['limit_bytes']} bytes "
            f"({theirs['device']}); this worker's limit is {plan.limit_bytes} bytes "
            f"({mine['device']}): workers of one study need the same memory limit (set "
            f"memory.budget, or measure each GPU type as a target of the spec: "
            f"`autofit worker --target NAME`)")


def _wait_queued(queue: WorkQueue, lease_s: float, poll_s: float) -> None:
    deadline = time.time() + lease_s
    if not queue.queued and not queue.items():
        found = retry(lambda: measured_trials(queue.study), "loading the study's trials")
        if found:  # a single-process study: no worker will ever queue its work
            raise AutofitError(
                f"the study {queue.study.study_name} holds {len(found)} trial(s) of a plain "
                f"`autofit tune` (no work queue): workers cannot join it; start over with "
                f"`autofit tune --workers N --force` (deletes it), or use another --out or "
                f"--storage")
    while not queue.queued:
        if time.time() > deadline:
            raise AutofitError(f"the study {queue.study.study_name} exists but its work was "
                               f"never queued (its first worker stopped at start); delete it "
                               f"(`optuna delete-study`) and start again")
        time.sleep(poll_s)


def _partial(search: Any) -> TuneResult:
    with contextlib.suppress(Exception):
        search.ledger.refresh()
    return _with_all_trials(search)


def _done(search: Any, result: TuneResult, started: float) -> TuneResult:
    result.wall_time_s = time.perf_counter() - started
    return result
