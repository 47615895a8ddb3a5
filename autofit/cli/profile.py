"""``autofit profile``: where the memory of one training step goes, and what each knob saves.

The command calls ``autofit.api.profile`` and prints its tables; plots go to ``--plot-dir``
(default ``<output.dir>/profile``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autofit.cli.common import (
    BatchOpt,
    CacheDirOpt,
    InputSizeOpt,
    JsonOpt,
    NoCacheOpt,
    PrecisionOpt,
    SegmentsOpt,
    SpecPath,
    cache_line,
    cache_setting,
    err,
    fail,
    out,
)
from autofit.cli.report import breakdown_table
from autofit.errors import AutofitError
from autofit.units import format_binary, format_bytes

MODULE_ROWS = 30


def profile(
    spec_path: SpecPath, batch_size: BatchOpt = None, input_size: InputSizeOpt = None,
    precision: PrecisionOpt = None, segments: SegmentsOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N: device model (and device for --real)")] = None,
    real: Annotated[bool, typer.Option("--real", help="measure real steps on the device instead of fake tensors")] = False,
    results: Annotated[Path | None, typer.Option("--results", help="a tune results.json: its trials and chosen config go on the batch plot")] = None,
    plot_dir: Annotated[Path | None, typer.Option("--plot-dir", help="where the PNGs go (default: <output.dir>/profile)")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="no PNGs (and no batch-curve traces)")] = False,
    with_what_if: Annotated[bool, typer.Option("--what-if/--no-what-if", help="re-trace each knob (default on)")] = True,
    top: Annotated[int, typer.Option("--top", help="tensors alive at the peak to list")] = 10,
    as_json: JsonOpt = False, no_cache: NoCacheOpt = False, cache_dir: CacheDirOpt = None,
) -> None:
    """Follow memory through one training step and show what each knob would save.

    Fake tensors by default (instant, no GPU); --real measures the step on the device.
    Writes memory_timeline.png and peak_vs_batch.png when matplotlib is installed.
    """
    from autofit.api import profile as api_profile

    log = err if as_json else out
    try:
        with err.status("profiling (and re-tracing the what-ifs) ..."):
            result = api_profile(spec_path, batch_size=batch_size, input_size=input_size,
                                 precision=precision, segments=segments, device=device,
                                 real=real, what_if=with_what_if, plot_dir=plot_dir,
                                 plots=not no_plot, top=top, results=results,
                                 cache=cache_setting(no_cache, cache_dir))
    except AutofitError as exc:
        fail(exc)
    prof, plan = result.profile, result.plan
    if as_json:
        data = prof.to_dict()
        data.update(
            spec=result.spec_name, margin=result.margin,
            predicted_peak_bytes=result.baseline_bytes,
            budget_bytes=plan.budget_bytes or None, limit_bytes=plan.limit_bytes or None,
            what_if=[k.to_dict() for k in result.what_if], plots=result.plots,
            batch_curve=dataclasses.asdict(result.batch_curve) if result.batch_curve else None,
            trace_cache=result.cache,
        )
        for line in result.plots.values():
            log.print(line, markup=False)
        print(json.dumps(data, indent=2, default=str))
        return
    _print(out, result.spec_name, prof, plan, result.what_if, result.baseline_bytes)
    for line in result.plots.values():
        log.print(line, markup=False)
    if (line := cache_line(result.cache)) is not None:
        log.print(line, markup=False)


# --------------------------------------------------------------------------- terminal


def _print(console: Console, name: str, prof: Any, plan: Any, knobs: list[Any],
           baseline: int) -> None:
    _print_header(console, name, prof, plan, baseline)
    _print_phases(console, prof)
    console.print(breakdown_table(prof.breakdown, "by category at the peak", plan.limit_bytes or None))
    _print_modules(console, prof)
    _print_tensors(console, prof)
    if knobs:
        _print_what_if(console, plan, knobs, baseline)


def _print_header(console: Console, name: str, prof: Any, plan: Any, baseline: int) -> None:
    c = prof.candidate
    how = "measured on real tensors" if prof.real else "traced on fake tensors"
    where = f" ({prof.device_name})" if prof.device_name else ""
    console.print(f"[bold]profile[/bold] {name}: {c.label()} on {prof.device_kind}{where}, "
                  f"{prof.steps} step(s) {how} in {prof.seconds:.2f} s "
                  f"({prof.param_count:,} parameters, {prof.timeline_events:,} alloc/free events)")
    b = prof.breakdown
    console.print(f"peak {format_bytes(prof.peak_bytes)} in {b.peak_phase} of step {b.peak_step}"
                  + (f"; limit {format_bytes(plan.limit_bytes)} "
                     f"({100 * prof.peak_bytes / plan.limit_bytes:.0f}% used)"
                     if plan.limit_bytes else "; budget unknown (set memory.budget)"))
    if prof.real:
        console.print(f"predicted peak on fake tensors: {format_bytes(baseline)}")
    if prof.per_rank:  # one rank of DDP / FSDP2
        extras = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}"
                           for k, v in prof.per_rank["rank_bytes"].items())
        console.print(f"per rank: {prof.per_rank['strategy']} over "
                      f"{prof.per_rank['world_size']} ranks, peak "
                      f"{format_bytes(prof.per_rank['peak_bytes'])}"
                      + (f" ({extras})" if extras else ""))
    for note in prof.notes:
        console.print(f"[dim]{escape(note)}[/dim]")


def _print_phases(console: Console, prof: Any) -> None:
    b = prof.breakdown
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


def _print_modules(console: Console, prof: Any) -> None:
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
            table.add_row(escape(m.module), escape(m.kind), format_binary(m.allocated_bytes),
                          format_binary(m.saved_bytes), str(m.tensors))
        console.print(table)
        if len(rows) > len(shown):
            console.print(f"[dim]... {len(rows) - len(shown)} more modules with smaller "
                          f"allocations (--json lists all)[/dim]")


def _print_tensors(console: Console, prof: Any) -> None:
    if prof.top_tensors:
        table = Table(title=f"largest tensors alive at the peak (top {len(prof.top_tensors)})",
                      title_justify="left")
        for col in ("shape", "dtype", "size", "category", "made in", "module"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for t in prof.top_tensors:
            made = f"{t.phase} {t.step}" if t.step else t.phase
            module = t.module or "-"
            table.add_row(str(tuple(t.shape)), t.dtype, format_binary(t.bytes), t.category,
                          made, escape(module))
        console.print(table)


def _print_what_if(console: Console, plan: Any, knobs: list[Any], baseline: int) -> None:
    if knobs:
        table = Table(title=f"what if (re-traced; baseline {format_binary(baseline)})",
                      title_justify="left")
        for col in ("knob", "change", "predicted peak", "saving", "saving %", "fits limit"):
            table.add_column(col, justify="left" if col in ("knob", "change") else "right")
        for k in knobs:
            if not k.applicable:
                table.add_row(escape(k.knob), escape(k.change), f"[dim]{escape(k.reason)}[/dim]", "", "", "")
                continue
            sign = "" if k.saving_bytes >= 0 else "-"
            color = "green" if k.saving_bytes > 0 else ("red" if k.saving_bytes < 0 else "dim")
            fits = ("-" if not plan.limit_bytes else
                    "yes" if k.predicted_peak_bytes <= plan.limit_bytes else "[red]no[/red]")
            table.add_row(escape(k.knob), escape(k.change), format_binary(k.predicted_peak_bytes),
                          f"[{color}]{sign}{format_binary(abs(k.saving_bytes))}[/{color}]",
                          f"[{color}]{k.saving_pct:.1f}%[/{color}]", fits)
        console.print(table)
