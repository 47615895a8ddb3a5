"""Benchmark: what a real trial costs beyond its training steps, and where the time goes.

Usage::

    python scripts/bench_trials.py            # 3 trials per zoo case + the spawn comparison
    python scripts/bench_trials.py --quick    # 1 trial per case, 1 spawn trial
    python scripts/bench_trials.py --markdown out/bench_trials.md

Issue target (printed, never asserted): trial overhead beyond the steps < 3 s for zoo configs.

Every trial is ``autofit.trials.run_trial`` at a small batch (fp32) under a generous CPU budget
(so it always fits), with the spec's default 2 warm-up + 3 timed steps. Columns:

* ``wall``: ``TrialResult.wall_time_s``, the whole trial as the tuner sees it;
* ``steps``: time in training steps, warm-up included (``wall - overhead_s``);
* ``overhead``: ``TrialResult.overhead_s`` (wall time not spent in steps), split into
  ``build`` (``extra['build_s']``: model, optimizer and loss construction in the child),
  ``child other`` (``extra['child_s'] - build_s - steps``: spec parsing, imports not
  preloaded, device info, result assembly) and ``start+IPC`` (``wall - extra['child_s']``:
  request file, fork or process start, result file, and the parent's bookkeeping).

The first trial of the run also starts autofit's fork server (a process that imports torch
once and forks one child per trial); it is reported on its own row. The last table runs the
same case with ``AUTOFIT_START_METHOD=spawn`` (a fresh interpreter per trial, read by
``autofit.trials.runner._launch`` at call time): there ``start+IPC`` includes the interpreter start
and ``import autofit`` (which imports torch), and ``build`` the imports the fork server
preloads (``torch._dynamo``, which optimizers import on construction).
Rows of the per-case table are medians over that case's trials.

Timings depend on what else runs on the machine: the machine line prints the load average
when the run started.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _zoo_cases import (  # noqa: E402
    Report,
    case_names,
    machine_line,
    markdown_table,
    spec_of,
)

LIMIT_BYTES = 4 * 2**30
"""Generous CPU budget: every case fits it by a wide margin at the benchmark batch."""
TARGET_OVERHEAD_S = 3.0


def parts(result: Any) -> dict[str, float]:
    """wall / steps / overhead / build / child other / start+IPC of one trial, in seconds."""
    wall = result.wall_time_s
    steps = wall - result.overhead_s
    build = float(result.extra.get("build_s", float("nan")))
    child = float(result.extra.get("child_s", float("nan")))
    return {"wall": wall, "steps": steps, "overhead": result.overhead_s, "build": build,
            "child_other": child - build - steps, "start_ipc": wall - child}


COLUMNS = ["wall", "steps", "overhead", "build", "child_other", "start_ipc"]
HEADER = ["wall s", "steps s", "overhead s", "build s", "child other s", "start+IPC s"]


def run_many(spec: Any, batch: int, n: int, say: Any) -> list[dict[str, float]]:
    from autofit.candidate import Candidate
    from autofit.trials import run_trial

    cand = Candidate(batch_size=batch, input_size=spec.default_input_size)
    out = []
    for i in range(n):
        result = run_trial(spec, cand, limit_bytes=LIMIT_BYTES)
        if not result.fits:
            raise SystemExit(f"{spec.name}: trial {i + 1} did not fit: {result.status.value} "
                             f"{result.message}")
        p = parts(result)
        say(f"  {spec.name} trial {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
        out.append(p)
    return out


def median_row(values: list[dict[str, float]]) -> list[str]:
    return [f"{statistics.median(v[c] for v in values):.2f}" for c in COLUMNS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 trial per case (< 2 min)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    parser.add_argument("--batch", type=int, default=8, help="batch size of every trial (8)")
    parser.add_argument("--spawn-case", default="mlp", help="case of the spawn comparison")
    args = parser.parse_args()

    from autofit.trials import runner as trial_mod

    started = time.perf_counter()
    n = 1 if args.quick else 3
    names = case_names()
    out = Report()

    def say(text: str) -> None:
        print(text, flush=True)

    out("# bench_trials: real-trial overhead beyond the training steps")
    out()
    out(machine_line())
    out(f"cases: {', '.join(names)} (fp32, batch {args.batch}, 2 warm-up + 3 timed steps, "
        f"CPU budget {LIMIT_BYTES / 2**30:.0f} GiB); {n} trial(s) per case; seconds")
    out()

    os.environ.pop("AUTOFIT_START_METHOD", None)
    trial_mod.shutdown()  # the first trial below starts the fork server
    first = run_many(spec_of(names[0]), args.batch, 1, say)[0]

    rows = []
    warm: list[dict[str, float]] = []
    per_case: dict[str, list[dict[str, float]]] = {}
    for name in names:
        values = run_many(spec_of(name), args.batch, n, say)
        per_case[name] = values
        warm.extend(values)
        rows.append([name, len(values), *median_row(values),
                     f"{max(v['overhead'] for v in values):.2f}"])

    out("## first trial of the run (includes starting the fork server)")
    out()
    out(markdown_table(["case", *HEADER], [[names[0], *(f"{first[c]:.2f}" for c in COLUMNS)]]))
    out()
    out(f"fork-server start (first start+IPC minus the warm median): "
        f"{first['start_ipc'] - statistics.median(v['start_ipc'] for v in per_case[names[0]]):.2f} s")
    out()
    out("## warm trials (fork server running), median per case")
    out()
    out(markdown_table(["case", "trials", *HEADER, "max overhead s"], rows))
    out()

    # ---- spawn comparison
    os.environ["AUTOFIT_START_METHOD"] = "spawn"
    try:
        spawned = run_many(spec_of(args.spawn_case), args.batch, n, say)
    finally:
        os.environ.pop("AUTOFIT_START_METHOD", None)
    fork_values = per_case.get(args.spawn_case) or run_many(spec_of(args.spawn_case), args.batch, n, say)
    out(f"## fork server vs a fresh interpreter per trial ({args.spawn_case}, median of {n})")
    out()
    out(markdown_table(["start method", *HEADER], [
        ["fork server", *median_row(fork_values)],
        ["spawn (AUTOFIT_START_METHOD=spawn)", *median_row(spawned)],
    ]))
    saved = (statistics.median(v["overhead"] for v in spawned)
             - statistics.median(v["overhead"] for v in fork_values))
    out()
    worst = max(v["overhead"] for v in warm)
    share = {c: statistics.median(v[c] for v in warm) for c in ("build", "child_other", "start_ipc")}
    out(f"summary: warm overhead beyond the steps: median "
        f"{statistics.median(v['overhead'] for v in warm):.2f} s, max {worst:.2f} s "
        f"(target < {TARGET_OVERHEAD_S:.0f} s: {'met' if worst < TARGET_OVERHEAD_S else 'missed'}); "
        f"median split: build {share['build']:.2f} s, child other {share['child_other']:.2f} s, "
        f"start+IPC {share['start_ipc']:.2f} s; first trial of a run +"
        f"{first['overhead'] - statistics.median(v['overhead'] for v in per_case[names[0]]):.2f} s "
        f"for the fork server; the fork server saves {saved:.2f} s per trial vs spawn")
    out(f"\ntotal wall time: {time.perf_counter() - started:.1f} s")
    out.write(args.markdown)
    trial_mod.shutdown()


if __name__ == "__main__":
    main()
