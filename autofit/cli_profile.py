"""``autofit profile``: where the memory of one training step goes, and what each knob saves.

Registered in ``autofit.cli`` with ``app.command()(profile)``. Helpers of ``autofit.cli``
(consoles, spec loading, candidate options, error printing) are imported inside the command,
so this module can be imported from ``autofit.cli`` at any point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

PLOTS = ("memory_timeline.png", "peak_vs_batch.png")
MODULE_ROWS = 30


def profile(
    spec_path: Annotated[Path, typer.Argument(help="YAML experiment spec", show_default=False)],
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="default: search.batch_size.min")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size", help="image side / sequence length")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32 | fp16 | bf16")] = None,
    segments: Annotated[int | None, typer.Option("--segments", help="checkpoint segments")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda: device model (and device for --real)")] = None,
    real: Annotated[bool, typer.Option("--real", help="measure real steps on the device instead of fake tensors")] = False,
    results: Annotated[Path | None, typer.Option("--results", help="a tune results.json: its trials and chosen config go on the batch plot")] = None,
    plot_dir: Annotated[Path | None, typer.Option("--plot-dir", help="where the PNGs go (default: current dir)")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="no PNGs (and no batch-curve traces)")] = False,
    with_what_if: Annotated[bool, typer.Option("--what-if/--no-what-if", help="re-trace each knob (default on)")] = True,
    top: Annotated[int, typer.Option("--top", help="tensors alive at the peak to list")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """Follow memory through one training step and show what each knob would save.

    Fake tensors by default (instant, no GPU); --real measures the step on the device.
    Writes memory_timeline.png and peak_vs_batch.png when matplotlib is installed.
    """
    from autofit import cli
    from autofit.errors import AutofitError

    log = cli.err if as_json else cli.out
    try:
        spec = cli._load(spec_path)
        from autofit.predict import estimate
        from autofit.profile import profile_step, what_if
        from autofit.tune import plan_limits

        if top < 0:
            from autofit.errors import SpecError

            raise SpecError([f"--top: must be >= 0, got {top}"])
        plan = plan_limits(spec, device, require_device=False)
        cand = cli._candidate(spec, batch_size, input_size, precision, segments)
        prof = profile_step(spec, cand, plan.device_model, real=real, device=plan.device,
                            top=max(top, 1))
        prof.top_tensors = prof.top_tensors[:top]
        baseline = (prof.peak_bytes if not real else
                    estimate(spec, cand, plan.device_model).peak_bytes)
        knobs = []
        if with_what_if:
            with cli.err.status("re-tracing the what-ifs ..."):
                knobs = what_if(spec, cand, plan.device_model, baseline=baseline)
        tune_results = None
        if results is not None:
            from autofit.export import load_results

            tune_results = load_results(results)
        curve_data = None
        if not no_plot and tune_results is None:
            with cli.err.status("tracing the batch curve ..."):
                curve_data = _batch_curve(spec, cand, plan, prof.peak_bytes if not real else baseline)
    except AutofitError as exc:
        cli._fail(exc)

    plots: dict[str, str] = {}
    if not no_plot:
        plots = _write_plots(prof, plan, curve_data, tune_results, plot_dir or Path.cwd())

    if as_json:
        data = prof.to_dict()
        data.update(
            spec=spec.name,
            predicted_peak_bytes=baseline,
            budget_bytes=plan.budget_bytes or None,
            limit_bytes=plan.limit_bytes or None,
            margin=spec.memory.margin,
            what_if=[k.to_dict() for k in knobs],
            batch_curve=curve_data,
            plots=plots,
        )
        for line in plots.values():
            log.print(line, markup=False)
        print(json.dumps(data, indent=2, default=str))
        return
    _print(cli.out, spec, prof, plan, knobs, baseline)
    for line in plots.values():
        log.print(line, markup=False)


# --------------------------------------------------------------------------- batch curve


def _batch_curve(spec: Any, cand: Any, plan: Any, profiled_peak: int) -> dict[str, Any]:
    """A results-like dict (curves, best, budget) for ``plot_batch_curve``, from traces."""
    from autofit.predict import estimate, fit_line, predict_max_batch

    key = f"{cand.input_size}/{cand.precision}/{cand.checkpoint_segments}"
    best = None
    if plan.limit_bytes:
        mb = predict_max_batch(spec, cand.with_batch(spec.search.batch_size.min),
                               plan.device_model, plan.limit_bytes)
        curve = mb.curve.to_dict()
        if mb.batch_size:
            est = mb.estimate
            best = {**cand.with_batch(mb.batch_size).to_dict(), "predicted": True,
                    "peak_bytes": est.peak_bytes if est else int(mb.curve.peak_at(mb.batch_size))}
    else:  # budget unknown: a line through this batch and twice it
        pts = [(b, estimate(spec, cand.with_batch(b), plan.device_model).peak_bytes)
               for b in (cand.batch_size, 2 * cand.batch_size)]
        intercept, slope = fit_line(pts)
        curve = {"intercept_bytes": intercept, "slope_bytes_per_sample": slope,
                 "points": pts, "residual": 0.0}
    curve["points"] = [list(p) for p in curve["points"]]
    return {
        "name": spec.name,
        "curves": {key: curve},
        "best": best,
        "trials": [],
        "budget_bytes": plan.budget_bytes or None,
        "limit_bytes": plan.limit_bytes or None,
        "margin": spec.memory.margin,
        "profiled": {"batch_size": cand.batch_size, "peak_bytes": profiled_peak},
        "setting": key,
    }


def _write_plots(prof: Any, plan: Any, curve_data: dict[str, Any] | None,
                 tune_results: dict[str, Any] | None, directory: Path) -> dict[str, str]:
    from autofit.plot import plot_batch_curve, plot_timeline

    out: dict[str, str] = {}
    data = tune_results if tune_results is not None else curve_data
    try:
        directory.mkdir(parents=True, exist_ok=True)
        out[PLOTS[0]] = plot_timeline(prof, directory / PLOTS[0],
                                      limit_bytes=plan.limit_bytes or None,
                                      budget_bytes=plan.budget_bytes or None)
        if data is not None:
            out[PLOTS[1]] = plot_batch_curve(data, directory / PLOTS[1])
    except ImportError:
        return {"skipped": f"matplotlib not installed: skipped {', '.join(PLOTS)} "
                           f"(pip install 'autofit[plot]')"}
    except OSError as exc:
        return {"skipped": f"cannot write plots to {directory}: {exc.strerror or exc}"}
    return {k: (f"wrote {directory / k}" if v.startswith("wrote ") else v)
            for k, v in out.items()}


# --------------------------------------------------------------------------- terminal


def _print(console: Any, spec: Any, prof: Any, plan: Any, knobs: list[Any], baseline: int) -> None:
    from rich.table import Table

    from autofit.report import breakdown_table
    from autofit.units import format_binary, format_bytes

    c = prof.candidate
    how = "measured on real tensors" if prof.real else "traced on fake tensors"
    where = f" ({prof.device_name})" if prof.device_name else ""
    console.print(f"[bold]profile[/bold] {spec.name}: {c.label()} on {prof.device_kind}{where}, "
                  f"{prof.steps} step(s) {how} in {prof.seconds:.2f} s "
                  f"({prof.param_count:,} parameters, {prof.timeline_events:,} alloc/free events)")
    b = prof.breakdown
    console.print(f"peak {format_bytes(prof.peak_bytes)} in {b.peak_phase} of step {b.peak_step}"
                  + (f"; limit {format_bytes(plan.limit_bytes)} "
                     f"({100 * prof.peak_bytes / plan.limit_bytes:.0f}% used)"
                     if plan.limit_bytes else "; budget unknown (set memory.budget)"))
    if prof.real:
        console.print(f"predicted peak on fake tensors: {format_bytes(baseline)}")
    for note in prof.notes:
        console.print(f"[dim]{note}[/dim]")

    table = Table(title="live memory per phase", title_justify="left")
    for col in ("step", "phase", "at start", "at end", "max", "change"):
        table.add_column(col, justify="left" if col in ("step", "phase") else "right")
    for span in prof.phases:
        mark = " [red]<- peak[/red]" if (span.phase == b.peak_phase and span.step == b.peak_step
                                         and span.max_bytes == prof.traced_peak_bytes) else ""
        delta = span.end_bytes - span.start_bytes
        table.add_row(str(span.step) if span.step else "-", span.phase,
                      format_binary(span.start_bytes), format_binary(span.end_bytes),
                      format_binary(span.max_bytes) + mark,
                      ("+" if delta >= 0 else "-") + format_binary(abs(delta)))
    console.print(table)

    console.print(breakdown_table(b, "by category at the peak", plan.limit_bytes or None))

    rows = [m for m in prof.modules if m.allocated_bytes or m.saved_bytes]
    if rows:
        shown = sorted(rows, key=lambda m: -m.allocated_bytes)[:MODULE_ROWS]
        order = {id(m): i for i, m in enumerate(rows)}
        shown.sort(key=lambda m: order[id(m)])
        table = Table(title="forward, per module (step 1; innermost module that allocated)",
                      title_justify="left")
        for col in ("module", "type", "allocated", "saved for backward", "tensors"):
            table.add_column(col, justify="left" if col in ("module", "type") else "right")
        for m in shown:
            table.add_row(m.module, m.kind, format_binary(m.allocated_bytes),
                          format_binary(m.saved_bytes), str(m.tensors))
        console.print(table)
        if len(rows) > len(shown):
            console.print(f"[dim]... {len(rows) - len(shown)} more modules with smaller "
                          f"allocations (--json lists all)[/dim]")

    if prof.top_tensors:
        table = Table(title=f"largest tensors alive at the peak (top {len(prof.top_tensors)})",
                      title_justify="left")
        for col in ("shape", "dtype", "size", "category", "made in", "module"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for t in prof.top_tensors:
            made = f"{t.phase} {t.step}" if t.step else t.phase
            module = t.module or "-"
            table.add_row(str(tuple(t.shape)), t.dtype, format_binary(t.bytes), t.category,
                          made, module)
        console.print(table)

    if knobs:
        table = Table(title=f"what if (re-traced; baseline {format_binary(baseline)})",
                      title_justify="left")
        for col in ("knob", "change", "predicted peak", "saving", "saving %", "fits limit"):
            table.add_column(col, justify="left" if col in ("knob", "change") else "right")
        for k in knobs:
            if not k.applicable:
                table.add_row(k.knob, k.change, f"[dim]{k.reason}[/dim]", "", "", "")
                continue
            sign = "" if k.saving_bytes >= 0 else "-"
            color = "green" if k.saving_bytes > 0 else ("red" if k.saving_bytes < 0 else "dim")
            fits = ("-" if not plan.limit_bytes else
                    "yes" if k.predicted_peak_bytes <= plan.limit_bytes else "[red]no[/red]")
            table.add_row(k.knob, k.change, format_binary(k.predicted_peak_bytes),
                          f"[{color}]{sign}{format_binary(abs(k.saving_bytes))}[/{color}]",
                          f"[{color}]{k.saving_pct:.1f}%[/{color}]", fits)
        console.print(table)
