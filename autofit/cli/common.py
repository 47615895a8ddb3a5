"""What every command shares: the consoles, one-line errors, Ctrl-C handling, the spec argument."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from autofit.errors import AutofitError

# Wide enough for the trial table when output is piped (rich falls back to 80 columns).
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)

SpecPath = Annotated[Path, typer.Argument(help="YAML experiment spec", show_default=False)]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", "-b", help="default: search.batch_size.min")]
InputSizeOpt = Annotated[int | None, typer.Option("--input-size", help="image side / sequence length")]
PrecisionOpt = Annotated[str | None, typer.Option("--precision", help="fp32 | fp16 | bf16")]
SegmentsOpt = Annotated[int | None, typer.Option("--segments", help="checkpoint segments")]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON object on stdout")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="trace everything afresh, store nothing")]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="trace cache dir (default: $AUTOFIT_CACHE_DIR, else <output dir>/.trace_cache)")]


def cache_setting(no_cache: bool, cache_dir: Path | None) -> bool | Path:
    """The API's ``cache=`` argument from the two flags."""
    return False if no_cache else (cache_dir if cache_dir is not None else True)


def cache_line(cache: dict[str, Any] | None) -> str | None:
    if not cache:
        return None
    return f"trace cache: {cache['hits']} hit(s), {cache['new']} new trace(s) ({cache['dir']})"


def fail(exc: AutofitError, note: str | None = None) -> NoReturn:
    """Print each problem on its own line to stderr (then ``note``) and exit with the
    error's code."""
    for line in exc.problems:
        err.print(f"[red]error:[/red] {escape(line)}", markup=True)
    if note:
        err.print(f"note: {note}", markup=False)
    raise typer.Exit(code=exc.exit_code)


_INTERRUPTS = {"count": 0}


def install_signal_handlers() -> None:
    """First Ctrl-C/SIGTERM: kill the running trial, keep what finished. Second: exit now."""
    from autofit.trials.runner import kill_active_trials

    def handler(signum: int, frame: Any) -> None:
        _INTERRUPTS["count"] += 1
        kill_active_trials()
        if _INTERRUPTS["count"] > 1:
            os._exit(130)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
