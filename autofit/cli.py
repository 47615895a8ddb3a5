"""The ``autofit`` command: parse, call the library, print. Errors: one line each, exit 2."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from autofit.cli_profile import profile
from autofit.errors import AutofitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the largest PyTorch training configuration that fits, proven by real steps.")
# Wide enough for the trial table when output is piped (rich falls back to 80 columns).
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)

SpecPath = Annotated[Path, typer.Argument(help="YAML experiment spec", show_default=False)]


def _fail(exc: AutofitError) -> NoReturn:
    for line in exc.problems:
        err.print(f"[red]error:[/red] {line}", markup=True)
    raise typer.Exit(code=exc.exit_code)


def _load(path: Path) -> Any:
    from autofit.spec import load_spec

    return load_spec(path)


def _candidate(spec: Any, batch_size: int | None, input_size: int | None, precision: str | None,
               segments: int | None) -> Any:
    from autofit.candidate import Candidate
    from autofit.errors import SpecError

    problems = []
    if precision is not None and precision not in ("fp32", "fp16", "bf16"):
        problems.append(f"--precision: must be one of fp32, fp16, bf16, got {precision!r}")
    if batch_size is not None and batch_size < 1:
        problems.append(f"--batch-size: must be >= 1, got {batch_size}")
    if input_size is not None and input_size < 1:
        problems.append(f"--input-size: must be >= 1, got {input_size}")
    if segments is not None and segments < 0:
        problems.append(f"--segments: must be >= 0, got {segments}")
    if problems:
        raise SpecError(problems)
    s = spec.search
    return Candidate(
        batch_size=batch_size or s.batch_size.min,
        input_size=input_size or spec.input_sizes[-1],
        precision=precision or s.precisions[0],
        checkpoint_segments=segments if segments is not None else s.checkpoint_segments[0],
    )


@app.command()
def validate(spec_path: SpecPath) -> None:
    """Check a spec and build its model and optimizer on fake tensors (no real memory)."""
    try:
        spec = _load(spec_path)
        from autofit.candidate import Candidate
        from autofit.predict import trace
        from autofit.tune import plan_limits, settings_of

        plan = plan_limits(spec, require_device=False)
        size, precision, segments = settings_of(spec)[-1]
        cand = Candidate(batch_size=spec.search.batch_size.min, input_size=size,
                         precision=precision, checkpoint_segments=segments)
        tracker, params, seconds = trace(spec, cand, plan.device_model)
    except AutofitError as exc:
        _fail(exc)
    out.print(f"[green]ok[/green] {spec_path}: {spec.name!r}, {params:,} parameters, "
              f"{len(settings_of(spec))} setting(s) to search; two steps traced on fake tensors "
              f"in {seconds:.2f} s (peak {tracker.peak_bytes:,} bytes at batch {cand.batch_size})")


@app.command()
def estimate(
    spec_path: SpecPath,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="default: search.batch_size.min")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size", help="image side / sequence length")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="fp32 | fp16 | bf16")] = None,
    segments: Annotated[int | None, typer.Option("--segments", help="checkpoint segments")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda: device model to apply")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="per-module table")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """Predict peak memory of one configuration and the largest batch under the budget."""
    try:
        spec = _load(spec_path)
        from autofit.predict import estimate as predict_estimate
        from autofit.predict import predict_max_batch
        from autofit.tune import plan_limits

        plan = plan_limits(spec, device, require_device=False)
        cand = _candidate(spec, batch_size, input_size, precision, segments)
        est = predict_estimate(spec, cand, plan.device_model, per_layer=per_layer)
        mb = (predict_max_batch(spec, cand.with_batch(spec.search.batch_size.min),
                                plan.device_model, plan.limit_bytes, known=[est])
              if plan.limit_bytes else None)
    except AutofitError as exc:
        _fail(exc)
    if as_json:
        data = est.to_dict()
        data.update(
            breakdown=est.breakdown.to_dict(),
            max_batch_size=mb.batch_size if mb else None,
            batch_curve=mb.curve.to_dict() if mb else None,
            budget_bytes=plan.budget_bytes,
            margin=spec.memory.margin,
            limit_bytes=plan.limit_bytes,
            layers=[vars(r) for r in est.layers] if per_layer else None,
        )
        print(json.dumps(data, indent=2, default=str))
        return
    from autofit.report import print_estimate

    print_estimate(out, est, mb, plan.budget_bytes, plan.limit_bytes, per_layer)


@app.command()
def trial(
    spec_path: SpecPath,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size")] = None,
    precision: Annotated[str | None, typer.Option("--precision")] = None,
    segments: Annotated[int | None, typer.Option("--segments")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="timed steps after the warm-up")] = None,
    timeout_s: Annotated[float | None, typer.Option("--timeout", help="seconds")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run one real trial (fresh process) under the spec's budget and print what it measured."""
    try:
        spec = _load(spec_path)
        from autofit.trial import run_trial
        from autofit.tune import plan_limits

        plan = plan_limits(spec)
        cand = _candidate(spec, batch_size, input_size, precision, segments)
        _install_signal_handlers()
        result = run_trial(spec, cand, limit_bytes=plan.limit_bytes, steps=steps,
                           timeout_s=timeout_s, device=plan.device)
    except AutofitError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(code=130) from None
    if as_json:
        data = result.to_dict()
        data.update({k: v for k, v in result.extra.items() if k != "traceback"})
        print(json.dumps(data, indent=2, default=str))
    else:
        from autofit.report import print_trial

        print_trial(out, result)
    if result.status.value == "error":
        raise typer.Exit(code=2)  # the spec or the user's code is wrong, as for validate
    if result.status.value in ("timeout", "crashed"):
        raise typer.Exit(code=1)


_INTERRUPTS = {"count": 0}


def _install_signal_handlers() -> None:
    """First Ctrl-C/SIGTERM: kill the running trial, keep what finished. Second: exit now."""
    from autofit.trial import kill_active_trials

    def handler(signum: int, frame: Any) -> None:
        _INTERRUPTS["count"] += 1
        kill_active_trials()
        if _INTERRUPTS["count"] > 1:
            import os

            os._exit(130)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@app.command()
def tune(
    spec_path: SpecPath,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output dir (default: output.dir)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted tune")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output dir")] = False,
    storage: Annotated[str | None, typer.Option("--storage", help="optuna RDB URL instead of the journal file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results.json to stdout")] = False,
) -> None:
    """Search the largest configuration that fits; write results.json, tuned.yaml and scripts."""
    from autofit.output import locked_output_dir, write_results

    try:
        spec = _load(spec_path)
        from autofit.export import summarize_plan, write_exports
        from autofit.tune import tune as run_tune

        directory = out_dir or Path(spec.output.dir)
        if not directory.is_absolute() and out_dir is None and spec.source_path:
            directory = Path.cwd() / directory
        _install_signal_handlers()
        log = err if as_json else out
        with locked_output_dir(directory, resume=resume, force=force) as path:
            from autofit.report import print_tune, targets_lines, trial_line

            try:
                status = log.status("predicting ...", spinner="dots")
                status.start()

                def started(candidate: Any, purpose: str) -> None:
                    status.update(f"running trial ({purpose}): {candidate.label()}")

                def finished(record: Any) -> None:
                    log.print(trial_line(record))
                    status.update("choosing the next trial ...")

                try:
                    result = run_tune(spec, out_dir=path, resume=resume, storage=storage,
                                      on_trial=finished, on_start=started,
                                      on_event=lambda m: log.print(f"[dim]{escape(m)}[/dim]"))
                finally:
                    status.stop()
            except (AutofitError, KeyboardInterrupt) as exc:
                partial = getattr(exc, "partial", None)
                if partial is not None and partial.trials:
                    data = partial.to_dict()
                    data["error"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
                    write_results(path, data)
                    err.print(f"{len(partial.trials)} finished trial(s) kept in {path / 'results.json'} "
                              f"and {path / 'study.journal'}; continue with: "
                              f"autofit tune {spec_path} --out {path} --resume")
                if isinstance(exc, KeyboardInterrupt):
                    err.print("[yellow]interrupted[/yellow]")
                    raise typer.Exit(code=130) from None
                raise
            data = result.to_dict()
            write_results(path, data)
            written = write_exports(data, path)
            plot_note = _plot(path, data, spec)
        if as_json:
            print(json.dumps(data, indent=2, default=str))
            return
        print_tune(out, result)
        from autofit.export import output_spec_of, plan_batch

        o = output_spec_of(data)
        plan = plan_batch(data["best"]["batch_size"], o.nodes * o.gpus_per_node, o.global_batch_size)
        for line in summarize_plan(plan) + targets_lines(result.targets):
            out.print(line)
        out.print(f"wrote {path / 'results.json'}, {path / 'tuned.yaml'} and "
                  f"{len(written)} export files in {path}" + (f"; {escape(plot_note)}" if plot_note else ""))
    except AutofitError as exc:
        _fail(exc)


def _plot(path: Path, data: dict[str, Any], spec: Any) -> str:
    try:
        from autofit.plot import plot_batch_curve
    except ImportError:
        return ""
    try:
        return plot_batch_curve(data, path / "peak_vs_batch.png")
    except ImportError:
        return "matplotlib not installed: skipped peak_vs_batch.png (pip install 'autofit[plot]')"
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a plot must never lose results
        return f"skipped peak_vs_batch.png: {type(exc).__name__}: {exc}"


@app.command()
def export(
    results_path: Annotated[Path, typer.Argument(help="results.json written by autofit tune")],
    fmt: Annotated[list[str] | None, typer.Option("--format", "-f", help="slurm | lsf | torchrun | lightning | hf | deepspeed | targets (repeatable; default all)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: next to results.json")] = None,
) -> None:
    """Regenerate submission scripts and framework configs from results.json, without re-tuning."""
    try:
        from autofit.export import load_results, write_exports

        data = load_results(results_path)
        written = write_exports(data, out_dir or results_path.parent, fmt or None)
    except AutofitError as exc:
        _fail(exc)
    for path in written:
        out.print(f"wrote {path}")


app.command()(profile)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
