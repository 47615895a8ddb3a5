"""The three objectives' searches over settings, and the verification of the winner.

``max_batch`` pins settings in order of predicted max batch and stops when none left can
beat the best; ``max_input_size`` walks sizes down from the largest predicted to fit;
``max_throughput`` measures samples/s at each promising setting's largest fitting batch.
The winner is re-run over ``verify_steps`` steps; if that fails the search steps down and
says so.

The strategy decides which setting is measured next: ``binary`` takes them in predicted
order; ``optuna`` takes the top-predicted one, then lets the TPE sampler propose among the
settings still in play, learning from every recorded trial (OOM constraints included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from autofit.candidate import Setting
from autofit.choices import LimitKind, Objective, Purpose, Strategy
from autofit.predict.batch_curve import MaxBatchEstimate, predict_max_batch
from autofit.search.events import Emit, Note
from autofit.search.pinner import BatchPinner
from autofit.search.plan import Plan, batch_cap_note
from autofit.search.results import SettingSummary, TrialRecord
from autofit.search.study import Ledger, objective_value, propose_setting
from autofit.spec import ExperimentSpec
from autofit.trials.result import TrialResult, TrialStatus

PROPOSALS_PER_PICK = 6
"""Sampler proposals tried before a pick falls back to predicted order."""


def _tie_key(record: TrialRecord) -> tuple[int, int, str]:
    """An exact tie (same objective, same samples/s): fewer checkpoint segments (no
    recomputation), then the lower peak (headroom), then the label. The winner must not hang
    on the order settings were visited: a workers' study replays the search ranked on exact
    predictions, the single process ranks on quick ones."""
    r = record.result
    return r.candidate.checkpoint_segments, r.peak_bytes or 0, r.candidate.label()


@dataclass
class Search:
    """The shared state of one search: predictions, per-setting summaries, the trial ledger."""

    spec: ExperimentSpec
    plan: Plan
    predictions: dict[Setting, MaxBatchEstimate]
    summaries: dict[Setting, SettingSummary]
    ledger: Ledger
    emit: Emit
    strategy: Strategy
    study: Any = None
    notes: list[str] = field(default_factory=list)

    def say(self, message: str, *, note: bool = False) -> None:
        if note:
            self.notes.append(message)
        self.emit(Note(message))

    def exact(self, setting: Setting) -> MaxBatchEstimate:
        """The setting's prediction pinned by traces (settings are ranked on quick ones)."""
        if not self.predictions[setting].exact:
            self.predictions[setting] = predict_max_batch(
                self.spec, setting.candidate(self.spec.search.batch_size.min),
                self.plan.device_model, self.plan.limit_bytes, exact=True)
            self.summaries[setting].predicted_batch_size = self.predictions[setting].batch_size
        return self.predictions[setting]

    def pinner(self, setting: Setting) -> BatchPinner:
        return BatchPinner(self.spec, setting, self.exact(setting), self.plan.limit_bytes)

    def better(self, a: TrialRecord | None, b: TrialRecord) -> bool:
        """Is b better than a for the objective (then faster)?"""
        if a is None:
            return True
        va, vb = objective_value(self.spec, a.result), objective_value(self.spec, b.result)
        if va != vb:
            return vb > va
        sa, sb = a.result.samples_per_s or 0, b.result.samples_per_s or 0
        if sa != sb:
            return sb > sa
        return _tie_key(b) < _tie_key(a)

    def order(self, ranked: list[Setting], first: int = 1) -> Iterator[tuple[Setting, Any]]:
        """Settings to measure, with the optuna trial that proposed each (None: predicted).

        ``binary``: ``ranked`` as it is. ``optuna``: the ``first`` ranked ones, then the
        sampler's proposals among those left; a proposal outside them is told PRUNED.
        """
        remaining = list(ranked)
        while remaining:
            asked = None
            if self.strategy is Strategy.OPTUNA and self.study is not None \
                    and len(ranked) - len(remaining) >= first:
                asked, setting = self._propose(remaining)
            else:
                setting = remaining[0]
            remaining.remove(setting)
            yield setting, asked

    def _propose(self, remaining: list[Setting]) -> tuple[Any, Setting]:
        import optuna

        for _ in range(PROPOSALS_PER_PICK):
            asked, setting = propose_setting(self.study, self.spec)
            if setting in remaining:
                return asked, setting
            self.study.tell(asked, state=optuna.trial.TrialState.PRUNED)
        return None, remaining[0]

    def release(self, asked: Any) -> None:
        """An optuna trial proposed for a setting that will not be run after all."""
        if asked is not None:
            import optuna

            self.study.tell(asked, state=optuna.trial.TrialState.PRUNED)


def _say_capacity(search: Search, pinner: BatchPinner) -> None:
    """Report (once) an OOM that showed the device holds less than the limit."""
    if pinner.capacity_note:
        search.say(pinner.capacity_note, note=True)
        pinner.capacity_note = None


def pin_setting(search: Search, setting: Setting, asked: Any = None,
                purpose: Purpose = Purpose.PREDICTED) -> TrialRecord | None:
    """Run trials for one setting until its largest fitting batch is pinned."""
    pinner = search.pinner(setting)
    ledger = search.ledger
    best: TrialRecord | None = None
    while pinner.next is not None and not ledger.exhausted:
        batch = pinner.next
        record = ledger.run(pinner.candidate(batch), purpose, pinner.predicted_peak(batch),
                            asked=asked)
        asked, purpose = None, Purpose.REFINE
        pinner.observe(batch, record.result)
        _confirm_by_traces(search, setting, pinner, batch, record.result)
        _say_capacity(search, pinner)
        if record.result.fits and (best is None or batch > best.result.candidate.batch_size):
            best = record
    search.release(asked)
    summary = search.summaries[setting]
    summary.measured_batch_size = pinner.best_fit
    summary.pinned = pinner.pinned
    return best


def _confirm_by_traces(search: Search, setting: Setting, pinner: BatchPinner, batch: int,
                       result: TrialResult) -> None:
    """A prediction made without its confirming trace (``confirmed`` False) whose trial at or
    below its batch ran out of memory: pin it by traces now, in place (the pinner holds that object), and go on
    from their answer when it is below the failed batch (rather than stepping down by the
    measured miss: an OOM's live bytes stop at the limit)."""
    pred = search.predictions.get(setting)
    if pred is None or pred.confirmed or result.fits or result.status != TrialStatus.OOM \
            or batch > pred.batch_size:  # above the plan an OOM is what it said
        return
    spec = search.spec
    fresh = predict_max_batch(spec, setting.candidate(spec.search.batch_size.min),
                              search.plan.device_model, search.plan.limit_bytes, exact=True)
    vars(pred).update(vars(fresh))
    search.summaries[setting].predicted_batch_size = fresh.batch_size
    search.say(f"batch {batch} ran out of memory although two traces paired event by event "
               f"planned it: traced to the boundary, predicted {fresh.batch_size} "
               f"({fresh.traces} traces)", note=True)
    if pinner.next is None or not fresh.batch_size or fresh.batch_size >= batch \
            or pinner.capacity is not None:  # the device held less: the pinner aims at that
        return
    if pinner.best_fit is None or fresh.batch_size > pinner.best_fit:
        pinner.aim(fresh.batch_size)


def search_max_batch(search: Search, settings: list[Setting]) -> TrialRecord | None:
    """Pin settings in order of predicted max batch; stop when none left can beat the best."""
    p = search.predictions
    ranked = sorted(settings, key=lambda st: (-p[st].batch_size, st.checkpoint_segments,
                                              st.precision != "fp32"))
    best: TrialRecord | None = None
    for setting, asked in search.order(ranked):
        if best is not None and p[setting].batch_size * 1.05 < best.result.candidate.batch_size:
            search.release(asked)
            search.say(f"skipping {setting.describe()}: predicted {p[setting].batch_size} "
                       f"cannot beat {best.result.candidate.batch_size}")
            continue
        if search.ledger.exhausted:
            search.release(asked)
            break
        record = pin_setting(search, setting, asked)
        if record is not None and search.better(best, record):
            best = record
    if best is not None:
        note = batch_cap_note(search.spec, best.result.candidate.batch_size,
                              best.result.peak_bytes, search.plan.limit_bytes)
        if note:
            search.say(note, note=True)
    return best


def search_max_input(search: Search, settings: list[Setting]) -> TrialRecord | None:
    """Largest input size that trains at the minimum batch; per size, the leanest setting first.

    Walks sizes down from the largest; the first fitting (size, setting) wins. Sizes above
    the largest predicted to fit are not run: their prediction already says no.
    """
    spec, p = search.spec, search.predictions
    bmin = spec.search.batch_size.lowest
    order = {prec: i for i, prec in enumerate(spec.search.precisions)}
    fitting = [st.input_size for st in settings if p[st].batch_size >= bmin]
    # no size predicted to fit: still try the smallest, rather than answer from prediction
    top = max(fitting) if fitting else min(spec.input_sizes)
    skipped = [size for size in spec.input_sizes if size > top]
    if skipped:
        search.say(f"input sizes {', '.join(map(str, sorted(skipped)))}: predicted not to fit "
                   f"at batch {bmin} in any setting; not run")
    for size in sorted((s for s in spec.input_sizes if s <= top), reverse=True):
        options = [st for st in settings if st.input_size == size]
        # cheapest compute first among settings predicted to fit the minimum batch
        # (no recomputation, the precision listed first); then the leanest of the rest
        options.sort(key=lambda st: (False, st.checkpoint_segments, order[st.precision])
                     if p[st].batch_size >= bmin else (True, -p[st].batch_size, 0))
        for setting in options:
            if search.ledger.exhausted:
                return None
            pinner = BatchPinner(spec, setting, p[setting], search.plan.limit_bytes)
            record = search.ledger.run(pinner.candidate(bmin), Purpose.PREDICTED,
                                       pinner.predicted_peak(bmin))
            if record.result.fits:
                search.summaries[setting].measured_batch_size = bmin
                if size == max(spec.input_sizes):
                    _say_list_capped(search, size, bmin, record)
                return record
            search.say(f"input size {size} does not fit at batch {bmin} with {setting.describe()}")
            if p[setting].batch_size < bmin:
                break
    return None


ROOM_TO_SPARE = 0.9
"""A winning peak under this share of the limit leaves room for a larger input size."""


def _say_list_capped(search: Search, size: int, batch: int, record: TrialRecord) -> None:
    """The largest listed size won: the list, not the memory, set the answer."""
    peak, limit = record.result.peak_bytes, search.plan.limit_bytes
    if not peak or not limit:
        return
    share = peak / limit
    if share < ROOM_TO_SPARE:
        search.say(f"the largest listed size fits with room to spare: input size {size} at batch "
                   f"{batch} used {share:.0%} of the limit; list larger sizes in "
                   f"search.input_size to find the real maximum", note=True)
    else:
        search.say(f"the largest listed size {size} fits, using {share:.0%} of the limit at "
                   f"batch {batch}; larger sizes were not listed", note=True)


def _throughput_candidates(search: Search, settings: list[Setting]) -> list[Setting]:
    """Settings worth timing: checkpointing that buys < 25% more batch than a cheaper setting
    of the same precision and size is pruned (recomputation costs ~30% time)."""
    p = search.predictions
    feasible = [st for st in settings if p[st].batch_size > 0]
    kept = []
    for st in feasible:
        cheaper = [o for o in feasible if o.input_size == st.input_size and o.precision ==
                   st.precision and o.strategy == st.strategy
                   and o.checkpoint_segments < st.checkpoint_segments]
        if cheaper and p[st].batch_size < 1.25 * max(p[o].batch_size for o in cheaper):
            continue
        kept.append(st)
    return sorted(kept, key=lambda st: (-p[st].batch_size * max(st.input_size, 1),
                                        st.checkpoint_segments))


def _time_setting(search: Search, setting: Setting, asked: Any) -> TrialRecord | None:
    """One trial at the predicted max; step down only on OOM (throughput rarely needs the
    last sample, and each extra trial costs more than it can gain)."""
    pinner = search.pinner(setting)
    purpose = Purpose.PREDICTED if asked is None else Purpose.EXPLORE
    while pinner.next is not None and not search.ledger.exhausted:
        batch = pinner.next
        record = search.ledger.run(pinner.candidate(batch), purpose,
                                   pinner.predicted_peak(batch), asked=asked)
        asked, purpose = None, Purpose.REFINE
        pinner.observe(batch, record.result)
        _say_capacity(search, pinner)
        if record.result.fits:
            search.summaries[setting].measured_batch_size = batch
            return record
    search.release(asked)
    return None


def search_throughput(search: Search, settings: list[Setting]) -> TrialRecord | None:
    """Measure samples/s at each promising setting's largest fitting batch.

    One trial per surviving setting plus room for a couple of step-downs, still fewer than
    the combinations when prediction prunes any. ``optuna``: the top half in predicted order,
    then the sampler proposes.
    """
    ranked = _throughput_candidates(search, settings)
    budget = search.spec.search.max_trials or max(4, min(len(ranked) + 2, 2 * len(ranked)))
    search.ledger.max_trials = budget
    best: TrialRecord | None = None
    measured = 0
    for setting, asked in search.order(ranked, first=max(1, budget // 2)):
        if search.ledger.exhausted:
            search.release(asked)
            break
        measured += 1
        record = _time_setting(search, setting, asked)
        if record is not None and search.better(best, record):
            best = record
    if best is None:
        # the trial budget ran out before anything fit: keep going, one setting at a time,
        # rather than report "nothing fits" for settings that were never tried
        search.ledger.max_trials = 0
        for setting in ranked:
            best = _time_setting(search, setting, None)
            if best is not None:
                break
    search.say(f"throughput: measured {measured} of {len(settings)} settings "
               f"({len(settings) - len(ranked)} pruned by prediction)")
    return best


CPU_BUDGET_VERIFY_STEPS = 1
"""Timed verification steps under the CPU budget, after the warm-up (>= 2 steps): step 2
shows the steady peak (optimizer state allocated) and the timed step after it repeats it."""


def rank_timing(spec: ExperimentSpec, result: Any) -> tuple[int, str]:
    """``(ranks, why)`` of a trial: ``ranks`` the processes it ran (1 for a single process);
    ``why`` says why its per-rank peak may differ from run to run ("" when it may not).

    Ranks exchange tensors through the backend's collectives, which finish on their own
    thread: unsettled, a rank can hold a collective's buffer a moment past the step's
    reference (seen on gloo: +3.5% to +8.1% on a rank). CPU rank trials settle the FSDP2
    collectives (``autofit.parallel.settled_collectives``), so their peak is deterministic
    only when every rank ran collectives through it and none stayed held; DDP's all-reduces
    run inside its reducer, outside that wait, and show no such record."""
    extra = getattr(result, "extra", None) or {}
    world = int(extra.get("world_size") or 0)
    if not world and spec.parallel.strategies != ("none",):
        from autofit.parallel import spec_for

        run = spec_for(spec, result.candidate)
        world = run.world_size if run.parallel.strategy != "none" else 1
    if world <= 1:
        return 1, ""
    collectives = extra.get("rank_collectives") or []
    if len(collectives) != world or not all(c.get("calls") for c in collectives):
        return world, ("its collectives did not all run settled (DDP's all-reduces run inside "
                       "its reducer), so a rank's peak can vary with their timing")
    held = sum(int(c.get("unsettled") or 0) for c in collectives)
    if held:
        return world, (f"{held} of its collectives were still held by the backend after the "
                       f"wait, so a rank's peak can vary with their timing")
    return world, ""


def verification_steps(spec: ExperimentSpec, best: TrialRecord) -> tuple[int, str]:
    """How many timed steps the verification runs, and why (for the report).

    Under the CPU budget the tracker counts live tensor bytes of a deterministic step: from
    step 2 on (optimizer state allocated) every step repeats the same peak, so one timed step
    after the warm-up proves as much as ``verify_steps``. Not so for a multi-rank trial whose
    collectives' timing can move its peak (``rank_timing``): it runs ``verify_steps`` in
    full, in a run of its own. On CUDA the caching allocator's reserve and fragmentation can
    creep over steps, so ``verify_steps`` run in full; so they do for max_throughput, whose
    answer is the verification's timing.
    """
    steps = spec.search.verify_steps
    kind = LimitKind(best.result.limit_kind or "none")
    if spec.search.objective == Objective.MAX_THROUGHPUT:
        return steps, ""
    ranks, varies = rank_timing(spec, best.result) if kind == LimitKind.CPU_BUDGET else (1, "")
    if varies:
        return steps, (f"verification: {steps} timed step{'s' if steps != 1 else ''} on {ranks} "
                       f"ranks in a run of its own (the fitting search trial is not reused): "
                       f"{varies}")
    if kind == LimitKind.CPU_BUDGET and steps > CPU_BUDGET_VERIFY_STEPS:
        return CPU_BUDGET_VERIFY_STEPS, (
            f"verification: {CPU_BUDGET_VERIFY_STEPS} timed step after the warm-up instead of "
            f"verify_steps={steps}: the CPU budget counts live bytes of a deterministic step, "
            "so every step after step 2 repeats its peak")
    if kind in (LimitKind.CUDA_FRACTION, LimitKind.CUDA_DEVICE):
        return steps, (f"verification: {steps} timed steps on CUDA: the caching allocator's "
                       "reserve and fragmentation can grow over steps")
    return steps, ""


def reusable_verification(spec: ExperimentSpec, best: TrialRecord, steps: int) -> str:
    """Why the search trial ``best`` already is the verification ("" when it is not).

    Only under the CPU budget (deterministic from step 2 on), never for max_throughput (its
    answer is the verification's timing) nor on CUDA (peaks can creep), nor for ranks whose
    collectives' timing can move the peak (``rank_timing``): the trial must have fit and run
    at least as many steps past step 2 as the verification would (its warm-up plus
    ``steps``), with the optimizer state in place."""
    r = best.result
    if spec.search.objective == Objective.MAX_THROUGHPUT or not r.fits \
            or LimitKind(r.limit_kind or "none") != LimitKind.CPU_BUDGET \
            or "optimizer state never appeared" in (r.warning or ""):
        return ""
    ranks, varies = rank_timing(spec, r)
    past_step_2 = r.steps_run - 2
    if varies or past_step_2 < max(1, spec.search.warmup_steps + steps - 2):
        return ""
    on = f" on {ranks} ranks, every collective settled," if ranks > 1 else ""
    return (f"verification: the CPU budget's peak repeats from step 2; the search trial at "
            f"batch {r.candidate.batch_size} ({r.candidate.label()}, trial {best.number}){on} ran "
            f"{past_step_2} step{'s' if past_step_2 != 1 else ''} past step 2: reused as the "
            f"verification, no trial run")


def ranks_entry(job_spec: ExperimentSpec, best: TrialRecord, plan: Plan,
                short: Any) -> dict[str, Any]:
    """results.json's ``ranks`` entry when the trials ran fewer ranks than the job asks
    (``short``: ``autofit.trials.ranks.RankShortfall``; ``job_spec`` at the job's own world
    size): the answer at that world size, marked predicted-only (``predicted_only``), or the
    shortfall alone with why its prediction failed. Its ``note`` goes into the notes."""
    from autofit.errors import AutofitError
    from autofit.predict.distributed import predicted_only

    try:
        return predicted_only(job_spec, best.result.candidate, plan.device_model,
                              plan.limit_bytes, short) or short.to_dict()
    except AutofitError as exc:
        return {**short.to_dict(), "note": f"{short.note()}; its prediction failed: {exc}"}


def verify_best(search: Search, best: TrialRecord) -> TrialRecord | None:
    """Re-run the winner (``verification_steps``); step down while it fails.

    Under the CPU budget a search trial at the winner that already ran as many steps past
    step 2 as the verification would is the verification (``reusable_verification``): the
    winner comes back as a VERIFY record of that very trial (``reused``), not run again."""
    spec, ledger = search.spec, search.ledger
    candidate = best.result.candidate
    steps, why = verification_steps(spec, best)
    reuse = reusable_verification(spec, best, steps)
    if reuse:
        search.say(reuse, note=True)
        return dataclasses.replace(best, purpose=Purpose.VERIFY, reused=True)
    if why:
        search.say(why, note=True)
    saved_max, ledger.max_trials = ledger.max_trials, 0  # verification always runs
    try:
        for _ in range(8):
            record = ledger.run(candidate, Purpose.VERIFY, best.predicted_peak_bytes, steps=steps)
            if record.result.fits:
                if candidate != best.result.candidate and candidate.setting in search.summaries:
                    search.summaries[candidate.setting].measured_batch_size = candidate.batch_size
                return record
            lower = candidate.batch_size - spec.search.batch_size.multiple_of
            search.say(f"verification over {steps} steps failed at {candidate.label()} "
                       f"({record.result.status.value}); stepping down to batch {lower}", note=True)
            if lower < spec.search.batch_size.lowest:
                return None
            candidate = candidate.with_batch(lower)
    finally:
        ledger.max_trials = saved_max
    return None
