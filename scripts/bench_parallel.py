"""Benchmark: one multi-setting CPU search with 1 and 2 workers on PostgreSQL, 1 on a journal.

Usage::

    python scripts/bench_parallel.py                 # starts a throwaway PostgreSQL cluster
    python scripts/bench_parallel.py --storage URL   # an existing server (a fresh database)
    python scripts/bench_parallel.py --markdown out/bench_parallel.md

The search: an MLP (256 -> 4 x 768 -> 16) under an emulated ``--budget`` device (default
384 MiB), precision [fp32, bf16] x checkpoint segments [0, 2], objective max_batch: 9 real
trials (a max_batch search trial settles fit or OOM in its first steps, whatever
``steps_per_trial`` says, so the budget, through the batch, sets how long a trial takes; the
traces are fake-tensor runs whose cost does not grow with the batch). At 384 MiB a fitting
trial computes for several seconds on one core, as GPU trials take tens of seconds, so the
trials weigh more than the fixed costs; ``--budget 96MiB`` shows a search dominated by the
fixed costs. Each row is one ``autofit tune`` command, timed as a subprocess from start to
results.json, in its own output dir (no trace cache shared between rows):

* ``tune``: the single-process search (journal), the reference answer;
* ``journal x1``: ``tune --workers 1`` on the journal file in the output dir;
* ``postgres x1`` / ``postgres x2``: ``tune --workers N --storage URL``.

Columns: wall time, real trials (measured trials in the study), duplicate trials (the same
candidate and steps measured twice: must be 0), the answer (must be the same in every row),
the 1-minute load average when the row ended (other work on the machine slows every row), and
where the time went: ``trials s`` (the trials' own wall times summed over every worker),
``per worker s`` (the same split by the worker that ran each trial: with two free cores the
trial phase takes the larger share), ``predict s`` (the first worker's predictions) and ``fixed s`` (the wall time outside the
first worker's search: process start, imports, writing the files, waiting for the others).
Before the rows it measures the machine's headroom: two one-thread matmul processes' summed
rate over one's alone (2.00x on two idle cores; other work on the machine lowers it, and
with it the most a second worker can gain). Every process runs with ``OMP_NUM_THREADS=1``: a worker is one core, as a GPU worker is one
device (with more threads a single CPU worker already spreads each trial over the cores, and a
second worker has nothing left to use). Each run's output is kept in ``<dir>/tune.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC = {
    "name": "bench-parallel",
    "model": {"_target_": "autofit.zoo.mlp", "in_features": 256, "hidden": 768, "depth": 4,
              "out_features": 16},
    "data": {"kind": "tensor", "shape": [256], "num_classes": 16},
    "device": "cpu",
    "memory": {"budget": "384MiB", "margin": 0.10},
    "search": {"precision": ["fp32", "bf16"], "checkpoint_segments": [0, 2],
               "steps_per_trial": 2, "verify_steps": 3},
}


def run(label: str, args: list[str], out: Path, url: str, spec_path: Path) -> dict:
    """One ``autofit tune`` row, timed from process start to results.json."""
    import optuna

    from autofit.search.workers import duplicates, measured_trials, open_storage, study_name
    from autofit.spec import load_spec

    env = {k: v for k, v in os.environ.items() if k not in ("AUTOFIT_CACHE_DIR", "OMP_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = "1"  # a worker is one core, as a GPU worker is one device
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "autofit.cli", "tune", str(spec_path), "--out",
                           str(out), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    (out / "tune.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{label}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    data = json.loads((out / "results.json").read_text())
    best = data["best"]
    storage = open_storage(url)
    study = optuna.load_study(study_name=study_name(load_spec(spec_path)), storage=storage)
    per_worker: dict[str, float] = {}
    for t in measured_trials(study):
        worker = str(t.user_attrs.get("worker") or "tune")
        per_worker[worker] = per_worker.get(worker, 0.0) + float(
            t.user_attrs["result"].get("wall_time_s") or 0.0)
    return {"label": label, "wall_s": wall, "trials": len(measured_trials(study)),
            "split": " / ".join(f"{s:.1f}" for s in sorted(per_worker.values(), reverse=True)),
            "duplicates": duplicates(study),
            "trial_s": sum(float(t.get("seconds") or 0.0) for t in data["trials"]),
            "predict_s": float(data.get("predict_s") or 0.0),
            "fixed_s": wall - float(data.get("wall_time_s") or 0.0),
            "load": os.getloadavg()[0],
            "answer": f"batch={best['batch_size']} {best['precision']} "
                      f"ckpt={best['checkpoint_segments']}"}


HEADROOM = """
import sys, time, torch
x, w = torch.randn(2048, 768), torch.randn(768, 768)
t, n = time.perf_counter(), 0
while time.perf_counter() - t < float(sys.argv[1]):
    x @ w
    n += 1
print(n / (time.perf_counter() - t))
"""


def headroom(seconds: float = 5.0) -> float:
    """What the machine gives two one-thread processes now: their summed matmul rate over one
    process's alone (2.0 on two idle cores; ~1.0 when other work holds a core). The ceiling
    of the 2-worker speed-up while the bench runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", HEADROOM, str(seconds)]
    alone = float(subprocess.run(cmd, capture_output=True, text=True, env=env,
                                 check=True).stdout)
    pair = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    return sum(float(p.communicate()[0]) for p in pair) / alone


def start_postgres(base: Path) -> tuple[str, Path]:
    script = ROOT / "scripts" / "throwaway_postgres.sh"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = subprocess.run(["bash", str(script), "start", str(base), str(port)], check=True,
                         capture_output=True, text=True).stdout.strip()
    return url, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="an existing PostgreSQL URL (default: a throwaway one)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--keep", action="store_true", help="keep the output dirs and logs")
    parser.add_argument("--budget", default="384MiB", help="the emulated device's memory")
    parser.add_argument("--rows", default="tune,journal,postgres",
                        help="which rows: tune, journal, postgres (x1 and x2)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autofit-bench-parallel-"))
    spec_path = work / "bench.yaml"
    spec = json.loads(json.dumps(SPEC))
    spec["memory"]["budget"] = args.budget
    wanted = set(args.rows.split(","))
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    load_start = os.getloadavg()[0]
    room = headroom()
    print(f"two one-thread processes get {room:.2f}x one's matmul rate here now", flush=True)
    pg_dir = None
    url = args.storage
    if url is None:
        pg_dir = Path(tempfile.mkdtemp(prefix="autofit-bench-pg-"))
        url, _ = start_postgres(pg_dir)
    import optuna

    from autofit.search.workers import open_storage

    rows = []
    try:
        if "tune" in wanted:
            rows.append(run("tune", [], work / "seq",
                            f"journal:{work / 'seq' / 'study.journal'}", spec_path))
            print(rows[-1], flush=True)
        if "journal" in wanted:
            rows.append(run("journal x1", ["--workers", "1"], work / "j1",
                            f"journal:{work / 'j1' / 'study.journal'}", spec_path))
            print(rows[-1], flush=True)
        for n in (1, 2) if "postgres" in wanted else ():
            storage = open_storage(url)
            for name in optuna.get_all_study_names(storage):  # each row starts empty
                optuna.delete_study(study_name=name, storage=storage)
            rows.append(run(f"postgres x{n}", ["--workers", str(n), "--storage", url],
                            work / f"pg{n}", url, spec_path))
            print(rows[-1], flush=True)
    finally:
        if pg_dir is not None:
            subprocess.run(["bash", str(ROOT / "scripts" / "throwaway_postgres.sh"), "stop",
                            str(pg_dir)], check=False)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["wall_s"]
    load = os.getloadavg()[0]
    lines = [f"CPU cores: {os.cpu_count()} (1-min load average {load_start:.1f} at the start, "
             f"{load:.1f} at the end); search: 4 settings, max_batch, budget {args.budget}, "
             f"real trials, OMP_NUM_THREADS=1 per worker; two one-thread processes got "
             f"{room:.2f}x the matmul rate of one before the rows (the ceiling of a 2-worker "
             f"speed-up on this machine at that moment; 2.00x on two idle cores)",
             "", f"| run | wall s | speed-up vs {rows[0]['label']} | real trials | duplicates | answer "
                 "| trials s | per worker s | predict s | fixed s | load |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | "
                     f"{r['trials']} | {r['duplicates']} | {r['answer']} | {r['trial_s']:.1f} | "
                     f"{r['split']} | {r['predict_s']:.1f} | {r['fixed_s']:.1f} | {r['load']:.1f} |")
    same = len({r["answer"] for r in rows}) == 1
    dups = sum(r["duplicates"] for r in rows)
    lines += ["", f"answers identical: {'yes' if same else 'NO'}; duplicate trials: {dups}"]
    by = {r["label"]: r for r in rows}
    if "postgres x1" in by and "postgres x2" in by:
        lines.append(f"postgres x2 vs x1: "
                     f"{by['postgres x1']['wall_s'] / by['postgres x2']['wall_s']:.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if not same or dups:
        sys.exit(1)


if __name__ == "__main__":
    main()
