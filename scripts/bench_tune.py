"""Benchmark: real trials ``tune`` needs to pin the largest batch, checked exhaustively.

Usage::

    python scripts/bench_tune.py            # 4 zoo cases + the 3-axis search + quickstart CLI
    python scripts/bench_tune.py --quick    # mlp row + quickstart CLI, no 3-axis search
    python scripts/bench_tune.py --markdown out/bench_tune.md

Issue targets (printed, never asserted): batch-only search pins the largest fitting batch in a
median of <= 3 real trials; the found batch equals the true maximum under budget x (1 -
margin), from an exhaustive search; a 3-axis search (3 input sizes x 3 precisions x 3
segment counts) needs fewer real trials than its 27 combinations; ``autofit tune
configs/quickstart_cpu.yaml`` takes < 60 s.

Batch-only rows: each zoo case on CPU, fp32, no checkpointing, with a per-case budget chosen
so the largest batch is ~20 (margin 0.10, CPU trials count live tensor bytes, so the
limit is exact and deterministic). ``tune(spec)`` runs with an in-memory study. Columns:

* ``predicted``: the predictor's max batch (fake-tensor traces only);
* ``found``: ``TuneResult.best`` (verified over ``verify_steps`` steps);
* ``true max``: exhaustive search with real trials (``run_trial``, ``steps=1``,
  ``warmup_steps=2``) at batch 1, 2, 3, ... up to the first OOM, under the same limit;
  ``found fits`` / ``found+1 OOM`` are read from that scan;
* ``to pin``: real trials before verification (``purpose != 'verify'``); ``total``: all real
  trials (``TuneResult.real_trials``); ``steps``: ``TuneResult.real_steps``;
* ``scan``: trials of the exhaustive scan.

The 3-axis row runs the smallest GPT (2 layers, 64 wide, vocab 256) over sequence length
[32, 64, 128] x precision [fp32, bf16, fp16] x checkpoint segments [0, 1, 2], objective
max_batch, ``steps_per_trial 1``, ``verify_steps 2`` (slow: CPU bf16/fp16 autocast).
Last, ``autofit tune configs/quickstart_cpu.yaml --out <tmpdir>`` is timed as a subprocess.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _zoo_cases import (  # noqa: E402
    BUDGETS,
    MARGIN,
    Report,
    case_names,
    machine_line,
    markdown_table,
    spec_of,
)

ROOT = Path(__file__).resolve().parent.parent
"""Per-case budgets (binary MiB) that put the largest fp32 batch at ~20 (the exhaustive scan
costs ~N^2 in batch, so the low end of ~20-60 keeps the full run near 10 minutes)."""
BATCH_SEARCH = {"batch_size": {"min": 1, "max": 4096}, "precision": ["fp32"],
                "checkpoint_segments": [0], "steps_per_trial": 2, "verify_steps": 4}
THREE_AXIS_BUDGET = "12MiB"
THREE_AXIS_SEARCH = {"batch_size": {"min": 1, "max": 4096}, "input_size": [32, 64, 128],
                     "precision": ["fp32", "bf16", "fp16"], "checkpoint_segments": [0, 1, 2],
                     "objective": "max_batch", "steps_per_trial": 1, "verify_steps": 2}
LIGHTNING_TRIALS = {"binsearch": 23, "power": 12}
"""Trials Lightning's BatchSizeFinder needs on the same kind of search (issue 5)."""


def to_pin(result: Any) -> int:
    return sum(1 for t in result.trials if not t.resumed and t.purpose != "verify")


def exhaustive_max(spec: Any, limit_bytes: int, say: Any, cap: int = 4096) -> tuple[int, int, dict[int, bool]]:
    """Largest batch that fits, scanning 1, 2, 3, ... until the first OOM (real trials)."""
    from autofit.candidate import Candidate
    from autofit.trials import run_trial

    fits: dict[int, bool] = {}
    batch = 1
    while batch <= cap:
        cand = Candidate(batch_size=batch, input_size=spec.default_input_size)
        result = run_trial(spec, cand, limit_bytes=limit_bytes, steps=1, warmup_steps=2)
        if result.status.value not in ("fits", "oom"):
            raise SystemExit(f"{spec.name}: scan trial at batch {batch} ended as "
                             f"{result.status.value}: {result.message}")
        fits[batch] = result.fits
        if not result.fits:
            break
        batch += 1
    say(f"  exhaustive scan: {len(fits)} trials, first OOM at batch {batch}")
    return batch - 1, len(fits), fits


def batch_row(name: str, say: Any) -> tuple[list[Any], int, bool]:
    from autofit.search.tuner import run_search as tune

    spec = spec_of(name, BUDGETS[name], margin=MARGIN, search=BATCH_SEARCH)
    t0 = time.perf_counter()
    result = tune(spec, on_event=lambda e: say(f"  [{name}] {e.message}") if hasattr(e, "message") else None)
    wall = time.perf_counter() - t0
    assert result.best is not None
    found = result.best.result.candidate.batch_size
    predicted = result.settings[0].predicted_batch_size
    say(f"  {name}: predicted {predicted}, found {found} in {to_pin(result)} trials to pin, "
        f"{result.real_trials} total, {wall:.1f} s")
    true_max, scan_trials, fits = exhaustive_max(spec, result.limit_bytes, say)
    pinned = to_pin(result)
    row = [name, BUDGETS[name], f"{result.limit_bytes / 2**20:.1f}", predicted, found, true_max,
           "yes" if found == true_max else "NO",
           "yes" if fits.get(found) else "no",
           "yes" if fits.get(found + 1) is False else "no",
           pinned, result.real_trials, result.real_steps, scan_trials, f"{wall:.1f}"]
    return row, pinned, found == true_max


def three_axis(say: Any) -> list[Any]:
    from autofit.search.tuner import run_search as tune

    spec = spec_of("gpt_tiny", THREE_AXIS_BUDGET, margin=MARGIN, search=THREE_AXIS_SEARCH)
    combos = (len(THREE_AXIS_SEARCH["input_size"]) * len(THREE_AXIS_SEARCH["precision"])
              * len(THREE_AXIS_SEARCH["checkpoint_segments"]))
    t0 = time.perf_counter()
    result = tune(spec, on_event=lambda e: say(f"  [3-axis] {e.message}") if hasattr(e, "message") else None)
    wall = time.perf_counter() - t0
    assert result.best is not None
    c = result.best.result.candidate
    measured = sum(1 for s in result.settings if s.measured_batch_size is not None)
    return [spec.name, THREE_AXIS_BUDGET, combos, to_pin(result), result.real_trials,
            result.real_steps, measured, c.label(), f"{result.predict_s:.1f}", f"{wall:.1f}"]


def quickstart_cli(say: Any) -> tuple[float, int]:
    exe = Path(sys.executable).parent / "autofit"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "autofit.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        args = [*cmd, "tune", str(ROOT / "configs" / "quickstart_cpu.yaml"), "--out",
                str(Path(tmp) / "out")]
        t0 = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        say(f"  autofit tune exited {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}")
    return wall, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="mlp row and the quickstart timing, no 3-axis search (< 2 min)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    parser.add_argument("--no-three-axis", action="store_true", help="skip the 3-axis search")
    parser.add_argument("--no-cli", action="store_true", help="skip the quickstart CLI timing")
    args = parser.parse_args()

    from autofit.trials import runner as trial_mod

    started = time.perf_counter()
    out = Report()

    def say(text: str) -> None:
        print(text, flush=True)

    names = ["mlp"] if args.quick else case_names()
    out("# bench_tune: real trials to pin the largest batch, checked exhaustively")
    out()
    out(machine_line())
    out(f"batch-only: {', '.join(names)}; device cpu, fp32, margin {MARGIN}, steps_per_trial "
        f"{BATCH_SEARCH['steps_per_trial']}, verify_steps {BATCH_SEARCH['verify_steps']}")
    out()

    rows, pins, equal = [], [], []
    for name in names:
        row, pinned, same = batch_row(name, say)
        rows.append(row)
        pins.append(pinned)
        equal.append(same)
    out("## batch-only search (one setting)")
    out()
    out(markdown_table(["case", "budget", "limit MiB", "predicted", "found", "true max", "equal?",
                        "found fits", "found+1 OOM", "to pin", "total", "steps", "scan trials",
                        "tune s"], rows))
    out()
    med = statistics.median(pins)
    out(f"median real trials to pin: {med:g} (target <= 3); Lightning BatchSizeFinder: "
        f"~{LIGHTNING_TRIALS['binsearch']} (binsearch), {LIGHTNING_TRIALS['power']} (power); "
        f"found == true max in {sum(equal)}/{len(equal)} cases")
    out()

    if not args.quick and not args.no_three_axis:
        row = three_axis(say)
        out("## 3-axis search (input size x precision x checkpoint segments)")
        out()
        out(markdown_table(["case", "budget", "combinations", "to pin", "total trials", "steps",
                            "settings measured", "best", "predict s", "tune s"], [row]))
        out()
        out(f"real trials {row[4]} vs {row[2]} combinations")
        out()

    if not args.no_cli:
        trial_mod.shutdown()  # the CLI has its own fork server
        wall, code = quickstart_cli(say)
        out("## autofit tune configs/quickstart_cpu.yaml --out <tmpdir> (subprocess)")
        out()
        out(f"wall time: {wall:.1f} s (target < 60 s){'' if code == 0 else f'; exit code {code}'}")
        out()
    out(f"total wall time: {time.perf_counter() - started:.1f} s")
    out.write(args.markdown)
    trial_mod.shutdown()


if __name__ == "__main__":
    main()
