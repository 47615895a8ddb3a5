"""Benchmark: how fast autofit answers, before and after, side by side in one run.

Usage::

    python scripts/bench_speed.py             # start-up, estimate per shipped CPU config, quickstart tune
    python scripts/bench_speed.py --no-tune   # start-up and estimates only
    python scripts/bench_speed.py --no-anchors --no-three-axis   # skip the long parts (~10 min)
    python scripts/bench_speed.py --no-estimate --no-cli-tune   # the anchors and 3-axis tables only

Every figure is the wall time of a fresh process, as a user sees it:

* start-up: ``autofit --help`` now, against the same command with torch imported first
  (what the package did before its API was imported lazily);
* ``autofit estimate CONFIG`` (one estimate plus the max-batch search) for each shipped CPU
  config: *before* = no trace cache and the regula-falsi max-batch search alone (the
  per-stretch lines switched off in the process); *cold* = today's command with an empty cache
  (median of ``--repeat`` runs), beside the same with every trace in its own process (no trace
  forked ahead: ``trace.traced_ahead`` switched off), and beside the same with
  ``torch._dynamo`` imported whole (``AUTOFIT_DEFER_DYNAMO=0``: what a trace paid before
  ``predict.lazy_dynamo``), the three rotating;
  *warm* = the same command again (every trace from the cache);
* ``autofit tune configs/quickstart_cpu.yaml`` the same three ways (fresh output dir each).

* where a cold estimate's time goes, in one fresh process per config: Python and autofit's
  imports (the command's too: typer, rich), ``import torch``, what a trace imports of
  ``torch._dynamo`` with its compiler deferred (FakeTensorMode's constructor reads its config,
  a constant tensor made under it imports ``source``), each trace run in the process, the trace
  forked ahead (its batch, its own time, how long the process waited for it), and the rest
  (interpreter start, the spec, the answer-record lookup, the plan, the search's arithmetic;
  no teardown: the process leaves with ``os._exit`` as the command does);
* ``tune`` against the anchors on every ``scripts/bench_anchors.py`` case, with its runners
  (``run_autofit`` in this process, the anchors each in a fresh worker process, as there):
  autofit with no trace cache (cold) and with a warm one, Lightning binsearch and power,
  accelerate; and autofit cold once more with the CPU budget's verification run as its own
  trial (``searches.reusable_verification`` switched off in the process: what tune did before
  it reused the search trial at the winner), and cold once more with the probe calibration's
  trace taken after its trial (``tuner.out_of_process`` switched off in the process: what tune
  did before that trace ran beside the trial), and cold once more with its prediction confirmed
  by a third trace (``tuner.trials_confirm`` switched off in the process: what tune did before
  two traces paired event by event sufficed). Then, per case, where a cold run's real trials
  spent their time: fork and result return (trial wall less the child's own time), model build,
  warm-up steps, timed steps, the rest of the child (spec, tracker, measurement), an OOM
  trial's steps up to its OOM, and the probe calibration that follows the first fitting trial in
  the parent (the wait for the trace of that batch, compared op by op with the trial). Every wall
  time excludes Python start-up and imports (the anchors' workers time the search only;
  autofit's fork server is started and ready, its torch import done, and ``torch._dynamo``
  imported before the clock; one discarded autofit run absorbs the process's one-time costs,
  torch's fake-tensor dispatch cache is emptied before every autofit run, as in a fresh
  process, and the own-verification run alternates before/after the cold one by case). Answer quality: autofit's batch ran and fits and the next batch ran and does not
  (the boundary, i.e. the true max for a memory that grows with batch);
* the 3-axis search of ``scripts/bench_tune.py`` (gpt_tiny, 3 sizes x 3 precisions x 3 segment
  counts): *before* = per-stretch lines off, no cache and the verification run as its own trial
  (as the estimate's before), *cold* = today with an empty cache, *warm* = again with that cache.

The runs alternate per config so that load on a shared machine hits both sides alike;
ratios are after / before. The load average is printed with every table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CPU_CONFIGS = ["quickstart_cpu", "resnet_resolution", "gpt_seqlen"]
BEFORE = ("import sys; import autofit.predict.batch_curve as bc; "
          "bc._pin_by_segments = lambda *a, **k: None; "
          "from autofit.cli import main; sys.argv = ['autofit', *sys.argv[1:]]; main()")
WITH_TORCH = ("import sys, torch; from autofit.cli import main; "
              "sys.argv = ['autofit', *sys.argv[1:]]; main()")
SERIAL = ("import contextlib, sys; import autofit.predict.trace as tr; "
          "tr.traced_ahead = lambda *a, **k: contextlib.nullcontext(False); "
          "from autofit.cli import main; sys.argv = ['autofit', *sys.argv[1:]]; main()")
"""Today's command with every trace in this process (no forked trace ahead)."""


def wall(cmd: list[str], **env: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return seconds, out.stdout


def autofit(*args: str) -> list[str]:
    return [sys.executable, "-m", "autofit.cli", *args]


def patched(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def traces_of(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("batch curve:") and "traces)" in line:
            return line.rsplit(",", 1)[-1].strip(" )").split()[0]
    return "?"


COLD_PHASES = """
import json, os, sys, tempfile, time
t0 = time.perf_counter()
import autofit.api, autofit.cli.app
t1 = time.perf_counter()
import torch
t2 = time.perf_counter()
import autofit.predict.trace as tr  # registers torch._dynamo without its compiler
import torch._dynamo.config, torch._dynamo.source  # what a trace imports of it
t3 = time.perf_counter()
from autofit.predict import lazy_dynamo
take, ahead = tr._Ahead.take, []
def timed(self, *a):
    start = time.perf_counter()
    est = take(self, *a)
    if est is not None:
        ahead.append([est.candidate.batch_size, time.perf_counter() - start, est.trace_time_s])
    return est
tr._Ahead.take = timed
r = autofit.api.estimate(sys.argv[1], cache=tempfile.mkdtemp())
t4 = time.perf_counter()
forked = {b for b, _, _ in ahead}
traces = [e.trace_time_s for b, e in sorted(r.max_batch.estimates.items())
          if not e.derived and b not in forked]
print(json.dumps({"autofit": t1 - t0, "torch": t2 - t1, "dynamo": t3 - t2,
                  "estimate": t4 - t3, "traces": traces, "ahead": ahead,
                  "compiler": "torch._dynamo.eval_frame" in sys.modules,
                  "deferred": lazy_dynamo.deferred()}), flush=True)
os._exit(0)  # as the command: no interpreter teardown
"""


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def cold_phases(config: str) -> dict[str, float]:
    start = time.perf_counter()
    _, out = wall([sys.executable, "-c", COLD_PHASES, config])
    phases = json.loads(out.strip().splitlines()[-1])
    phases["total"] = time.perf_counter() - start
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--no-estimate", action="store_true",
                        help="skip the start-up and estimate tables")
    parser.add_argument("--no-cli-tune", action="store_true",
                        help="skip the CLI tune of quickstart_cpu")
    parser.add_argument("--no-anchors", action="store_true",
                        help="skip tune vs Lightning/accelerate on the bench_anchors cases")
    parser.add_argument("--no-three-axis", action="store_true", help="skip the 3-axis search")
    parser.add_argument("--cases", nargs="+", help="bench_anchors cases (default: all)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="start-up runs, and cold estimates of each kind (median)")
    args = parser.parse_args()
    print(f"# bench_speed: {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; load {load()}")
    if not args.no_estimate:
        startup_and_estimates(args.repeat)
    if args.no_tune:
        return
    if not args.no_cli_tune:
        cli_tune()
    if not args.no_anchors:
        tune_vs_anchors(args.cases)
    if not args.no_three_axis:
        three_axis_before_after()


def startup_and_estimates(repeat: int) -> None:
    now = sorted(wall(autofit("--help"))[0] for _ in range(repeat))
    old = sorted(wall(patched(WITH_TORCH, "--help"))[0] for _ in range(repeat))
    mid = repeat // 2
    print("\n| start-up | with torch (before) s | now s | ratio |\n|---|---|---|---|")
    print(f"| autofit --help | {old[mid]:.2f} | {now[mid]:.2f} | {now[mid] / old[mid]:.2f} |")

    print("\n| autofit estimate | before s (traces) | cold, every trace here s "
          "| cold, torch._dynamo imported whole s | cold s (traces) | warm s | cold/before "
          "| cold/every trace here | cold/dynamo whole | warm/before |"
          "\n|---|---|---|---|---|---|---|---|---|---|")
    for name in CPU_CONFIGS:
        config = f"configs/{name}.yaml"
        with tempfile.TemporaryDirectory() as cache:
            before, out_b = wall(patched(BEFORE, "estimate", config, "--no-cache"))
            serial, whole, colds, out_c = [], [], [], ""
            for i in range(repeat):  # rotating, so that load hits every kind alike
                for kind in (0, 1, 2)[i % 3:] + (0, 1, 2)[:i % 3]:
                    fresh = str(Path(cache) / f"{kind}-{i}")
                    if kind == 0:
                        serial.append(wall(patched(SERIAL, "estimate", config,
                                                   "--cache-dir", fresh))[0])
                    elif kind == 1:
                        whole.append(wall(autofit("estimate", config, "--cache-dir", fresh),
                                          AUTOFIT_DEFER_DYNAMO="0")[0])
                    else:
                        seconds, out_c = wall(autofit("estimate", config, "--cache-dir", fresh))
                        colds.append(seconds)
            warm, out_w = wall(autofit("estimate", config, "--cache-dir", fresh))
        mid = len(colds) // 2
        cold, alone, full = sorted(colds)[mid], sorted(serial)[mid], sorted(whole)[mid]
        # a warm run misses only when autofit's sources changed in between (part of the key)
        hit = "" if "0 new trace(s)" in out_w else " (cache missed: sources changed)"
        print(f"| {name} | {before:.2f} ({traces_of(out_b)}) | {alone:.2f} | {full:.2f} "
              f"| {cold:.2f} ({traces_of(out_c)}) | {warm:.2f}{hit} | {cold / before:.2f} "
              f"| {cold / alone:.2f} | {cold / full:.2f} | {warm / before:.2f} |", flush=True)
    print(f"\ncold: median of {repeat} runs each, rotating with the run that traces "
          "everything in its own process and the run that imports torch._dynamo whole "
          f"(AUTOFIT_DEFER_DYNAMO=0); load {load()}")
    print("\n| cold estimate, where the time goes (s) | total | python + autofit | import torch "
          "| torch._dynamo: config + source (compiler deferred) | traces here (each) "
          "| forked trace: batch, its time, waited | rest | compiler imported |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for name in CPU_CONFIGS:
        p = cold_phases(f"configs/{name}.yaml")
        traced = sum(p["traces"])
        waited = sum(w for _, w, _ in p["ahead"])
        rest = p["total"] - p["autofit"] - p["torch"] - p["dynamo"] - traced - waited
        each = " + ".join(f"{t:.2f}" for t in p["traces"])
        forked = ", ".join(f"{b}, {t:.2f}, {w:.2f}" for b, w, t in p["ahead"]) or "none taken"
        print(f"| {name} | {p['total']:.2f} | {p['autofit']:.2f} | {p['torch']:.2f} "
              f"| {p['dynamo']:.2f} | {traced:.2f} ({each}) | {forked} | {rest:.2f} "
              f"| {'yes' if p['compiler'] else 'no'} |")
    print(f"\nload {load()}")


def cli_tune() -> None:
    print("\n| autofit tune | before s | cold s | warm s | cold/before | warm/before |"
          "\n|---|---|---|---|---|---|")
    config = "configs/quickstart_cpu.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        before, _ = wall(patched(BEFORE, "tune", config, "--out", f"{tmp}/b", "--no-cache"))
        cold, _ = wall(autofit("tune", config, "--out", f"{tmp}/c", "--cache-dir", cache))
        warm, out_w = wall(autofit("tune", config, "--out", f"{tmp}/w", "--cache-dir", cache))
    print(f"| quickstart_cpu | {before:.1f} | {cold:.1f} | {warm:.1f} | {cold / before:.2f} "
          f"| {warm / before:.2f} |")
    hits = [line for line in out_w.splitlines() if "trace cache:" in line]
    print(f"\nwarm tune: {hits[-1].strip() if hits else 'no cache line'}; load {load()}")


@contextlib.contextmanager
def switched(module: str, name: str, value: Any) -> Iterator[None]:
    """``module.name`` set to ``value`` inside the block, restored after it."""
    import importlib

    mod = importlib.import_module(module)
    saved = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, saved)


def own_verification() -> contextlib.AbstractContextManager[None]:
    """A context: the CPU budget's verification runs as its own trial (no reuse)."""
    return switched("autofit.search.searches", "reusable_verification", lambda *a, **k: "")


def serial_calibration() -> contextlib.AbstractContextManager[None]:
    """A context: the probe calibration traces after its trial, not beside it."""
    return switched("autofit.search.tuner", "out_of_process", lambda runner: False)


def confirming_trace() -> contextlib.AbstractContextManager[None]:
    """A context: a single-setting tune confirms its prediction with a third trace, as
    ``estimate`` does (what tune did before two traces paired event by event sufficed)."""
    return switched("autofit.search.tuner", "trials_confirm", lambda *a, **k: False)


def timed_trials(into: list[dict]):  # type: ignore[no-untyped-def]
    """A context: every real trial's time split is appended to ``into`` (``trial_split``)."""
    import contextlib

    import autofit.search.tuner as tuner
    import autofit.trials as trials

    @contextlib.contextmanager
    def on():  # type: ignore[no-untyped-def]
        run, calibrate_on = trials.run_trial, tuner.calibrate_on

        def timed(*a, **k):  # type: ignore[no-untyped-def]
            result = run(*a, **k)
            into.append(trial_split(result, a[0] if a else k["spec"], k.get("steps")))
            return result

        def calibrating(*a, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return calibrate_on(*a, **k)
            finally:  # after the trial it follows: the probe calibration's trace
                if into:
                    into[-1]["calibrate"] += time.perf_counter() - t0

        trials.run_trial, tuner.calibrate_on = timed, calibrating
        try:
            yield
        finally:
            trials.run_trial, tuner.calibrate_on = run, calibrate_on

    return on()


def trial_split(result, spec, steps) -> dict:  # type: ignore[no-untyped-def]
    """One trial's wall time: fork + return, build, warm-up, timed steps, rest of the child."""
    wall_s, child = result.wall_time_s, result.extra.get("child_s", 0.0)
    build = result.extra.get("build_s", 0.0)
    stepping = wall_s - result.overhead_s if result.fits else 0.0
    timed = (spec.search.steps_per_trial if steps is None else steps) if result.fits else 0
    timed_s = (result.step_time_s or 0.0) * timed  # the median step x timed steps
    fits = result.fits
    return {"wall": wall_s, "fork": wall_s - child if child else 0.0, "build": build,
            "warmup": max(0.0, stepping - timed_s), "timed": timed_s,
            "rest": max(0.0, child - build - stepping) if child and fits else 0.0,
            "oom": max(0.0, child - build) if child and not fits else 0.0,
            "calibrate": 0.0, "fits": fits, "steps_run": result.steps_run}


def _prepare_in_process() -> None:
    """What the anchors' workers do before their clock starts: imports (and autofit's fork
    server, as bench_anchors starts it)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch._dynamo  # noqa: F401  FakeTensorMode imports it on first use

    from autofit.trials import runner as trial_mod

    trial_mod.prestart()
    server = trial_mod.running_server()
    if server is not None:
        server._ensure_ready()  # its torch import done before any clock, as the anchors' imports


def fresh(run):  # type: ignore[no-untyped-def]
    """``run`` with torch's fake-tensor dispatch cache emptied first, as in a fresh process
    (a run of the same model after another would otherwise trace faster)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def call(*a, **k):  # type: ignore[no-untyped-def]
        FakeTensorMode.cache_clear()
        return run(*a, **k)

    return call


def _boundary(r: dict) -> str:
    """'yes' when the returned batch ran and fit and the next batch ran and did not."""
    got = r.get("returned")
    if got is None:
        return "no answer"
    ran = {t["batch"]: t["status"] for t in r["trials"]}
    fits, above = ran.get(got) == "ok", ran.get(got + 1)
    return "yes" if fits and above not in (None, "ok") else \
        f"{'ran' if fits else 'NOT RUN'}, {got + 1}: {above or 'not run'}"


def tune_vs_anchors(cases: list[str] | None) -> None:
    _prepare_in_process()
    import bench_anchors as A

    run_autofit = fresh(A.run_autofit)

    from autofit.predict.cache import TraceCache
    from autofit.predict.cache import using as using_cache

    names = cases or [*A.case_names(), A.LIGHTNING_CASE]
    print(f"\n## tune vs the anchors (bench_anchors cases), load {load()}\n")
    print("| case | autofit cold s | autofit warm s | autofit cold, own verification trial s "
          "| Lightning binsearch s | Lightning power s "
          "| accelerate s | cold / binsearch | warm / binsearch | own verification / binsearch "
          "| autofit cold, calibration traced after the trial s | that / binsearch "
          "| autofit cold, confirming trace s | that / binsearch | cold / confirming trace "
          "| batch: autofit / binsearch / power / accelerate | autofit pinned (b fits, b+1 OOM) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    splits: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, using_cache(TraceCache(Path(tmp))):
        run_autofit(A.case_spec(names[0]))  # discarded: the process's one-time costs

    def own(spec):  # type: ignore[no-untyped-def]
        with tempfile.TemporaryDirectory() as tmp, using_cache(TraceCache(Path(tmp))), \
                own_verification():
            return run_autofit(spec)  # as cold, the verification its own trial

    def serial(spec):  # type: ignore[no-untyped-def]
        with tempfile.TemporaryDirectory() as tmp, using_cache(TraceCache(Path(tmp))), \
                serial_calibration():
            return run_autofit(spec)  # as cold, the calibration's trace after the trial

    def third(spec):  # type: ignore[no-untyped-def]
        with tempfile.TemporaryDirectory() as tmp, using_cache(TraceCache(Path(tmp))), \
                confirming_trace():
            return run_autofit(spec)  # as cold, its prediction confirmed by a third trace

    for i, name in enumerate(names):
        spec = A.case_spec(name)
        split: list[dict] = []
        own_first = i % 2 == 1  # alternate, so that order effects hit both alike
        verify_own = own(spec) if own_first else None
        after_trial = serial(spec) if not own_first else None
        confirmed = third(spec) if own_first else None
        with tempfile.TemporaryDirectory() as tmp, using_cache(TraceCache(Path(tmp))):
            with timed_trials(split):
                cold = run_autofit(spec)  # an empty cache: every trace runs
            warm = run_autofit(spec)
        if verify_own is None:
            verify_own = own(spec)
        if after_trial is None:
            after_trial = serial(spec)
        if confirmed is None:
            confirmed = third(spec)
        splits[name] = split
        anchors = {kind: A.run_anchor(kind, name) for kind in
                   ("lightning-binsearch", "lightning-power", "accelerate")
                   if name != A.LIGHTNING_CASE or kind != "accelerate"}
        binsearch = anchors["lightning-binsearch"]["wall_s"] or float("nan")

        def cell(r: dict | None) -> str:
            if r is None:
                return "-"
            return f"{r['wall_s']:.1f}" + (f" ({r['error'][:60]})" if r.get("error") else "")

        batches = " / ".join(str(r.get("returned")) if r else "-" for r in
                             (cold, anchors["lightning-binsearch"], anchors["lightning-power"],
                              anchors.get("accelerate")))
        print(f"| {name} | {cell(cold)} | {cell(warm)} | {cell(verify_own)} "
              f"| {cell(anchors['lightning-binsearch'])} "
              f"| {cell(anchors['lightning-power'])} | {cell(anchors.get('accelerate'))} "
              f"| {cold['wall_s'] / binsearch:.2f} | {warm['wall_s'] / binsearch:.2f} "
              f"| {verify_own['wall_s'] / binsearch:.2f} "
              f"| {cell(after_trial)} | {after_trial['wall_s'] / binsearch:.2f} "
              f"| {cell(confirmed)} | {confirmed['wall_s'] / binsearch:.2f} "
              f"| {cold['wall_s'] / confirmed['wall_s']:.2f} "
              f"| {batches} | {_boundary(cold)} |", flush=True)
        print(f"<!-- {name}: autofit predict {cold.get('predict_s', 0):.1f} s of "
              f"{cold['wall_s']:.1f} s cold ({len(cold['trials'])} trials), "
              f"{warm.get('predict_s', 0):.1f} s of {warm['wall_s']:.1f} s warm; own "
              f"verification: {len(verify_own['trials'])} trials, returned "
              f"{verify_own.get('returned')}, run {'before' if own_first else 'after'} cold; "
              f"calibration traced after the trial: returned {after_trial.get('returned')}, "
              f"run {'after' if own_first else 'before'} cold; confirming trace: returned "
              f"{confirmed.get('returned')}, predict {confirmed.get('predict_s', 0):.1f} s, "
              f"{len(confirmed['trials'])} trials, run {'before' if own_first else 'after'} "
              "cold; "
              f"load {load()} -->", flush=True)
    print("\n| cold autofit, where its real trials' time goes (s, summed over trials) | trials "
          "| trial wall | fork + return | model build | warm-up steps | timed steps | rest of "
          "the child | steps of the OOM trials (to the OOM) | probe calibration after the "
          "trials (in the parent) |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, split in splits.items():
        total = {k: sum(t[k] for t in split) for k in
                 ("wall", "fork", "build", "warmup", "timed", "rest", "oom", "calibrate")}
        print(f"| {name} | {len(split)} | {total['wall']:.2f} | {total['fork']:.2f} "
              f"| {total['build']:.2f} | {total['warmup']:.2f} | {total['timed']:.2f} "
              f"| {total['rest']:.2f} | {total['oom']:.2f} | {total['calibrate']:.2f} |")
    print(f"\nload {load()}")


BEFORE_3AXIS = "before (lines off, no cache, own verification trial)"


def three_axis_before_after() -> None:
    _prepare_in_process()
    import bench_tune as T

    three_axis = fresh(T.three_axis)

    from autofit.predict.cache import TraceCache
    from autofit.predict.cache import using as using_cache

    def quiet(_: str) -> None:
        pass

    print(f"\n## 3-axis search (bench_tune: 27 settings), load {load()}\n")
    print("| run | wall s | predictions s | trials | best |\n|---|---|---|---|---|")
    rows = {}
    with switched("autofit.predict.batch_curve", "_pin_by_segments", lambda *a, **k: None), \
            own_verification():
        rows[BEFORE_3AXIS] = three_axis(quiet)
    with tempfile.TemporaryDirectory() as tmp, using_cache(TraceCache(Path(tmp))):
        rows["cold (empty cache)"] = three_axis(quiet)
        rows["warm (same cache)"] = three_axis(quiet)
    for label, row in rows.items():  # [name, budget, combos, pin, trials, steps, measured, best, predict s, wall s]
        print(f"| {label} | {row[9]} | {row[8]} | {row[4]} | {row[7]} |")
    before = float(rows[BEFORE_3AXIS][9])
    print(f"\ncold / before {float(rows['cold (empty cache)'][9]) / before:.2f}, warm / before "
          f"{float(rows['warm (same cache)'][9]) / before:.2f}; load {load()}")


if __name__ == "__main__":
    main()
