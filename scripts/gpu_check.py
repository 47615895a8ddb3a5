"""One-shot GPU check: predicted vs measured memory, autofit vs Lightning, emulated targets.

Run on a CUDA machine (``bash scripts/gpu_check.sh``); finishes in a few minutes on an H100.
Writes markdown tables and a calibrated device model under ``$OUT`` (else ``gpu_check_out/``).

Parts:
  A. zoo x precision x segments: predicted (fake-tensor trace + CUDA device model) vs
     measured ``max_memory_allocated`` / ``max_memory_reserved`` of a real trial; refits the
     device model's workspace and fragmentation constants from these rows.
  B. the same config tuned by autofit and by Lightning's BatchSizeFinder (binsearch and power)
     under the same memory cap; real trials, steps, wall time, and whether each answer fits.
  C. emulated 40 GB and 16 GB cards (memory fraction): predicted target batch, tuned batch.
  D. a tune on the whole card (budget auto) whose targets are verified by capped trials.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from autofit.candidate import Candidate  # noqa: E402
from autofit.predict import estimate, predict_max_batch  # noqa: E402
from autofit.predict.device_model import CUDA_DEFAULT, DeviceModel  # noqa: E402
from autofit.search.tuner import run_search as tune  # noqa: E402
from autofit.spec import spec_from_dict  # noqa: E402
from autofit.trials import run_trial  # noqa: E402

GiB = 2**30
OUT = Path(os.environ.get("OUT") or ROOT / "gpu_check_out")
OUT.mkdir(parents=True, exist_ok=True)
LOG = OUT / "gpu_check.md"


def emit(text: str = "") -> None:
    print(text, flush=True)
    with LOG.open("a") as fh:
        fh.write(text + "\n")


CASES = {
    "resnet50": ({"_target_": "autofit.zoo.resnet", "depth": 50, "num_classes": 1000,
                  "small_input": False},
                 {"kind": "image", "channels": 3, "size": 224, "num_classes": 1000}, 64),
    "vit": ({"_target_": "autofit.zoo.vit", "image_size": 224, "patch_size": 16, "dim": 768,
             "depth": 12, "heads": 12, "num_classes": 1000},
            {"kind": "image", "channels": 3, "size": 224, "num_classes": 1000}, 64),
    "gpt2": ({"_target_": "autofit.zoo.gpt", "preset": "gpt2"},
             {"kind": "tokens", "vocab_size": 50304, "seq_len": 1024}, 8),
    "mlp": ({"_target_": "autofit.zoo.mlp", "in_features": 4096, "hidden": 8192, "depth": 8,
             "out_features": 1000},
            {"kind": "tensor", "shape": [4096], "num_classes": 1000}, 512),
}


def make_spec(name: str, *, budget: str = "auto", margin: float = 0.1, **search) -> object:
    model, data, _ = CASES[name]
    return spec_from_dict({
        "name": f"gpu-{name}", "model": model, "data": data, "device": "cuda",
        "memory": {"budget": budget, "margin": margin},
        "search": {"steps_per_trial": 2, "verify_steps": 5, "timeout_s": 300, **search},
    })


def part_a(quick: bool) -> list[dict]:
    emit("## A. predicted vs measured peak (CUDA)\n")
    emit("| model | prec | seg | batch | traced | pred alloc | meas alloc | err alloc | pred reserved | meas reserved | err reserved | trace s |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    precisions = ["fp32", "bf16"] if quick else ["fp32", "bf16", "fp16"]
    for name, (_, _data, batch) in CASES.items():
        spec = make_spec(name)
        size = spec.default_input_size
        for precision in precisions:
            for seg in (0, 2):
                cand = Candidate(batch_size=batch, input_size=size, precision=precision,
                                 checkpoint_segments=seg)
                try:
                    est = estimate(spec, cand, CUDA_DEFAULT)
                    res = run_trial(spec, cand, limit_bytes=None, device="cuda", steps=2)
                except Exception as exc:  # keep going: one row must not lose the others
                    emit(f"| {name} | {precision} | {seg} | {batch} | error: {exc} |")
                    continue
                if not res.fits:
                    emit(f"| {name} | {precision} | {seg} | {batch} | trial {res.status.value}: {res.message[:80]} |")
                    continue
                traced = est.breakdown.peak_bytes
                alloc, reserved = res.memory.peak_bytes, res.memory.reserved_bytes
                row = dict(model=name, precision=precision, seg=seg, batch=batch, traced=traced,
                           pred_alloc=est.allocated_bytes, alloc=alloc,
                           pred_reserved=est.reserved_bytes, reserved=reserved,
                           trace_s=est.trace_time_s, blas=est.uses_blas,
                           traced_real=res.extra.get("traced_peak_bytes"))
                rows.append(row)
                emit(f"| {name} | {precision} | {seg} | {batch} | {traced / GiB:.3f} | "
                     f"{est.allocated_bytes / GiB:.3f} | {alloc / GiB:.3f} | "
                     f"{100 * (est.allocated_bytes / alloc - 1):+.2f}% | {est.reserved_bytes / GiB:.3f} | "
                     f"{reserved / GiB:.3f} | {100 * (est.reserved_bytes / reserved - 1):+.2f}% | "
                     f"{est.trace_time_s:.1f} |")
    if rows:
        errs_a = [abs(r["pred_alloc"] / r["alloc"] - 1) for r in rows]
        errs_r = [abs(r["pred_reserved"] / r["reserved"] - 1) for r in rows]
        emit(f"\nmax |error| allocated {100 * max(errs_a):.2f}% (mean {100 * statistics.mean(errs_a):.2f}%), "
             f"reserved {100 * max(errs_r):.2f}% (mean {100 * statistics.mean(errs_r):.2f}%) over {len(rows)} rows (GiB = 2^30 bytes)")
        # refit: cuBLAS workspace = median(alloc - traced) over rows whose trace used BLAS,
        # reserved - allocated = slack + fragmentation * allocated (least squares)
        blas = [r for r in rows if r["blas"]] or rows
        workspace = int(statistics.median(r["alloc"] - r["traced"] for r in blas))
        xs = [r["alloc"] for r in rows]
        ys = [r["reserved"] - r["alloc"] for r in rows]
        from autofit.predict import fit_line
        slack, frag = fit_line(list(zip(xs, ys, strict=True))) if len(rows) > 1 else (ys[0], 0.0)
        name = torch.cuda.get_device_properties(0).name
        model = replace(CUDA_DEFAULT, workspace_bytes=max(0, workspace), fragmentation=max(0.0, frag),
                        slack_bytes=max(0, int(slack)), calibrated_on=name, notes={"rows": len(rows)})
        model.save(OUT / "device_model.json")
        emit(f"calibrated device model for {name}: cuBLAS workspace {workspace / 2**20:.1f} MiB, "
             f"fragmentation {100 * frag:.2f}%, slack {slack / 2**20:.1f} MiB (device_model.json)")
        errs_a2 = [abs(model.allocated(r["traced"], r["blas"]) / r["alloc"] - 1) for r in rows]
        errs_r2 = [abs(model.reserved(r["traced"], r["blas"]) / r["reserved"] - 1) for r in rows]
        emit(f"with calibration: max |error| allocated {100 * max(errs_a2):.2f}%, reserved {100 * max(errs_r2):.2f}% "
             f"(fitted on the same rows: an in-sample figure)\n")
    return rows


LIGHTNING_SCRIPT = r'''
import json, sys, time, torch
import lightning as L
from lightning.pytorch.tuner import Tuner
sys.path.insert(0, sys.argv[1])
from autofit import zoo
mode, limit, total, seq = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.cuda.set_per_process_memory_fraction(limit / total)
steps, sizes = [0], []
class M(L.LightningModule):
    def __init__(self):
        super().__init__(); self.batch_size = 2; self.model = zoo.gpt(preset="gpt2")
    def training_step(self, batch, i):
        steps[0] += 1
        if not sizes or sizes[-1] != batch.shape[0]: sizes.append(batch.shape[0])
        logits = self.model(batch)
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), batch.view(-1))
    def configure_optimizers(self): return torch.optim.AdamW(self.parameters(), lr=1e-4)
    def train_dataloader(self):
        data = torch.randint(0, 50304, (100000, seq))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size)
t = time.time()
trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
new = Tuner(trainer).scale_batch_size(M(), mode=mode, steps_per_trial=3, init_val=2, max_trials=25)
print("RESULT " + json.dumps({"batch": new, "trials": len(sizes), "sizes": sizes, "steps": steps[0], "seconds": time.time() - t}))
'''


def part_b(quick: bool) -> None:
    emit("## B. autofit tune vs Lightning BatchSizeFinder (gpt2, seq 512, bf16, same cap)\n")
    total = torch.cuda.get_device_properties(0).total_memory
    cap = 16 * GiB
    spec = make_spec("gpt2", budget=str(cap), margin=0.0, precision=["bf16"], input_size=[512],
                     batch_size={"min": 1, "max": 4096})
    t = time.time()
    result = tune(spec, on_event=None)
    autofit_s = time.time() - t
    best = result.best.result.candidate.batch_size
    steps = result.real_steps
    emit("| tool | batch returned | real trials | training steps | wall s | returned size ran? | fits under cap? |")
    emit("|---|---|---|---|---|---|---|")
    emit(f"| autofit | {best} | {result.real_trials} | {steps} | {autofit_s:.1f} | yes | yes (verified over {spec.search.verify_steps} steps) |")
    script = OUT / "_lightning_anchor.py"
    script.write_text(LIGHTNING_SCRIPT)
    for mode in ("binsearch", "power"):
        try:
            proc = subprocess.run([sys.executable, str(script), str(ROOT), mode, str(cap), str(total), "512"],
                                  capture_output=True, text=True, timeout=240)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                emit(f"| lightning {mode} | failed: {(proc.stderr or proc.stdout)[-300:]!r} |")
                continue
            data = json.loads(line[-1][7:])
            ran = data["batch"] in data["sizes"]
            check = run_trial(spec, Candidate(batch_size=data["batch"], input_size=512, precision="bf16"),
                              limit_bytes=cap, device="cuda", steps=3)
            emit(f"| lightning {mode} | {data['batch']} | {data['trials']} | {data['steps']} | "
                 f"{data['seconds']:.1f} | {'yes' if ran else 'NO'} | {check.status.value} |")
        except Exception as exc:
            emit(f"| lightning {mode} | error {exc!r} |")
    emit(f"\ntrue boundary from autofit's trials: batch {best} fits, {best + 1} does not (cap {cap / GiB:.0f} GiB)\n")


def part_c(quick: bool) -> None:
    emit("## C. emulated targets via memory fraction (gpt2, seq 1024, bf16)\n")
    emit("| target | predicted batch (device model) | tuned batch (real, capped) | trials | verified |")
    emit("|---|---|---|---|---|")
    calibrated = OUT / "device_model.json"
    model = DeviceModel.load(calibrated) if calibrated.exists() else CUDA_DEFAULT
    for label, cap in (("40GB", 40 * 10**9), ("16GB", 16 * 10**9)):
        spec = make_spec("gpt2", budget=str(cap), margin=0.1, precision=["bf16"],
                         batch_size={"min": 1, "max": 1024})
        limit = int(cap * 0.9)
        pred = predict_max_batch(spec, Candidate(batch_size=1, input_size=1024, precision="bf16"),
                                 model, limit)
        try:
            result = tune(spec)
            tuned = result.best.result.candidate.batch_size
            emit(f"| {label} | {pred.batch_size} | {tuned} | {result.real_trials} | {result.best.purpose == 'verify'} |")
        except Exception as exc:
            emit(f"| {label} | {pred.batch_size} | error {exc} | | |")


def part_d(quick: bool) -> None:
    emit("## D. tune on the whole card (budget auto) with targets verified by capped trials\n")
    model, data, _ = CASES["gpt2"]
    spec = spec_from_dict({
        "name": "gpu-gpt2-targets", "model": model, "data": {**data, "seq_len": 512},
        "device": "cuda", "memory": {"budget": "auto", "margin": 0.1},
        "search": {"precision": ["bf16"], "batch_size": {"min": 1, "max": 2048},
                   "verify_steps": 5, "timeout_s": 300},
        "targets": [{"name": "A100-40GB", "memory": "40GiB"},
                    {"name": "V100-16GB", "memory": "16GiB", "bf16": False}],
    })
    t = time.time()
    result = tune(spec, on_event=lambda e: emit(f"    {e.message}") if hasattr(e, "message") else None)
    best = result.best.result
    emit(f"best {best.candidate.label()}: reserved {best.peak_bytes / GiB:.2f} GiB of limit "
         f"{result.limit_bytes / GiB:.2f} GiB; {result.real_trials} trials "
         f"({result.search_trials} search), {result.real_steps} steps, {time.time() - t:.0f} s")
    for rec in result.trials:
        emit(f"    trial {rec.number} {rec.purpose} {rec.result.candidate.label()} {rec.result.status.value} "
             f"pred {(rec.predicted_peak_bytes or 0) / GiB:.2f} GiB meas {(rec.result.peak_bytes or 0) / GiB:.2f} GiB")
    emit("| target | batch | precision | verified | predicted peak GiB | measured peak GiB | note |")
    emit("|---|---|---|---|---|---|---|")
    for tgt in result.targets:
        emit(f"| {tgt['name']} | {tgt['batch_size']} | {tgt['precision']} | {tgt['verified']} | "
             f"{(tgt.get('predicted_peak_bytes') or 0) / GiB:.2f} | "
             f"{(tgt.get('measured_peak_bytes') or 0) / GiB:.2f} | {tgt['note'][:140]} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="ABCD")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    props = torch.cuda.get_device_properties(0)
    LOG.write_text("")
    emit(f"# autofit GPU check: {props.name}, {props.total_memory / GiB:.1f} GiB, torch {torch.__version__}, "
         f"CUDA {torch.version.cuda}\n")
    for part, fn in (("A", part_a), ("B", part_b), ("C", part_c), ("D", part_d)):
        if part not in args.parts:
            continue
        t = time.time()
        try:
            fn(args.quick)
        except Exception:
            emit(f"part {part} failed:\n```\n{traceback.format_exc()[-2000:]}\n```")
        emit(f"(part {part}: {time.time() - t:.0f} s)\n")


if __name__ == "__main__":
    main()
