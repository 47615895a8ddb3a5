"""autofit from Python: the functions the ``autofit`` command wraps, one per command.

``tune`` is the whole job (lock the output dir, search, write results, exports and the plot,
keep partial results on failure); ``estimate``, ``trial`` and ``profile`` answer for one
candidate; ``export`` regenerates the hand-over files; ``load_tuned`` is what a training
script reads. Each takes the spec as a path, a mapping or an ``ExperimentSpec``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autofit.candidate import Candidate
from autofit.choices import Precision
from autofit.device import check_device
from autofit.errors import AutofitError, SpecError, TuneFailed, TuneInterrupted
from autofit.export import load_results, write_exports, write_results
from autofit.export.tuned import TunedConfig, load_tuned
from autofit.files import locked_output_dir, refuse_taken
from autofit.predict.batch_curve import MaxBatchEstimate, predict_max_batch
from autofit.predict.cache import TraceCache, cache_for, device_without_torch
from autofit.predict.cache import using as using_cache
from autofit.predict.estimates import MemoryEstimate
from autofit.search.events import EventHandler
from autofit.search.plan import Plan, plan_limits
from autofit.search.results import TuneResult
from autofit.spec import ExperimentSpec, load_spec, spec_from_dict
from autofit.trials.result import TrialResult

SpecLike = str | Path | dict[str, Any] | ExperimentSpec

__all__ = ["EstimateResult", "ProfileResult", "SpecLike", "TunedConfig", "as_spec",
           "candidate_for", "estimate", "export", "load_tuned", "profile", "trial", "tune"]


def as_spec(spec: SpecLike) -> ExperimentSpec:
    """An ``ExperimentSpec`` from a YAML path, a mapping (as YAML would load) or itself.

    Raises:
        SpecError: every problem found, one line each (import paths included).
    """
    if isinstance(spec, ExperimentSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(spec, check_imports=True)
    if isinstance(spec, str | Path):
        return load_spec(spec)
    raise SpecError([f"spec: expected a path, a mapping or an ExperimentSpec, "
                     f"got {type(spec).__name__}"])


def candidate_for(spec: ExperimentSpec, *, batch_size: int | None = None,
                  input_size: int | None = None, precision: str | None = None,
                  segments: int | None = None) -> Candidate:
    """One candidate of ``spec``; each knob left ``None`` takes the spec's first choice
    (batch: ``search.batch_size.min``, input size: the largest listed).

    Raises:
        SpecError: one line per out-of-range or unknown value.
    """
    problems = []
    if precision is not None and precision not in Precision.values():
        problems.append(f"--precision: must be one of {', '.join(Precision.values())}, "
                        f"got {precision!r}")
    for flag, value, low in (("--batch-size", batch_size, 1), ("--input-size", input_size, 1),
                             ("--segments", segments, 0)):
        if value is not None and value < low:
            problems.append(f"{flag}: must be >= {low}, got {value}")
    if problems:
        raise SpecError(problems)
    s = spec.search
    return Candidate(
        batch_size=batch_size or s.batch_size.min,
        input_size=input_size or spec.input_sizes[-1],
        precision=Precision(precision) if precision else s.precisions[0],
        checkpoint_segments=segments if segments is not None else s.checkpoint_segments[0],
    )


@dataclass
class EstimateResult:
    """A prediction for one candidate, and the largest batch under the budget."""

    estimate: MemoryEstimate
    max_batch: MaxBatchEstimate | None
    """None when the budget is unknown ('auto' on a device that is not here)."""
    plan: Plan
    margin: float
    """memory.margin: the limit is budget x (1 - margin)."""
    cache: dict[str, Any] | None = None
    """The trace cache used: dir, hits, new traces (None: cache off)."""
    calibration: list[str] = field(default_factory=list)
    """Probe calibration lines (corrections, or the ops known to misreport without a probe)."""
    per_strategy: list[dict[str, Any]] = field(default_factory=list)
    """``parallel.strategy`` lists several: one rank of each (``strategy``, ``world_size``,
    ``peak_bytes``, ``max_batch_size``), in spec order; ``estimate`` is the first's."""
    notes: list[str] = field(default_factory=list)
    """Warnings on the answer (the max batch is ``search.batch_size.max``, not memory)."""

    def to_dict(self) -> dict[str, Any]:
        est, mb = self.estimate, self.max_batch
        data = est.to_dict()
        data.update(
            breakdown=est.breakdown.to_dict(),
            max_batch_size=mb.batch_size if mb else None,
            batch_curve=mb.curve.to_dict() if mb else None,
            budget_bytes=self.plan.budget_bytes, margin=self.margin,
            limit_bytes=self.plan.limit_bytes,
            layers=[vars(r) for r in est.layers] if est.layers else None,
            trace_cache=self.cache, calibration=self.calibration,
            notes=self.plan.notes + self.notes,
        )
        if self.per_strategy:
            data["per_strategy"] = self.per_strategy
        return data


def estimate(spec: SpecLike, *, batch_size: int | None = None, input_size: int | None = None,
             precision: str | None = None, segments: int | None = None,
             device: str | None = None, per_layer: bool = False,
             max_batch: bool = True, cache: bool | str | Path = True,
             calibrate: bool = False) -> EstimateResult:
    """Predict peak memory of one candidate on fake tensors (no real memory, no GPU).

    Args:
        spec: the experiment (path, mapping or ``ExperimentSpec``).
        batch_size, input_size, precision, segments: the candidate (default: the spec's first).
        device: ``cpu`` or ``cuda``: the device model to apply (default: the spec's device).
        per_layer: also attribute the forward's memory to each module.
        max_batch: also predict the largest batch under ``budget x (1 - margin)``.
        cache: the trace cache (``autofit.predict.cache``): True for ``$AUTOFIT_CACHE_DIR``
            or ``<output.dir>/.trace_cache``, a directory, or False for none.
        calibrate: first run a real probe of the candidate and correct the ops whose fake
            kernels misreport (``autofit.predict.calibrate``); the corrections are kept in
            ``<output.dir>/calibration.json`` and used by later estimates of this spec.

    Returns:
        ``EstimateResult`` with the breakdown and, when the budget is known, the max batch.

    Raises:
        SpecError: a bad spec or knob. BuildError: the model or step cannot be built/traced.
    """
    knobs: dict[str, Any] = {"batch_size": batch_size, "input_size": input_size, "precision": precision,
             "segments": segments}
    check_device(device)  # before an answer record could answer for it
    if cache is not False and not per_layer and not calibrate:
        answered = _estimate_from_record(spec, knobs, device, max_batch, cache)
        if answered is not None:
            return answered
    from autofit.predict.trace import estimate as predict_estimate

    spec = as_spec(spec)
    plan = plan_limits(spec, device, require_device=False)
    cand = candidate_for(spec, **knobs)
    from autofit.predict import calibrate as calib

    out_dir = tune_out_dir(spec, None)
    traces = cache_for(cache, out_dir)
    store, lines = calib.load_for(spec, out_dir), []
    if calibrate:
        cal, probe = calib.probe(spec, cand, plan.device_model, store, device=plan.device)
        if cal is None:
            lines.append(f"probe at {cand.label()} did not run to the end ({probe.status.value}"
                         f"{': ' + probe.message if probe.message else ''}); nothing corrected")
        else:
            lines += cal.messages
            out_dir.mkdir(parents=True, exist_ok=True)
            store.save(out_dir / calib.CALIBRATION_FILE)
    elif (cal := store.find(cand, plan.device_model.kind)) is not None:
        lines += [f"using the probe calibration in {out_dir / calib.CALIBRATION_FILE}: {m}"
                  for m in cal.messages if "corrected" in m or "measured slope" in m]
    with using_cache(traces), calib.using(store):
        est = predict_estimate(spec, cand, plan.device_model, per_layer=per_layer)
        mb = None
        if max_batch and plan.limit_bytes:
            from autofit.predict.trace import traced_ahead

            # the search's last trace, guessed from this one, runs on a second core
            # meanwhile (its first traces cannot: each batch follows from the one before)
            with traced_ahead(spec, _likely_probe(spec, est, plan.limit_bytes),
                              plan.device_model):
                mb = predict_max_batch(spec, cand.with_batch(spec.search.batch_size.min),
                                       plan.device_model, plan.limit_bytes, known=[est])
        per_strategy = (_per_strategy(spec, cand, plan, est, mb, max_batch)
                        if len(spec.parallel.strategies) > 1 else [])
    if not calibrate and store.find(cand, plan.device_model.kind) is None:
        lines += est.misreporting
    if (traces is not None and not per_layer and not calibrate
            and spec.parallel.strategies == ("none",) and plan.device == "cpu"
            and device_without_torch(device or spec.device) == "cpu"):
        traces.put_answer(_answer_key(traces, spec, cand, device, max_batch, out_dir),
                          {**vars(plan), "device_model": asdict(plan.device_model)})
    return EstimateResult(est, mb, plan, spec.memory.margin,
                          traces.to_dict() if traces is not None else None, lines, per_strategy,
                          _cap_notes(spec, mb))


def _cap_notes(spec: ExperimentSpec, mb: MaxBatchEstimate | None) -> list[str]:
    """The note for a predicted max batch that ``search.batch_size.max`` set, not memory."""
    from autofit.search.plan import batch_cap_note

    if mb is None or not mb.batch_size:
        return []
    peak = mb.estimate.peak_bytes if mb.estimate is not None else None
    note = batch_cap_note(spec, mb.batch_size, peak, mb.limit_bytes)
    return [note] if note else []


def _likely_probe(spec: ExperimentSpec, est: MemoryEstimate, limit_bytes: int) -> Candidate | None:
    """The batch ``predict_max_batch`` most likely traces last, guessed from one trace: the
    step above the largest batch under ``limit_bytes`` on the line through this trace's peak
    and, at batch 0, its parameters, gradients and optimizer state. The search confirms its
    answer with a trace there (the batch above it does not fit), and the guess is right when
    the memory that grows with batch is activations and the fixed part is that state (the
    shipped CPU configs; not a tiny batch whose peak is the optimizer step). None when there
    is nothing to guess: the trace does not fit, or nothing grows with batch."""
    rng, batch, parts = spec.search.batch_size, est.candidate.batch_size, est.breakdown
    fixed = parts.params_bytes + parts.grads_bytes + parts.optimizer_state_bytes
    if est.peak_bytes > limit_bytes or batch < 1 or est.peak_bytes <= fixed:
        return None
    per_sample = (est.peak_bytes - fixed) / batch
    answer = min(rng.highest, int((limit_bytes - fixed) / per_sample)
                 // rng.multiple_of * rng.multiple_of)
    probe = answer if answer >= rng.highest else answer + rng.multiple_of
    return est.candidate.with_batch(probe) if probe > batch else None


def _per_strategy(spec: ExperimentSpec, cand: Candidate, plan: Plan, first: MemoryEstimate,
                  first_max: MaxBatchEstimate | None, max_batch: bool) -> list[dict[str, Any]]:
    """One rank of each strategy of a ``parallel.strategy`` list: its peak at ``cand`` and
    its largest batch per rank (the first strategy's are ``first`` and ``first_max``)."""
    from autofit.parallel import with_plan
    from autofit.predict.trace import estimate as predict_estimate

    rows = []
    for i, strategy in enumerate(spec.parallel.strategies):
        est, mb = first, first_max
        if i:
            one = with_plan(spec, strategy)
            est = predict_estimate(one, cand, plan.device_model)
            mb = (predict_max_batch(one, cand.with_batch(spec.search.batch_size.min),
                                    plan.device_model, plan.limit_bytes, known=[est])
                  if max_batch and plan.limit_bytes else None)
        rows.append({"strategy": strategy,
                     "world_size": spec.world_size if strategy != "none" else 1,
                     "peak_bytes": est.peak_bytes,
                     "max_batch_size": mb.batch_size if mb is not None else None})
    return rows


def _answer_key(traces: TraceCache, spec: ExperimentSpec, cand: Candidate, device: str | None,
                max_batch: bool, out_dir: Path) -> str:
    from autofit.predict.calibrate import CALIBRATION_FILE

    return traces.answer_key(spec, {"candidate": cand.to_dict(), "device": device,
                                    "max_batch": max_batch}, out_dir / CALIBRATION_FILE)


def _estimate_from_record(spec_like: SpecLike, knobs: dict[str, Any], device: str | None,
                          max_batch: bool, cache: bool | str | Path) -> EstimateResult | None:
    """The same answer from an answer record of the trace cache, without importing torch or
    resolving import paths (``autofit.predict.cache``); None when there is none."""
    from autofit.predict import calibrate as calib
    from autofit.predict.device_model import DeviceModel

    try:  # structure only: the record's key covers the files the import paths name
        if isinstance(spec_like, str | Path):
            spec = load_spec(spec_like, check_imports=False)
        elif isinstance(spec_like, dict):
            spec = spec_from_dict(spec_like)
        elif isinstance(spec_like, ExperimentSpec):
            spec = spec_like
        else:
            return None
        cand = candidate_for(spec, **knobs)
    except SpecError:
        return None  # the full path reports it
    if spec.parallel.strategies != ("none",) or device_without_torch(device or spec.device) is None:
        return None
    out_dir = tune_out_dir(spec, None)
    traces = cache_for(cache, out_dir)
    if traces is None:
        return None
    found = traces.get_answer(_answer_key(traces, spec, cand, device, max_batch, out_dir))
    if found is None:
        return None
    plan_data, known = found
    plan = Plan(**{**plan_data, "device_model": DeviceModel(**plan_data["device_model"])})
    est = next((e for e in known if e.candidate == cand), None)
    if est is None:
        return None
    store = calib.load_for(spec, out_dir)
    lines = []
    if (cal := store.find(cand, plan.device_model.kind)) is not None:
        lines += [f"using the probe calibration in {out_dir / calib.CALIBRATION_FILE}: {m}"
                  for m in cal.messages if "corrected" in m or "measured slope" in m]
    else:
        lines += est.misreporting
    mb = None
    with using_cache(traces), calib.using(store):  # a trace missing from known is run
        if max_batch and plan.limit_bytes:
            mb = predict_max_batch(spec, cand.with_batch(spec.search.batch_size.min),
                                   plan.device_model, plan.limit_bytes, known=[est],
                                   replay=known)
    return EstimateResult(est, mb, plan, spec.memory.margin, traces.to_dict(), lines,
                          notes=_cap_notes(spec, mb))


def trial(spec: SpecLike, *, batch_size: int | None = None, input_size: int | None = None,
          precision: str | None = None, segments: int | None = None, steps: int | None = None,
          timeout_s: float | None = None) -> TrialResult:
    """Run one real trial in a fresh process under the spec's memory limit.

    Returns:
        ``TrialResult``: status (fits | oom | error | timeout | crashed) is data; this never
        raises for what the trial did.

    Raises:
        SpecError: a bad spec or knob. AutofitError: a CUDA device asked for and absent.
    """
    from autofit.trials.runner import run_trial

    spec = as_spec(spec)
    problems = []
    if steps is not None and steps < 1:
        problems.append(f"--steps: must be >= 1, got {steps}")
    if timeout_s is not None and not timeout_s > 0:
        problems.append(f"--timeout: must be > 0, got {timeout_s:g}")
    try:
        cand = candidate_for(spec, batch_size=batch_size, input_size=input_size,
                             precision=precision, segments=segments)
    except SpecError as exc:
        raise SpecError(exc.problems + problems) from None
    if problems:
        raise SpecError(problems)
    plan = plan_limits(spec)
    return run_trial(spec, cand, limit_bytes=plan.limit_bytes, steps=steps,
                     timeout_s=timeout_s, device=plan.device)


def check_restart(resume: bool, force: bool) -> None:
    """``resume`` continues the study, ``force`` deletes it: one at most."""
    if resume and force:
        raise SpecError(["--resume and --force contradict each other (continue the study, "
                         "or start over): pass one"])


def tune_out_dir(spec: ExperimentSpec, out_dir: str | Path | None) -> Path:
    """``out_dir``, else the spec's ``output.dir`` (relative to the working directory)."""
    return Path(out_dir) if out_dir is not None else Path.cwd() / spec.output.dir


def _refuse_taken_early(spec: SpecLike, out_dir: str | Path | None, *, resume: bool,
                        force: bool) -> None:
    """An output dir that holds results is refused before the spec's imports are resolved
    (its model module imports torch: seconds for a one-line answer). The dir is ``out_dir``,
    else ``output.dir`` of the spec read without resolving imports; a spec that does not read
    is left to ``as_spec``, which reports every problem."""
    if resume or force:
        return
    if out_dir is None:
        if not isinstance(spec, str | Path):
            return
        try:
            out_dir = tune_out_dir(load_spec(spec, check_imports=False), None)
        except AutofitError:
            return
    refuse_taken(Path(out_dir), resume=resume, force=force)


def tune(spec: SpecLike, *, out_dir: str | Path | None = None, resume: bool = False,
         force: bool = False, storage: str | None = None, device: str | None = None,
         on_event: EventHandler | None = None,
         runner: Callable[..., TrialResult] | None = None,
         cache: bool | str | Path = True) -> TuneResult:
    """Search the largest configuration that fits, proven by real trials; write the hand-over.

    Args:
        spec: the experiment (path, mapping or ``ExperimentSpec``).
        out_dir: where results.json, tuned.yaml, the study and the scripts go (default:
            ``output.dir``). It is locked for the run.
        resume: continue the study in ``out_dir`` (or ``storage``); finished trials are not
            repeated. force: start over in an ``out_dir`` that holds results.
        storage: an optuna RDB URL instead of the journal file in ``out_dir``.
        device: override the spec's device. on_event: called with each ``TuneEvent``.
        runner: the trial function (default: a fresh process per trial).
        cache: the trace cache: True for ``$AUTOFIT_CACHE_DIR`` or ``<out_dir>/.trace_cache``,
            a directory, or False for none. Its hit count is the last of ``notes``.

    Returns:
        ``TuneResult``; ``.files`` lists what was written, ``.out_dir`` where.

    Raises:
        TuneFailed: the search stopped (a trial error, nothing fits); results.json keeps
            every finished trial (``.partial``). TuneInterrupted: the same for Ctrl-C.
        SpecError, OutputDirError, AutofitError: before any trial ran.
    """
    check_restart(resume, force)
    check_device(device)
    _refuse_taken_early(spec, out_dir, resume=resume, force=force)
    spec = as_spec(spec)
    directory = tune_out_dir(spec, out_dir)
    with locked_output_dir(directory, resume=resume, force=force) as path, \
            using_cache(cache_for(cache, path)) as traces:
        # imported once the output dir is taken: a refused one is said without torch
        from autofit.search.tuner import run_search
        from autofit.trials.runner import run_trial

        try:
            result = run_search(spec, out_dir=path, resume=resume, storage=storage,
                                device=device, on_event=on_event, runner=runner or run_trial)
            if traces is not None:
                result.notes.append(traces.summary())
        except TuneFailed as exc:
            if exc.partial is not None and exc.partial.trials:
                data = exc.partial.to_dict()
                data["error"] = str(exc)
                exc.partial.files = write_results(path, _plain(data))
                exc.partial.out_dir = path
            raise
        data = _plain(result.to_dict())
        result.out_dir = path
        result.files = write_results(path, data) + write_exports(data, path)
        plot = path / "peak_vs_batch.png"
        try:
            result.plot_note = _plot(data, plot)
        except KeyboardInterrupt:
            # every result file is written by now: only the plot is lost
            plot.unlink(missing_ok=True)
            result.plot_note = f"interrupted: {plot.name} not written"
            raise TuneInterrupted(result) from None
    return result


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """JSON types only (enums as their values), as results.json will read back."""
    return json.loads(json.dumps(data, default=str))


def _plot(data: dict[str, Any], path: Path) -> str:
    """The batch-curve PNG; a plot never loses results, so failures become the note."""
    try:
        from autofit.plot import BatchCurvePlot, plot_batch_curve

        return plot_batch_curve(BatchCurvePlot.from_results(data), path)
    except ImportError:
        return f"matplotlib not installed: skipped {path.name} (pip install 'autofit[plot]')"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"skipped {path.name}: {type(exc).__name__}: {exc}"


def export(results: str | Path | dict[str, Any], formats: Sequence[str] | None = None,
           out_dir: str | Path | None = None, storage: str | None = None) -> list[Path]:
    """Regenerate submission scripts, overlays and target configs without re-tuning.

    Args:
        results: a results.json path (or its loaded dict).
        formats: any of slurm, lsf, torchrun, lightning, hf, deepspeed, targets (default:
            all, scripts as ``output.scripts`` lists them), or slurm-tune / lsf-tune (array
            jobs measuring each target GPU type: only when named).
        out_dir: default: next to results.json.
        storage: the study URL slurm-tune / lsf-tune default to (written without its
            password); else they need ``AUTOFIT_STORAGE`` where they run.

    Returns:
        The written paths, in order.

    Raises:
        AutofitError: an unreadable or invalid results file, an unknown format.
    """
    if isinstance(results, dict):
        data, default_dir = results, Path.cwd()
    else:
        data, default_dir = load_results(results), Path(results).parent
    return write_exports(data, Path(out_dir) if out_dir is not None else default_dir,
                         list(formats) if formats else None, storage=storage)


@dataclass
class ProfileResult:
    """Where the memory of one step goes, what each knob saves, and the plots written."""

    profile: Any
    """``autofit.predict.profile.Profile``."""
    what_if: list[Any]
    """``WhatIf`` rows: the step re-traced with one knob changed."""
    baseline_bytes: int
    """The predicted peak the what-ifs compare against."""
    plan: Plan
    spec_name: str
    margin: float
    plots: dict[str, str] = field(default_factory=dict)
    """PNG name -> "wrote PATH" or why it was skipped."""
    batch_curve: Any = None
    """``autofit.plot.BatchCurvePlot`` behind peak_vs_batch.png (None without plots)."""
    cache: dict[str, Any] | None = None
    """The trace cache used: dir, hits, new traces (None: cache off)."""


def profile(spec: SpecLike, *, batch_size: int | None = None, input_size: int | None = None,
            precision: str | None = None, segments: int | None = None,
            device: str | None = None, real: bool = False, what_if: bool = True,
            plot_dir: str | Path | None = None, plots: bool = True, top: int = 10,
            results: str | Path | None = None, cache: bool | str | Path = True) -> ProfileResult:
    """Follow memory through one training step and re-trace what each knob would save.

    Args:
        spec, batch_size, input_size, precision, segments, device: as for ``estimate``.
        real: measure real steps on the device instead of fake tensors.
        what_if: re-trace each knob. top: tensors alive at the peak to keep.
        plot_dir: where the PNGs go (default: ``<output.dir>/profile``). plots: write them.
        results: a tune results.json whose trials go on the batch plot.
        cache: the trace cache for the what-if and batch-curve traces (as for ``estimate``).

    Returns:
        ``ProfileResult``.

    Raises:
        SpecError, BuildError; TrialError when ``real`` runs out of memory.
    """
    spec = as_spec(spec)
    if top < 0:
        raise SpecError([f"--top: must be >= 0, got {top}"])
    from autofit.predict import calibrate as calib

    store = calib.load_for(spec, tune_out_dir(spec, None))  # estimate --calibrate's, or tune's
    with using_cache(cache_for(cache, tune_out_dir(spec, None))) as traces, calib.using(store):
        result = _profile(spec, batch_size, input_size, precision, segments, device, real,
                          what_if, plot_dir, plots, top, results)
    result.cache = traces.to_dict() if traces is not None else None
    return result


def _profile(spec: ExperimentSpec, batch_size: int | None, input_size: int | None,
             precision: str | None, segments: int | None, device: str | None, real: bool,
             what_if: bool, plot_dir: str | Path | None, plots: bool, top: int,
             results: str | Path | None) -> ProfileResult:
    from autofit.predict.profile import profile_step
    from autofit.predict.profile import what_if as what_ifs
    from autofit.predict.trace import estimate as predict_estimate

    plan = plan_limits(spec, device, require_device=False)
    cand = candidate_for(spec, batch_size=batch_size, input_size=input_size,
                         precision=precision, segments=segments)
    prof = profile_step(spec, cand, plan.device_model, real=real, device=plan.device,
                        top=max(top, 1))
    prof.top_tensors = prof.top_tensors[:top]
    baseline = prof.peak_bytes if not real else predict_estimate(spec, cand, plan.device_model).peak_bytes
    knobs = what_ifs(spec, cand, plan.device_model, baseline=baseline) if what_if else []
    out = ProfileResult(prof, knobs, baseline, plan, spec.name, spec.memory.margin)
    if plots:
        from autofit.plot import BatchCurvePlot

        directory = Path(plot_dir) if plot_dir is not None else tune_out_dir(spec, None) / "profile"
        if results is not None:
            out.batch_curve = BatchCurvePlot.from_results(load_results(results))
        else:
            peak = prof.peak_bytes if not real else baseline
            out.batch_curve = _profile_curve(spec, cand, plan, peak)
        out.plots = _profile_plots(prof, plan, out.batch_curve, directory)
    return out


PROFILE_PLOTS = ("memory_timeline.png", "peak_vs_batch.png")


def _profile_curve(spec: ExperimentSpec, cand: Candidate, plan: Plan, profiled_peak: int) -> Any:
    """The batch plot of a profile: the predicted max batch under the limit, from traces."""
    from autofit.plot import BatchCurvePlot
    from autofit.predict.batch_curve import fit_line
    from autofit.predict.trace import estimate as predict_estimate

    best = None
    if plan.limit_bytes:
        mb = predict_max_batch(spec, cand.with_batch(spec.search.batch_size.min),
                               plan.device_model, plan.limit_bytes)
        intercept, slope, points = (mb.curve.intercept_bytes, mb.curve.slope_bytes_per_sample,
                                    list(mb.curve.points))
        if mb.batch_size:
            peak = mb.estimate.peak_bytes if mb.estimate else int(mb.curve.peak_at(mb.batch_size))
            best = {**cand.with_batch(mb.batch_size).to_dict(), "predicted": True,
                    "peak_bytes": peak}
    else:  # budget unknown: a line through this batch and twice it
        points = [(b, predict_estimate(spec, cand.with_batch(b), plan.device_model).peak_bytes)
                  for b in (cand.batch_size, 2 * cand.batch_size)]
        intercept, slope = fit_line(points)
    return BatchCurvePlot(
        name=spec.name, setting_key=cand.setting.key, intercept_bytes=intercept,
        slope_bytes_per_sample=slope, points=points, best=best,
        budget_bytes=plan.budget_bytes or None, limit_bytes=plan.limit_bytes or None,
        margin=spec.memory.margin, profiled=(cand.batch_size, profiled_peak))


def _profile_plots(prof: Any, plan: Plan, curve: Any, directory: Path) -> dict[str, str]:
    """memory_timeline.png and peak_vs_batch.png; a plot never fails the profile."""
    try:
        from autofit.plot import plot_batch_curve, plot_timeline

        directory.mkdir(parents=True, exist_ok=True)
        out = {PROFILE_PLOTS[0]: plot_timeline(prof, directory / PROFILE_PLOTS[0],
                                               limit_bytes=plan.limit_bytes or None,
                                               budget_bytes=plan.budget_bytes or None)}
        out[PROFILE_PLOTS[1]] = plot_batch_curve(curve, directory / PROFILE_PLOTS[1])
    except ImportError:
        return {"skipped": f"matplotlib not installed: skipped {', '.join(PROFILE_PLOTS)} "
                           f"(pip install 'autofit[plot]')"}
    except OSError as exc:
        return {"skipped": f"cannot write plots to {directory}: {exc.strerror or exc}"}
    return {k: (f"wrote {directory / k}" if v.startswith("wrote ") else v) for k, v in out.items()}


__all__ += ["TuneResult", "TrialResult", "MemoryEstimate", "Plan"]
