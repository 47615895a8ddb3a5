"""Benchmark: per-rank memory of GPT-style models under DDP and FSDP2, predicted and measured.

Usage::

    python scripts/bench_distributed.py                    # the per-rank table
    python scripts/bench_distributed.py --scan             # and the exhaustive 2-rank scan
    python scripts/bench_distributed.py --no-table --repeat 12   # the gloo settle, repeated
    python scripts/bench_distributed.py --models tiny small gpt2 --segments 0 2

**The table.** For each model, precision (fp32, bf16 autocast), checkpoint segments, strategy
(fsdp = FSDP2 ``fully_shard`` on each block then the root; ddp) and world size (1, 2, 4, 8):

* ``predicted``: autofit's per-rank peak (``predict.distributed.estimate_rank``): one rank
  traced on a fake process group of that size (fsdp), or the single-process trace with DDP's
  gradient buckets (ddp), read from step 2 on;
* ``measured``: where ranks can run here (world size 2: two gloo processes on this CPU), the
  largest rank's peak from step 2 on, counted by the same tracker on real tensors
  (``trials.ranks.run_rank_trial``, ``extra["rank_peaks_from_step"]``); ``err`` is
  predicted / measured - 1;
* ``ZeRO``: DeepSpeed's own estimate for the same parameter count (its
  ``estimate_zero2/3_model_states_mem_needs`` without offload: stage 3 for fsdp rows, stage 2
  for ddp rows, the closest DeepSpeed analogues), model states only; ``ZeRO err`` is that
  formula / the reference - 1, the reference being the measured peak where there is one,
  else the prediction.

**The scan** (``--scan``): ``autofit tune`` with ``parallel: {strategy: fsdp, world_size: 2}``
on a tiny GPT under a per-rank budget, then every batch from 1 to two past the tuned one run
as a real 2-rank trial under the same budget: the tuned batch must be the largest that fits.
The same spec with no ``parallel`` section is tuned too, and the real trials of both searches
are printed side by side. A trial fails on the peak of any step (as a device would); the
prediction is read from step 2 on, so the scan shows both.

**The repeat** (``--repeat N``): the same 2-rank fsdp trial of the scan's GPT (fp32 at batch 1
and 4 per rank, bf16 with 2 checkpoint segments at batch 4) run N times with each collective settled
(the default: it returns once gloo's worker thread has let go of its tensors) and N times
without, interleaved; per run the two ranks' peaks from step 2 on minus the prediction, and how
many of the ranks' collectives had to wait. Without the settle a rank's all-gather output, or
the flat buffer gloo's reduce-scatter stages through, can outlive the step's reference by a
moment and show up in its peak.

Every process runs with ``OMP_NUM_THREADS=1``; the load average is printed with the timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {
    "tiny": {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64},
    "small": {"vocab_size": 512, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128},
    "gpt2": {"vocab_size": 50304, "block_size": 256, "n_layer": 12, "n_head": 12, "n_embd": 768},
}
"""GPT-style models (``autofit.zoo.gpt``); gpt2 is GPT-2 small (124M) at 256 tokens, too large
to run 2 ranks of here in reasonable time: predicted only unless ``--measure-all``."""
MEASURED = ("tiny", "small")
WORLD_SIZES = (1, 2, 4, 8)
RUNNABLE_WORLD = 2
SCAN_GPT = {"vocab_size": 128, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
SCAN_LIMIT = 1_200_000


def spec_for(model: dict, strategy: str | None, world_size: int = 2,
             budget: int | None = None) -> object:
    from autofit.spec import spec_from_dict

    raw = {"name": "bench-distributed", "model": {"_target_": "autofit.zoo.gpt", **model},
           "data": {"kind": "tokens", "vocab_size": model["vocab_size"],
                    "seq_len": model["block_size"]},
           "device": "cpu", "search": {"batch_size": {"min": 1, "max": 64},
                                       "steps_per_trial": 1}}
    if strategy is not None:
        raw["parallel"] = {"strategy": strategy, "world_size": world_size}
    if budget is not None:
        raw["memory"] = {"budget": budget, "margin": 0.0}
    return spec_from_dict(raw)


def fmt_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.3f} MiB"


def fmt_err(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}%"


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(models: list[str], precisions: list[str], segments: list[int], batch: int,
          measure_all: bool) -> list[dict]:
    from autofit.candidate import Candidate
    from autofit.parallel import RankPlan, deepspeed_zero_bytes
    from autofit.predict.device_model import CPU
    from autofit.predict.distributed import estimate_rank
    from autofit.trials.ranks import run_rank_trial

    rows = []
    for name in models:
        model = MODELS[name]
        for precision in precisions:
            for seg in segments:
                cand = Candidate(batch_size=batch, input_size=model["block_size"],
                                 precision=precision, checkpoint_segments=seg)
                for strategy in ("fsdp", "ddp"):
                    ddp_pred = None
                    for n in WORLD_SIZES:
                        spec = spec_for(model, strategy, n)
                        t0 = time.perf_counter()
                        if strategy == "ddp" and ddp_pred is not None:
                            est = ddp_pred  # the bucket model does not depend on N
                        else:
                            est = estimate_rank(spec, cand, CPU, RankPlan(strategy=strategy,
                                                                          world_size=n))
                            ddp_pred = est if strategy == "ddp" else None
                        predict_s = time.perf_counter() - t0
                        measured = None
                        measure_s = 0.0
                        if n == RUNNABLE_WORLD and (name in MEASURED or measure_all):
                            t0 = time.perf_counter()
                            res = run_rank_trial(spec, cand, limit_bytes=None, steps=1,
                                                 warmup_steps=1, timeout_s=600)
                            measure_s = time.perf_counter() - t0
                            if not res.fits:
                                raise SystemExit(f"{name} {strategy} x{n} {cand.label()}: "
                                                 f"{res.status.value}: {res.message}")
                            measured = max(res.extra["rank_peaks_from_step"])
                        stage = 3 if strategy == "fsdp" else 2
                        zero = deepspeed_zero_bytes(est.param_count, n, stage)
                        ref = measured if measured is not None else est.peak_bytes
                        rows.append({
                            "model": name, "params": est.param_count, "precision": precision,
                            "segments": seg, "strategy": strategy, "world_size": n,
                            "predicted": est.peak_bytes, "measured": measured,
                            "err": (est.peak_bytes / measured - 1) if measured else None,
                            "zero_stage": stage, "zero": zero, "zero_err": zero / ref - 1,
                            "zero_ref": "measured" if measured is not None else "predicted",
                            "predict_s": predict_s, "measure_s": measure_s,
                        })
                        print(f"  {name} {precision} ckpt={seg} {strategy} x{n}: predicted "
                              f"{est.peak_bytes:,} measured {measured if measured else '-'} "
                              f"({predict_s:.1f} s + {measure_s:.1f} s, {load()})",
                              file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict], batch: int) -> None:
    print(f"\nPer-rank peak at batch {batch} per rank (live tensor bytes from step 2 on; "
          f"measured = 2 real gloo ranks on this CPU)\n")
    head = ("model", "params", "prec", "ckpt", "strategy", "N", "predicted/rank",
            "measured/rank", "err", "ZeRO formula", "ZeRO err (vs)")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join([
            r["model"], f"{r['params'] / 1e6:.2f}M", r["precision"], str(r["segments"]),
            r["strategy"], str(r["world_size"]), fmt_bytes(r["predicted"]),
            fmt_bytes(r["measured"]), fmt_err(r["err"]),
            f"{fmt_bytes(r['zero'])} (ZeRO-{r['zero_stage']})",
            f"{fmt_err(r['zero_err'])} ({r['zero_ref']})"]) + " |")
    measured = [r for r in rows if r["err"] is not None]
    if measured:
        worst = max(abs(r["err"]) for r in measured)
        zero = [abs(r["zero_err"]) for r in rows]
        print(f"\n{len(measured)} measured rows: largest |predicted/measured - 1| = "
              f"{100 * worst:.2f}%; DeepSpeed's formula is off by {100 * min(zero):.0f}% to "
              f"{100 * max(zero):.0f}% over all {len(rows)} rows (model states only: no "
              f"activations, no all-gather buffers, fp16 + fp32 master weights assumed)")


def scan(out: Path) -> None:
    from autofit.api import tune
    from autofit.candidate import Candidate
    from autofit.trials.ranks import run_rank_trial

    spec = spec_for(SCAN_GPT, "fsdp", 2, budget=SCAN_LIMIT)
    t0 = time.perf_counter()
    result = tune(spec, out_dir=out / "fsdp", cache=False)
    tune_s = time.perf_counter() - t0
    tuned = result.best.result.candidate.batch_size
    t0 = time.perf_counter()
    single = tune(spec_for(SCAN_GPT, None, budget=SCAN_LIMIT), out_dir=out / "single",
                  cache=False)
    single_s = time.perf_counter() - t0
    print(f"\nExhaustive 2-rank scan: GPT {SCAN_GPT}, fsdp x2 gloo, per-rank budget "
          f"{SCAN_LIMIT:,} bytes (margin 0), seq {SCAN_GPT['block_size']}, fp32\n")
    print("| batch/rank | status | top rank peak (any step) | from step 2 | rank peaks |")
    print("|---|---|---|---|---|")
    fits = []
    t0 = time.perf_counter()
    for batch in range(1, tuned + 3):
        cand = Candidate(batch_size=batch, input_size=SCAN_GPT["block_size"])
        res = run_rank_trial(spec, cand, limit_bytes=SCAN_LIMIT, steps=1, warmup_steps=1,
                             timeout_s=600)
        if res.fits:
            fits.append(batch)
        late = [p for p in res.extra.get("rank_peaks_from_step", []) if p]
        print(f"| {batch} | {res.status.value} | {res.peak_bytes:,} | "
              f"{f'{max(late):,}' if late else '-'} | "
              f"{', '.join(f'{p:,}' for p in res.extra.get('rank_peaks', []) if p)} |")
    scan_s = time.perf_counter() - t0
    true_max = max(fits) if fits else 0
    print(f"\ntuned fsdp x2 batch per rank: {tuned}; largest batch the scan found to fit: "
          f"{true_max} -> {'SAME' if tuned == true_max else 'DIFFERENT'}")
    print(f"real trials: fsdp x2 tune {result.real_trials} ({result.search_trials} search + "
          f"verification), single-process tune of the same spec "
          f"{single.real_trials} ({single.search_trials} search + verification; its batch "
          f"{single.best.result.candidate.batch_size}); "
          f"ratio {result.real_trials / max(1, single.real_trials):.2f}")
    print(f"wall: fsdp tune {tune_s:.0f} s, single tune {single_s:.0f} s, scan of "
          f"{tuned + 2} batches {scan_s:.0f} s ({load()})")
    if tuned != true_max:
        raise SystemExit(1)


def repeat(runs: int) -> None:
    from autofit.candidate import Candidate
    from autofit.predict.device_model import CPU
    from autofit.predict.distributed import estimate_rank
    from autofit.trials.ranks import run_rank_trial

    spec = spec_for(SCAN_GPT, "fsdp", 2)
    print(f"\nRepeated 2-rank fsdp trials, GPT {SCAN_GPT}, {runs} runs each way (interleaved)\n")
    print("| batch/rank | precision | ckpt | collectives | runs | both ranks exact | off runs: rank peak - "
          "predicted (bytes) | collectives that waited / run |")
    print("|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for batch, precision, segments in ((1, "fp32", 0), (4, "fp32", 0), (4, "bf16", 2)):
        cand = Candidate(batch_size=batch, input_size=SCAN_GPT["block_size"], precision=precision,
                         checkpoint_segments=segments)
        predicted = estimate_rank(spec, cand, CPU).peak_bytes
        rows: dict[bool, list[tuple[list[int], int]]] = {True: [], False: []}
        for _ in range(runs):
            for settle in (True, False):
                res = run_rank_trial(spec, cand, steps=1, timeout_s=600, settle_collectives=settle)
                diffs = [p - predicted for p in res.extra.get("rank_peaks_from_step", []) if p]
                waited = sum(c.get("waited", 0) for c in res.extra.get("rank_collectives", []))
                rows[settle].append((diffs, waited))
        for settle in (True, False):
            got = rows[settle]
            exact = sum(1 for diffs, _ in got if diffs and not any(diffs))
            off = sorted({d for diffs, _ in got for d in diffs if d})
            waits = (f"{sum(w for _, w in got) / len(got):.1f}" if settle else "-")
            print(f"| {batch} | {precision} | {segments} | {'settled' if settle else 'as gloo returns'} | "
                  f"{len(got)} | {exact} | {', '.join(f'{d:+,}' for d in off) or '-'} | {waits} |")
    print(f"\npredicted per-rank peak: the fake-PG trace; wall {time.perf_counter() - t0:.0f} s "
          f"({load()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["tiny", "small"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"],
                        default=["fp32", "bf16"])
    parser.add_argument("--segments", nargs="+", type=int, default=[0])
    parser.add_argument("--batch", type=int, default=4, help="batch per rank")
    parser.add_argument("--measure-all", action="store_true",
                        help="also run 2 real ranks of the models predicted only by default")
    parser.add_argument("--scan", action="store_true",
                        help="also the exhaustive 2-rank scan of a tuned fsdp batch")
    parser.add_argument("--repeat", type=int, default=0, metavar="N",
                        help="also N repeated 2-rank trials with and without the gloo settle")
    parser.add_argument("--no-table", action="store_true", help="skip the per-rank table")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {load()}", flush=True)
    if not args.no_table:
        rows = table(args.models, args.precisions, args.segments, args.batch, args.measure_all)
        print_table(rows, args.batch)
    if args.scan:
        with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
            scan(Path(tmp))
    if args.repeat:
        repeat(args.repeat)
    print(f"\ntotal {time.perf_counter() - start:.0f} s ({load()})")


if __name__ == "__main__":
    main()
