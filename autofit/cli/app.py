"""The ``autofit`` commands: parse the arguments, call ``autofit.api``, print the answer.

Errors: one line per problem on stderr, exit code 2 (130 when interrupted); no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

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
    install_signal_handlers,
    out,
)
from autofit.cli.profile import profile
from autofit.cli.workers import results, worker
from autofit.errors import AutofitError, TuneFailed, TuneInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find the largest PyTorch training configuration that fits, proven by real steps.")


@app.command()
def validate(spec_path: SpecPath) -> None:
    """Check a spec and build its model and optimizer on fake tensors (no real memory)."""
    from autofit.errors import SpecError
    from autofit.spec import load_spec

    try:  # the spec's own structure first: a bad spec is answered without importing torch
        load_spec(spec_path, check_imports=False)
    except SpecError as exc:
        fail(exc, note=None if exc.unread else "import paths (model, optimizer, loss, step) "
                       "are checked once the problems above are fixed")
    from autofit.api import as_spec
    from autofit.predict.trace import trace
    from autofit.search.plan import plan_limits, settings_of

    try:
        spec = as_spec(spec_path)
        plan = plan_limits(spec, require_device=False)
        settings = settings_of(spec)
        cand = settings[-1].candidate(spec.search.batch_size.min)
        tracker, params, seconds = trace(spec, cand, plan.device_model)
    except AutofitError as exc:
        fail(exc)
    out.print(f"[green]ok[/green] {escape(str(spec_path))}: {escape(repr(spec.name))}, {params:,} parameters, "
              f"{len(settings)} setting(s) to search; two steps traced on fake tensors "
              f"in {seconds:.2f} s (peak {tracker.peak_bytes:,} bytes at batch {cand.batch_size})")


@app.command()
def estimate(
    spec_path: SpecPath, batch_size: BatchOpt = None, input_size: InputSizeOpt = None,
    precision: PrecisionOpt = None, segments: SegmentsOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N: device model to apply")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="per-module table")] = False,
    as_json: JsonOpt = False, no_cache: NoCacheOpt = False, cache_dir: CacheDirOpt = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="run a real probe first and correct ops whose fake kernels "
                            "misreport (kept in <output.dir>/calibration.json)")] = False,
) -> None:
    """Predict peak memory of one configuration and the largest batch under the budget."""
    from autofit.api import estimate as api_estimate

    try:
        if calibrate:
            install_signal_handlers()
        result = api_estimate(spec_path, batch_size=batch_size, input_size=input_size,
                              precision=precision, segments=segments, device=device,
                              per_layer=per_layer, cache=cache_setting(no_cache, cache_dir),
                              calibrate=calibrate)
    except AutofitError as exc:
        fail(exc)
    nothing_fits = result.max_batch is not None and result.max_batch.batch_size == 0
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        if nothing_fits:
            raise typer.Exit(code=2)  # as tune: nothing fits
        return
    from autofit.cli.report import print_estimate

    plan = result.plan
    print_estimate(out, result.estimate, result.max_batch, plan.budget_bytes, plan.limit_bytes,
                   per_layer, plan.notes + result.notes)
    from autofit.cli.report import strategy_lines

    for line in strategy_lines(result.per_strategy, result.estimate.candidate.batch_size):
        out.print(line, markup=False)
    if result.max_batch is not None and result.max_batch.batch_size == 0:
        from autofit.api import as_spec
        from autofit.predict.distributed import sharding_line

        line = sharding_line(as_spec(spec_path), result.estimate.candidate, plan.device_model,
                             plan.limit_bytes)
        if line:
            out.print(line, markup=False)
    for line in result.calibration:
        out.print(f"calibration: {line}", markup=False)
    if (line := cache_line(result.cache)) is not None:
        out.print(line, markup=False)
    if nothing_fits:
        from autofit.cli.report import nothing_fits_line

        fail(AutofitError(nothing_fits_line(result.max_batch, plan.limit_bytes)))


@app.command()
def trial(
    spec_path: SpecPath, batch_size: BatchOpt = None, input_size: InputSizeOpt = None,
    precision: PrecisionOpt = None, segments: SegmentsOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="timed steps after the warm-up")] = None,
    timeout_s: Annotated[float | None, typer.Option("--timeout", help="seconds")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one real trial (fresh process) under the spec's budget and print what it measured."""
    from autofit.api import trial as api_trial

    try:
        install_signal_handlers()
        result = api_trial(spec_path, batch_size=batch_size, input_size=input_size,
                           precision=precision, segments=segments, steps=steps,
                           timeout_s=timeout_s)
    except AutofitError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(code=130) from None
    if as_json:
        data = result.to_dict()
        data.update({k: v for k, v in result.extra.items() if k != "traceback"})
        print(json.dumps(data, indent=2, default=str))
    else:
        from autofit.cli.report import print_trial

        print_trial(out, result)
    if result.status.value == "error":
        raise typer.Exit(code=2)  # the spec or the user's code is wrong, as for validate
    if result.status.value in ("timeout", "crashed"):
        raise typer.Exit(code=1)


@app.command()
def tune(
    spec_path: SpecPath,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output dir (default: output.dir)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted tune")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output dir")] = False,
    storage: Annotated[str | None, typer.Option("--storage", help="optuna RDB URL instead of the journal file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results.json to stdout")] = False,
    workers: Annotated[int | None, typer.Option("--workers", help="N worker processes on one study (see autofit worker)")] = None,
    gpus: Annotated[str | None, typer.Option("--gpus", help="one worker per GPU: 0,1,2,3")] = None,
    no_cache: NoCacheOpt = False, cache_dir: CacheDirOpt = None,
) -> None:
    """Search the largest configuration that fits; write results.json, tuned.yaml and scripts."""
    from autofit.api import check_restart

    try:
        check_restart(resume, force)
    except AutofitError as exc:
        fail(exc)
    if workers is not None or gpus is not None:
        from autofit.cli.workers import tune_workers

        tune_workers(spec_path, workers=workers, gpus=gpus, storage=storage, out_dir=out_dir,
                     force=force, as_json=as_json)
        return
    from autofit.api import tune as api_tune
    from autofit.cli.report import TuneProgress, print_tune_summary

    log = err if as_json else out
    try:
        install_signal_handlers()
        with TuneProgress(log) as progress:
            result = api_tune(spec_path, out_dir=out_dir, resume=resume, force=force,
                              storage=storage, on_event=progress,
                              cache=cache_setting(no_cache, cache_dir))
    except TuneFailed as exc:
        partial = exc.partial
        if isinstance(exc, TuneInterrupted) and partial is not None and partial.best is not None \
                and partial.out_dir is not None:
            err.print(f"[yellow]interrupted[/yellow] while plotting: the results are already "
                      f"written ({partial.out_dir / 'results.json'}, tuned.yaml and "
                      f"{len(partial.files) - 2} export files in {partial.out_dir}); only "
                      f"the plot is missing")
            raise typer.Exit(code=130) from None
        if partial is not None and partial.out_dir is not None:
            err.print(f"{len(partial.trials)} finished trial(s) kept in "
                      f"{partial.out_dir / 'results.json'} and the study; continue with: "
                      f"autofit tune {spec_path} --out {partial.out_dir} --resume", markup=False)
        if isinstance(exc, TuneInterrupted):
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(code=130) from None
        fail(exc)
    except AutofitError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(code=130) from None
    if as_json:
        print((result.out_dir / "results.json").read_text(), end="")
        return
    print_tune_summary(out, result)
    out.print(escape(f"wrote {result.out_dir / 'results.json'}, {result.out_dir / 'tuned.yaml'} and "
                     f"{len(result.files) - 2} export files in {result.out_dir}")
              + (f"; {escape(result.plot_note)}" if result.plot_note else ""))


@app.command()
def export(
    results_path: Annotated[Path, typer.Argument(help="results.json written by autofit tune")],
    fmt: Annotated[list[str] | None, typer.Option("--format", "-f", help="slurm | lsf | torchrun | lightning | hf | deepspeed | targets (repeatable; default all) | slurm-tune | lsf-tune (arrays measuring each target GPU type; only when named)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: next to results.json")] = None,
    storage: Annotated[str | None, typer.Option("--storage", envvar="AUTOFIT_STORAGE", help="slurm-tune/lsf-tune: the shared study URL (written without its password)", show_default=False)] = None,
) -> None:
    """Regenerate submission scripts and framework configs from results.json, without re-tuning."""
    from autofit.api import export as api_export

    try:
        written = api_export(results_path, fmt or None, out_dir, storage=storage)
    except AutofitError as exc:
        fail(exc)
    for path in written:
        out.print(f"wrote {path}", markup=False)
    if any(path.suffix == ".sh" for path in written):
        from autofit.cli.report import print_dry_run_note
        from autofit.export import load_results

        print_dry_run_note(err, load_results(results_path))


app.command()(profile)
app.command()(worker)
app.command()(results)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except SystemExit as exc:
        _exit_now(exc)


def _exit_now(exc: SystemExit) -> None:
    """Leave without the interpreter's teardown once torch is loaded: freeing torch's modules
    takes 0.4-1.5 s (bench_speed) after the answer is printed. Every file autofit writes is
    closed by then (atomic writes, context managers) and it registers no atexit hook; the
    trial fork server ends when its pipe closes."""
    if "torch" not in sys.modules:
        raise exc
    import os

    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if exc.code is not None and not isinstance(exc.code, int):
        print(exc.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
