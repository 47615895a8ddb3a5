"""``autofit worker``, ``autofit results`` and ``autofit tune --workers N / --gpus``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from autofit.cli.common import SpecPath, err, fail, install_signal_handlers, out
from autofit.errors import AutofitError, TuneFailed, TuneInterrupted

StorageOpt = Annotated[str, typer.Option(
    "--storage", envvar="AUTOFIT_STORAGE",
    help="the shared study: postgresql+psycopg://USER[:PW]@HOST:PORT/DB (any optuna RDB URL; "
         "the password may come from PGPASSWORD or ~/.pgpass), or journal:PATH on one host",
    show_default=False)]
LeaseOpt = Annotated[float, typer.Option(
    "--lease", help="seconds without a renewal after which a claim is stale and re-queued")]


def _report(result: object, as_json: bool) -> None:
    from autofit.cli.report import print_tune_summary

    if as_json:
        print((result.out_dir / "results.json").read_text(), end="")  # type: ignore[attr-defined]
        return
    print_tune_summary(out, result)  # type: ignore[arg-type]
    if result.out_dir is not None:  # type: ignore[attr-defined]
        out.print(f"wrote {len(result.files)} files in {escape(str(result.out_dir))}"  # type: ignore[attr-defined]
                  + (f"; {escape(result.plot_note)}" if result.plot_note else ""))  # type: ignore[attr-defined]


def _failed(exc: TuneFailed, spec_path: Path, hint: str) -> None:
    partial = exc.partial
    if partial is not None and partial.out_dir is not None:
        err.print(f"{len(partial.trials)} finished trial(s) kept in "
                  f"{partial.out_dir / 'results.json'} and the study; {hint}", markup=False)
    if isinstance(exc, TuneInterrupted):
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(code=130) from None
    fail(exc)


def worker(
    spec_path: SpecPath,
    storage: StorageOpt,
    device: Annotated[str | None, typer.Option("--device", help="cpu | cuda | cuda:N (default: the spec's)")] = None,
    worker_id: Annotated[str | None, typer.Option("--id", help="this worker's name in leases and logs")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="also write results.json, tuned.yaml ... here")] = None,
    lease: LeaseOpt = 60.0,
    target: Annotated[str | None, typer.Option("--target", help="measure this target of the spec (its name) on this device, in its own study")] = None,
) -> None:
    """Join the spec's study in a shared storage and measure settings until it is finished."""
    from autofit.cli.report import TuneProgress
    from autofit.cluster import work

    try:
        install_signal_handlers()
        with TuneProgress(out) as progress:
            result = work(spec_path, storage, device=device, worker_id=worker_id,
                          out_dir=out_dir, on_event=progress, lease_s=lease, target=target)
    except TuneFailed as exc:
        _failed(exc, spec_path, "start a worker again to continue the study")
    except AutofitError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(code=130) from None
    best = result.best.result.candidate.label() if result.best else "none"
    out.print(f"study finished: best {best}, {len(result.trials)} measured trial(s)")


def results(
    spec_path: SpecPath,
    storage: StorageOpt,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output dir (default: output.dir)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results.json to stdout")] = False,
) -> None:
    """Write results.json, tuned.yaml and the exports from a study, running no trial."""
    from autofit.cluster import results as api_results

    try:
        result = api_results(spec_path, storage, out_dir=out_dir)
    except TuneFailed as exc:
        _failed(exc, spec_path, f"finish it with: autofit worker {spec_path} --storage URL")
    except AutofitError as exc:
        fail(exc)
    _report(result, as_json)


def tune_workers(spec_path: Path, *, workers: int | None, gpus: str | None, storage: str | None,
                 out_dir: Path | None, force: bool, as_json: bool) -> None:
    """``autofit tune --workers N`` / ``--gpus 0,1``: N local workers, then the results."""
    from autofit.cli.report import TuneProgress
    from autofit.cluster import tune_workers as api_tune_workers

    log = err if as_json else out
    try:
        gpu_list = [int(g) for g in gpus.split(",") if g.strip()] if gpus else None
    except ValueError:
        fail(AutofitError(f"--gpus: expected GPU indices like 0,1,2,3, got {gpus!r}"))
    try:
        install_signal_handlers()
        with TuneProgress(log) as progress:
            result = api_tune_workers(spec_path, workers=workers, gpus=gpu_list,
                                      storage=storage, out_dir=out_dir, force=force,
                                      on_event=progress,
                                      on_line=lambda line: log.print(escape(line)))
    except TuneFailed as exc:
        _failed(exc, spec_path, f"continue with: autofit tune {spec_path} --workers N "
                                f"{'--storage URL ' if storage else ''}(the same --out)")
    except AutofitError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(code=130) from None
    _report(result, as_json)
