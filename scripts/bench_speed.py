"""Benchmark: how fast autofit answers, before and after, side by side in one run.

Usage::

    python scripts/bench_speed.py             # start-up, estimate per shipped CPU config, quickstart tune
    python scripts/bench_speed.py --no-tune   # start-up and estimates only

Every figure is the wall time of a fresh process, as a user sees it:

* start-up: ``autofit --help`` now, against the same command with torch imported first
  (what the package did before its API was imported lazily);
* ``autofit estimate CONFIG`` (one estimate plus the max-batch search) for each shipped CPU
  config: *before* = no trace cache and the regula-falsi max-batch search alone (the
  per-stretch lines switched off in the process); *cold* = today's command with an empty cache;
  *warm* = the same command again (every trace from the cache);
* ``autofit tune configs/quickstart_cpu.yaml`` the same three ways (fresh output dir each).

The runs alternate per config so that load on a shared machine hits both sides alike;
ratios are after / before.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_CONFIGS = ["quickstart_cpu", "resnet_resolution", "gpt_seqlen"]
BEFORE = ("import sys; import autofit.predict.batch_curve as bc; "
          "bc._pin_by_segments = lambda *a, **k: None; "
          "from autofit.cli import main; sys.argv = ['autofit', *sys.argv[1:]]; main()")
WITH_TORCH = ("import sys, torch; from autofit.cli import main; "
              "sys.argv = ['autofit', *sys.argv[1:]]; main()")


def wall(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="start-up runs (median)")
    args = parser.parse_args()
    print(f"# bench_speed: {platform.machine()} {platform.processor() or ''}, "
          f"Python {platform.python_version()}")

    now = sorted(wall(autofit("--help"))[0] for _ in range(args.repeat))
    old = sorted(wall(patched(WITH_TORCH, "--help"))[0] for _ in range(args.repeat))
    mid = args.repeat // 2
    print("\n| start-up | with torch (before) s | now s | ratio |\n|---|---|---|---|")
    print(f"| autofit --help | {old[mid]:.2f} | {now[mid]:.2f} | {now[mid] / old[mid]:.2f} |")

    print("\n| autofit estimate | before s (traces) | cold s (traces) | warm s | cold/before "
          "| warm/before |\n|---|---|---|---|---|---|")
    for name in CPU_CONFIGS:
        config = f"configs/{name}.yaml"
        with tempfile.TemporaryDirectory() as cache:
            before, out_b = wall(patched(BEFORE, "estimate", config, "--no-cache"))
            cold, out_c = wall(autofit("estimate", config, "--cache-dir", cache))
            warm, out_w = wall(autofit("estimate", config, "--cache-dir", cache))
        # a warm run misses only when autofit's sources changed in between (part of the key)
        hit = "" if "0 new trace(s)" in out_w else " (cache missed: sources changed)"
        print(f"| {name} | {before:.2f} ({traces_of(out_b)}) | {cold:.2f} ({traces_of(out_c)}) "
              f"| {warm:.2f}{hit} | {cold / before:.2f} | {warm / before:.2f} |")

    if args.no_tune:
        return
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
    print(f"\nwarm tune: {hits[-1].strip() if hits else 'no cache line'}")


if __name__ == "__main__":
    main()
