"""Tune with many workers on one study: ``tune_workers``, ``work`` and ``results``.

``tune_workers`` starts N ``autofit worker`` processes on this host (one per GPU of ``gpus``,
or N CPU workers) on one study, waits for them and writes results.json, tuned.yaml and the
exports from the study. ``work`` is one worker (``autofit worker``: join from any node).
``results`` assembles the files from a study without running anything. The engine is
``autofit.search.workers``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from autofit.api import SpecLike, _plain, _plot, as_spec, tune_out_dir
from autofit.errors import AutofitError, TuneFailed
from autofit.export import write_exports, write_results
from autofit.files import locked_output_dir
from autofit.predict.cache import CACHE_DIR_NAME, ENV_DIR, cache_for, using
from autofit.search.events import EventHandler
from autofit.search.results import TuneResult
from autofit.search.workers import (
    LEASE_S,
    measured_trials,
    open_storage,
    run_worker,
    study_name,
)
from autofit.spec import ExperimentSpec
from autofit.trials.result import TrialResult

__all__ = ["default_storage", "results", "tune_workers", "work", "worker_devices"]


def default_storage(out_dir: Path) -> str:
    """The study of a one-host run without ``--storage``: a journal file in the output dir."""
    return f"journal:{out_dir / 'study.journal'}"


def worker_devices(spec: ExperimentSpec, workers: int | None, gpus: Sequence[int] | None
                   ) -> list[str | None]:
    """One device per worker: ``cuda:G`` for each of ``gpus``, else N workers on the spec's
    device (``None``: each resolves it; CPU workers each enforce the spec's budget)."""
    if gpus:
        if workers is not None and workers != len(gpus):
            raise AutofitError(f"--workers {workers} and --gpus {','.join(map(str, gpus))} "
                               f"disagree: one worker per GPU")
        return [f"cuda:{g}" for g in gpus]
    n = 1 if workers is None else workers
    if n < 1:
        raise AutofitError(f"--workers: must be >= 1, got {n}")
    return [None] * n


def write_files(result: TuneResult, path: Path, error: str | None = None) -> TuneResult:
    """results.json (with ``error`` for a partial result), and on success tuned.yaml, exports
    and the plot, as ``autofit tune`` writes them."""
    data = _plain(result.to_dict())
    result.out_dir = path
    if error is not None:
        data["error"] = error
        result.files = write_results(path, data)
        return result
    result.files = write_results(path, data) + write_exports(data, path)
    result.plot_note = _plot(data, path / "peak_vs_batch.png")
    return result


def work(spec: SpecLike, storage: str, *, device: str | None = None,
         worker_id: str | None = None, out_dir: str | Path | None = None,
         on_event: EventHandler | None = None, runner: Callable[..., TrialResult] | None = None,
         lease_s: float = LEASE_S, poll_s: float = 1.0, target: str | None = None) -> TuneResult:
    """One worker on the spec's study in ``storage`` until the study is finished.

    ``target``: measure that target of the spec on this device, in the target's own study
    (``autofit results`` then shows it measured in targets.yaml, with this device's name).

    Writes the result files into ``out_dir`` when given. Raises ``TuneFailed`` with the
    study's trials in ``partial`` (files written as partial results when ``out_dir``).
    """
    spec = as_spec(spec)
    try:
        with using(cache_for(True, Path(out_dir) if out_dir is not None
                             else tune_out_dir(spec, None))):
            result = run_worker(spec, storage, device=device, worker_id=worker_id,
                                on_event=on_event, runner=runner, lease_s=lease_s,
                                poll_s=poll_s, target=target)
    except TuneFailed as exc:
        if out_dir is not None and exc.partial is not None and exc.partial.trials:
            write_files(exc.partial, Path(out_dir), error=str(exc))
        raise
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_files(result, Path(out_dir))
    return result


def results(spec: SpecLike, storage: str, *, out_dir: str | Path | None = None,
            device: str | None = None, on_event: EventHandler | None = None) -> TuneResult:
    """results.json, tuned.yaml and the exports from a study, running no trial.

    Raises ``TuneFailed`` while the study's work is pending (partial results.json written).
    """
    spec = as_spec(spec)
    directory = tune_out_dir(spec, out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        result = run_worker(spec, storage, device=device, on_event=on_event, assemble_only=True)
    except TuneFailed as exc:
        if exc.partial is not None and exc.partial.trials:
            write_files(exc.partial, directory, error=str(exc))
        raise
    return write_files(result, directory)


def _spec_file(spec: ExperimentSpec, directory: Path) -> str:
    """A path the worker processes load the same spec from (same content, same hash)."""
    if spec.source_path:
        return spec.source_path
    path = directory / ".workers-spec.yaml"
    path.write_text(json.dumps(spec.raw, indent=1, default=str))
    return str(path)


def tune_workers(spec: SpecLike, *, workers: int | None = None, gpus: Sequence[int] | None = None,
                 storage: str | None = None, out_dir: str | Path | None = None,
                 force: bool = False, lease_s: float = LEASE_S,
                 on_event: EventHandler | None = None,
                 on_line: Callable[[str], None] | None = None) -> TuneResult:
    """N workers on this host on one study (this process is the first, N - 1 are started as
    ``autofit worker`` processes), then the result files from the study.

    ``storage``: an RDB URL (other nodes may join with ``autofit worker``), default a journal
    file in the output dir. ``force``: delete the spec's study and the results first.
    ``on_event``: this process's events; ``on_line``: each line the other workers print,
    prefixed with the worker's name.
    """
    import optuna

    spec = as_spec(spec)
    devices = worker_devices(spec, workers, gpus)
    directory = tune_out_dir(spec, out_dir)
    say = on_line or (lambda line: None)
    with locked_output_dir(directory, resume=not force, force=force) as path:
        url = storage or default_storage(path)
        if force and storage is not None:
            backend = open_storage(url)
            if study_name(spec) in optuna.get_all_study_names(backend):
                optuna.delete_study(study_name=study_name(spec), storage=backend)
        source = _spec_file(spec, path)
        before = _measured_numbers(spec, url)  # a resumed study's: the rest are run now
        cpu_workers = sum(1 for d in devices if d is None or d == "cpu")
        defaults = {ENV_DIR: str(path / CACHE_DIR_NAME)}
        # one trace cache for every worker here: a setting traced by one is not re-traced
        # by the worker that replays the search
        if cpu_workers > 1:  # this worker's trials get their share of the cores too
            defaults["OMP_NUM_THREADS"] = _threads(cpu_workers)
        with _environ_defaults(defaults):
            return _run_workers(spec, path, source, url, devices, before, lease_s, say,
                                on_event)


@contextlib.contextmanager
def _environ_defaults(values: dict[str, str]) -> Iterator[None]:
    """``os.environ.setdefault`` for each of ``values`` while open; the caller's environment
    is as it was afterwards (an API call leaves no variables behind)."""
    added = [key for key in values if key not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _run_workers(spec: ExperimentSpec, path: Path, source: str, url: str,
                 devices: list[str | None], before: set[int], lease_s: float,
                 say: Callable[[str], None], on_event: EventHandler | None) -> TuneResult:
    """The workers of ``tune_workers`` on one host, this process being worker w0."""
    host = os.uname().nodename
    traces = cache_for(True, path)
    traced = _trace_files(traces.directory) if traces is not None else 0
    procs = _start(source, url, devices, lease_s, host)
    relay = threading.Thread(target=_relay, args=(procs, say), daemon=True)
    relay.start()
    try:
        with using(traces):
            result = run_worker(spec, url, device=devices[0], on_event=on_event,
                                worker_id=f"{host}/w0" + (f"@{devices[0]}" if devices[0] else ""),
                                lease_s=lease_s)
    except TuneFailed as exc:
        _stop(procs)
        relay.join(timeout=5)
        if exc.partial is not None and exc.partial.trials:
            _count_run_now(exc.partial, before)
            write_files(exc.partial, path, error=str(exc))
        raise
    except BaseException:
        _stop(procs)
        raise
    for name, proc in procs:
        code = proc.wait()
        if code != 0:
            say(f"[{name}] exited with code {code}")
    relay.join(timeout=5)
    _count_run_now(result, before)
    if traces is not None:
        result.notes.append(
            f"{traces.summary()} in worker w0 (which replayed the search); "
            f"{_trace_files(traces.directory) - traced} new trace file(s) there from all "
            f"{len(devices)} worker(s)")
    return write_files(result, path)


def _measured_numbers(spec: ExperimentSpec, url: str) -> set[int]:
    """The numbers of the trials the spec's study holds before this command's workers start."""
    import optuna

    backend = open_storage(url)
    if study_name(spec) not in optuna.get_all_study_names(backend):
        return set()
    study = optuna.load_study(study_name=study_name(spec), storage=backend)
    return {t.number for t in measured_trials(study)}


def _count_run_now(result: TuneResult, before: set[int]) -> None:
    """Trials this command's workers measured are run now, whichever worker ran them (the
    finishing worker marks only its own so); those the study held before are resumed."""
    result.trials = [replace(t, resumed=t.number in before) for t in result.trials]
    if result.best is not None:
        result.best = replace(result.best, resumed=result.best.number in before)


def _trace_files(directory: Path) -> int:
    """Traces stored in a trace cache dir (answer records excluded)."""
    if not directory.is_dir():
        return 0
    return sum(1 for p in directory.glob("*.json") if not p.name.startswith("estimate-"))


def _stop(procs: list[tuple[str, subprocess.Popen]]) -> None:
    """Ctrl-C the other workers (each gives its claim back), then wait for them."""
    for _, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for _, proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _start(source: str, url: str, devices: list[str | None], lease_s: float,
           host: str) -> list[tuple[str, subprocess.Popen]]:
    """Workers 1..N-1 as ``autofit worker`` processes (worker 0 is this process)."""
    cpu_workers = sum(1 for d in devices if d is None or d == "cpu")
    procs = []
    for i, device in enumerate(devices[1:], start=1):
        name = f"w{i}" + (f"@{device}" if device else "")
        cmd = [sys.executable, "-m", "autofit.cli", "worker", source, "--storage", url,
               "--id", f"{host}/{name}", "--lease", str(lease_s)]
        if device:
            cmd += ["--device", device]
        env = dict(os.environ)
        if cpu_workers > 1 and "OMP_NUM_THREADS" not in env:
            # CPU workers share the cores: each trial gets its share, not all of them
            env["OMP_NUM_THREADS"] = _threads(cpu_workers)
        procs.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True, env=env,
                                             bufsize=1, start_new_session=True)))
    return procs


def _threads(cpu_workers: int) -> str:
    from autofit.device import usable_cpus

    return str(max(1, usable_cpus() // cpu_workers))


def _relay(procs: list[tuple[str, subprocess.Popen]], say: Callable[[str], None]) -> None:
    """Pass the other workers' lines on, prefixed with their names, until they exit."""
    import selectors

    sel = selectors.DefaultSelector()
    for name, proc in procs:
        assert proc.stdout is not None
        sel.register(proc.stdout, selectors.EVENT_READ, name)
    streams = len(procs)
    while streams:
        for key, _ in sel.select(timeout=1.0):
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                sel.unregister(key.fileobj)
                streams -= 1
                continue
            say(f"[{key.data}] {line.rstrip()}")
