"""Terminal output: rich tables for estimates, trials and tune results.

Sizes are printed in binary units with the decimal form beside them, labelled, because GPU
memory is quoted both ways ("40GB" A100 = 40 GiB of HBM, minus what the driver keeps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autofit.choices import Purpose
from autofit.search.events import Note, TrialFinished, TrialStarted, TuneEvent
from autofit.units import format_binary, format_bytes, format_decimal

if TYPE_CHECKING:  # torch-importing modules: the CLI starts without them
    from autofit.memory import MemoryBreakdown
    from autofit.predict.batch_curve import MaxBatchEstimate
    from autofit.predict.trace import MemoryEstimate
    from autofit.search.results import TrialRecord, TuneResult
    from autofit.trials.result import TrialResult


def _mib(num_bytes: int | float | None) -> str:
    return "-" if num_bytes is None else format_binary(num_bytes)


def breakdown_table(memory: MemoryBreakdown, title: str, limit_bytes: int | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("category")
    table.add_column("binary (GiB/MiB)", justify="right")
    table.add_column("decimal (GB/MB)", justify="right")
    table.add_column("share", justify="right")
    peak = max(memory.peak_bytes, 1)
    for name, value in memory.categories().items():
        table.add_row(name, format_binary(value), format_decimal(value), f"{100 * value / peak:.1f}%")
    table.add_row("[bold]peak[/bold]", f"[bold]{format_binary(memory.peak_bytes)}[/bold]",
                  format_decimal(memory.peak_bytes), f"in {memory.peak_phase} (step {memory.peak_step})")
    if memory.reserved_bytes is not None:
        table.add_row("reserved (allocator)", format_binary(memory.reserved_bytes),
                      format_decimal(memory.reserved_bytes), "")
    if limit_bytes:
        table.add_row("limit (budget x (1 - margin))", format_binary(limit_bytes),
                      format_decimal(limit_bytes), "")
    return table


def print_estimate(console: Console, est: MemoryEstimate, max_batch: MaxBatchEstimate | None,
                   budget_bytes: int, limit_bytes: int, per_layer: bool,
                   notes: list[str] | None = None) -> None:
    c = est.candidate
    how = ("read from the trace cache" if est.cached
           else f"traced in {est.trace_time_s:.2f} s")
    console.print(f"[bold]estimate[/bold] {c.label()} on {est.device_kind} "
                  f"({est.param_count:,} parameters, {how})")
    if getattr(est, "strategy", "none") != "none":  # autofit.predict.distributed.RankEstimate
        extras = ", ".join(f"{k.replace('_', ' ')} {format_binary(v)}"
                           for k, v in est.rank_bytes.items())
        console.print(f"per rank: {est.strategy} over {est.world_size} ranks"
                      + (f" ({extras})" if extras else ""), markup=False)
    console.print(breakdown_table(est.breakdown, "predicted memory at the peak", limit_bytes))
    if est.device_kind == "cuda":
        console.print(f"predicted max_memory_allocated {format_bytes(est.allocated_bytes)}, "
                      f"max_memory_reserved {format_bytes(est.reserved_bytes)} (device model)")
    if per_layer and est.layers:
        table = Table(title="per module (step 1 forward)", title_justify="left")
        for col in ("module", "type", "params", "saved for backward", "cumulative"):
            table.add_column(col, justify="left" if col in ("module", "type") else "right")
        for row in est.layers:
            table.add_row(escape(row.name), escape(row.kind), _mib(row.params_bytes), _mib(row.saved_bytes),
                          _mib(row.cumulative_bytes))
        console.print(table)
    if max_batch is None:
        console.print("max batch: unknown (memory.budget is 'auto' and the device is not here); "
                      "set memory.budget to predict it")
    elif max_batch.batch_size == 0:
        pass  # the command ends with nothing_fits_line, as tune does
    else:
        curve = max_batch.curve
        console.print(
            f"batch curve: peak = {format_binary(curve.intercept_bytes)} + "
            f"{format_binary(curve.slope_bytes_per_sample)} x batch "
            f"(affine-fit residual {100 * curve.residual:.3f}%, {max_batch.traces} traces)"
        )
        console.print(
            f"[bold]predicted max batch {max_batch.batch_size}[/bold] under "
            f"{format_bytes(limit_bytes)} = budget {format_bytes(budget_bytes)} x (1 - margin)"
        )
    for note in notes or []:
        console.print(f"[yellow]warning:[/yellow] {escape(note)}")


def nothing_fits_line(max_batch: MaxBatchEstimate, limit_bytes: int) -> str:
    """``estimate`` when even the smallest batch is predicted not to fit (then it exits 2,
    as ``tune`` does when nothing fits)."""
    smallest = max_batch.estimates[min(max_batch.estimates)]
    return (f"nothing fits: {smallest.candidate.label()} is predicted to peak at "
            f"{format_bytes(smallest.peak_bytes)}, over the limit {format_bytes(limit_bytes)} "
            f"(budget x (1 - margin))")


def strategy_lines(rows: list[dict[str, Any]], batch_size: int) -> list[str]:
    """``estimate`` of a ``parallel.strategy`` list: one line per strategy, one rank each."""
    if not rows:
        return []
    lines = [f"per strategy (one rank of each: its peak at batch {batch_size}, its largest "
             f"batch per rank under the limit):"]
    for row in rows:
        where = ("one process" if row["strategy"] == "none"
                 else f"over {row['world_size']} ranks")
        batch = "unknown" if row["max_batch_size"] is None else str(row["max_batch_size"])
        lines.append(f"  {row['strategy']:<5} {where:<16} per-rank peak "
                     f"{format_binary(row['peak_bytes']):>11}  max batch per rank {batch}")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _shorten(text: str, width: int) -> str:
    """``text`` cut at the last word boundary within ``width`` characters, marked with …"""
    if len(text) <= width:
        return text
    cut = text[:width].rsplit(" ", 1)[0] if " " in text[:width] else text[:width]
    return cut.rstrip(" ,;:(") + "…"


def trial_line(record: TrialRecord) -> str:
    r = record.result
    status = {"fits": "[green]fits[/green]", "oom": "[yellow]oom[/yellow]"}.get(
        r.status.value, f"[red]{r.status.value}[/red]")
    speed = f"  {r.samples_per_s:,.1f} samples/s" if r.samples_per_s else ""
    resumed = " (resumed)" if record.resumed else ""
    msg = f"  {escape(_shorten(r.message, 110))}" if r.status.value not in ("fits",) and r.message else ""
    warn = f"  [yellow]{escape(r.warning)}[/yellow]" if r.warning else ""
    return (f"trial {record.number:>3} {record.purpose.value:<9} {r.candidate.label():<36} "
            f"pred {_mib(record.predicted_peak_bytes):>11}  meas {_mib(r.peak_bytes):>11}  "
            f"{status}  {r.wall_time_s:5.1f} s{speed}{resumed}{msg}{warn}")


def print_trial(console: Console, result: TrialResult) -> None:
    console.print(f"[bold]trial[/bold] {result.candidate.label()}: {result.status.value}"
                  + (f" — {escape(result.message)}" if result.message else ""))
    if result.memory is not None and result.status.value == "fits":
        console.print(breakdown_table(result.memory, "measured memory at the peak", result.limit_bytes))
    if result.step_time_s:
        units = (f", {result.units_per_s:,.0f} {result.units_name}/s"
                 if result.units_per_s and result.units_name else "")
        console.print(f"median step {result.step_time_s * 1000:.1f} ms, "
                      f"{result.samples_per_s:,.1f} samples/s{units}; {result.steps_run} steps; "
                      f"limit kind {result.limit_kind}; overhead {result.overhead_s:.2f} s")
    if result.warning:
        console.print(f"[yellow]warning:[/yellow] {escape(result.warning)}")


def print_tune(console: Console, result: TuneResult) -> None:
    table = Table(title="trials", title_justify="left")
    for col in ("#", "purpose", "batch", "size", "precision", "ckpt", "predicted", "measured",
                "error", "status", "samples/s", "s"):
        table.add_column(col, justify="right" if col not in ("purpose", "status", "precision") else "left")
    best_number = result.best.number if result.best else None
    for record in result.trials:
        r = record.result
        c = r.candidate
        err = ""
        if record.predicted_peak_bytes and r.peak_bytes and r.fits:
            err = f"{100 * (record.predicted_peak_bytes / r.peak_bytes - 1):+.2f}%"
        mark = " ★" if record.number == best_number else ""
        table.add_row(f"{record.number}{mark}", record.purpose.value, str(c.batch_size), str(c.input_size),
                      c.precision + (f" {c.strategy}" if c.strategy else ""),  # a strategy list
                      str(c.checkpoint_segments), _mib(record.predicted_peak_bytes),
                      _mib(r.peak_bytes), err, r.status.value,
                      f"{r.samples_per_s:,.1f}" if r.samples_per_s else "-", f"{r.wall_time_s:.1f}")
    console.print(table)
    if len(result.settings) > 1:
        st = Table(title="largest batch per setting (measured where tried, else predicted)",
                   title_justify="left")
        ranks = any(s.setting.strategy for s in result.settings)  # parallel.strategy list
        for col in ("size", "precision", "ckpt") + (("strategy",) if ranks else ()) + (
                "predicted", "measured", "pinned"):
            st.add_column(col, justify="right")
        for s in sorted(result.settings, key=lambda s: (s.input_size, s.precision, s.checkpoint_segments,
                                                        s.setting.strategy)):
            st.add_row(str(s.input_size), s.precision, str(s.checkpoint_segments),
                       *((s.setting.strategy,) if ranks else ()),
                       str(s.predicted_batch_size), str(s.measured_batch_size or "-"),
                       "yes" if s.pinned else "")
        console.print(st)
        front = result.pareto()
        console.print("Pareto front (input size, batch) per precision, measured where tried, "
                      "else predicted: " + "; ".join(
            f"{p}: " + ", ".join(f"({x['input_size']}, {x['batch_size']})" for x in pts)
            for p, pts in front.items()))
    if result.best is not None:
        best = result.best.result
        verified = "verified" if result.best.purpose == Purpose.VERIFY else "not verified"
        if result.best.reused:
            verified += f" by search trial {result.best.number}, {best.steps_run} steps run"
        else:
            verified += f" over {result.best.steps} steps"
        console.print(f"[bold green]best[/bold green] {best.candidate.label()} ({verified}): "
                      f"peak {format_bytes(best.peak_bytes or 0)}, "
                      f"{best.samples_per_s or 0:,.1f} samples/s")
        console.print(f"step proven: {result.step_kind.describe()}")
        if best.memory is not None:
            console.print(breakdown_table(best.memory, "memory of the winner (measured)", result.limit_bytes))
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    resumed = sum(1 for t in result.trials if t.resumed)
    console.print((f"{_count(resumed, 'trial')} resumed from the study, " if resumed else "")
                  + f"{_count(result.real_trials, 'real trial')} run now "
                  f"({result.search_trials} to search, "
                  + ("the verification reused the one at the winner), "
                     if result.best is not None and result.best.reused else "the rest to verify), ")
                  + f"{_count(result.real_steps, 'training step')} ({result.search_steps} to search), "
                  f"prediction {result.predict_s:.1f} s, total {result.wall_time_s:.1f} s; "
                  f"budget {format_bytes(result.budget_bytes)}, margin {result.spec.memory.margin:.0%}, "
                  f"limit {format_bytes(result.limit_bytes)}")


def targets_lines(targets: list[dict[str, Any]]) -> list[str]:
    lines = []
    for t in targets:
        status = ("FAILED" if t.get("failed") else
                  f"measured on {t.get('measured_on')}" if t.get("measured") else
                  "verified" if t.get("verified") else "predicted-only")
        if t.get("batch_capped"):
            status += "; capped by search.batch_size.max, not by memory"
        lines.append(f"target {t['name']} ({format_bytes(t['memory_bytes'])}): batch {t.get('batch_size')} "
                     f"{t.get('precision')} ckpt={t.get('checkpoint_segments')} ({status})")
    return lines


class TuneProgress:
    """The ``on_event`` handler of ``autofit tune``: a status line, one line per trial."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status = console.status("predicting ...", spinner="dots")

    def __enter__(self) -> TuneProgress:
        self.status.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.status.stop()

    def __call__(self, event: TuneEvent) -> None:
        if isinstance(event, TrialStarted):
            self.status.update(f"running trial ({event.purpose}): {event.candidate.label()}")
        elif isinstance(event, TrialFinished):
            self.console.print(trial_line(event.record))
            self.status.update("choosing the next trial ...")
        elif isinstance(event, Note):
            self.console.print(f"[dim]{escape(event.message)}[/dim]")


def print_dry_run_note(console: Console, results: dict[str, Any]) -> None:
    """Warn when GPU scripts were made from a result tuned on a CPU."""
    from autofit.export.launchers import cpu_dry_run_note

    note = cpu_dry_run_note(results)
    if note:
        console.print(f"[yellow]warning:[/yellow] {escape(note)}")


def print_tune_summary(console: Console, result: TuneResult) -> None:
    """The trial table, the winner, the batch plan and the targets."""
    from autofit.export import output_spec_of, plan_batch, summarize_plan
    from autofit.export.launchers import train_command_given

    print_tune(console, result)
    if result.best is None:
        return
    won = result.best.result.candidate.strategy  # a strategy list: the winner's layout
    o = output_spec_of({"spec": result.spec.raw, "best": {"strategy": won} if won else {}})
    plan = plan_batch(result.best.result.candidate.batch_size, o.nodes * o.gpus_per_node,
                      o.global_batch_size)
    for line in summarize_plan(plan) + targets_lines(result.targets):
        console.print(line, markup=False)
    if o.scripts:
        print_dry_run_note(console, {"device": result.device})
        if not train_command_given({"spec": result.spec.raw}, o):
            console.print("[yellow]note:[/yellow] no output.train_command in the spec: the "
                          "scripts run the placeholder YOUR_TRAIN_SCRIPT.py; set it and run "
                          "autofit export")
