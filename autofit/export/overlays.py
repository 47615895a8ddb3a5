"""Framework config overlays: Lightning CLI YAML, HF ``TrainingArguments`` JSON, DeepSpeed JSON.

Each carries the batch plan's micro-batch and accumulation plus the tuned precision. YAML
files get the ``#`` provenance header; JSON files, which have no comments, a top-level
``"_autofit"`` object (drop keys starting with '_' before passing them on).
"""

from __future__ import annotations

from typing import Any

from autofit.export.batch_plan import BatchPlan
from autofit.export.common import comment, dump_json, dump_yaml
from autofit.export.provenance import Provenance, TunedValues, file_header
from autofit.export.tuned import parallel_of

LIGHTNING_PRECISION: dict[str, str] = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}

DEEPSPEED_ZERO_STAGE: dict[str, int] = {"ddp": 0, "fsdp": 3}
"""ZeRO stage standing in for a tuned strategy: ddp replicates everything (stage 0), fsdp
shards parameters, gradients and optimizer state (stage 3)."""


def _reshard_set(results: dict[str, Any]) -> bool:
    """Does the stored spec set ``parallel.fsdp.reshard_after_forward`` itself?"""
    par = (results.get("spec") or {}).get("parallel")
    fsdp = par.get("fsdp") if isinstance(par, dict) else None
    return isinstance(fsdp, dict) and "reshard_after_forward" in fsdp


def _json_provenance(results: dict[str, Any], plan: BatchPlan, fmt: str) -> dict[str, Any]:
    tuned = TunedValues.from_dict(results["best"])
    return {
        "generated_by": f"autofit export results.json --format {fmt}",
        **Provenance.from_results(results).as_dict(),
        "tuned": {
            "max_micro_batch_size": tuned.batch_size,
            "precision": tuned.precision,
            "checkpoint_segments": tuned.checkpoint_segments,
            "input_size": tuned.input_size,
            "verified": tuned.verified,
        },
        "plan": plan.as_dict(),
    }


def render_lightning(results: dict[str, Any], plan: BatchPlan) -> str:
    """A Lightning CLI config overlay (``--config lightning.yaml``): trainer and data batch size."""
    tuned = TunedValues.from_dict(results["best"])
    notes = ["Lightning has no Trainer flag for activation checkpointing: enable it in the"
             f" LightningModule ({tuned.checkpoint_segments} segments were tuned)."
             if tuned.checkpoint_segments else "Tuned without activation checkpointing."]
    trainer: dict[str, Any] = {
        "precision": LIGHTNING_PRECISION.get(tuned.precision, "32-true"),
        "accumulate_grad_batches": plan.gradient_accumulation_steps,
    }
    body: dict[str, Any] = {"trainer": trainer, "data": {"batch_size": plan.micro_batch_size}}
    model = (results.get("spec") or {}).get("model")
    if isinstance(model, dict) and "class_path" in model:
        # the spec is LightningCLI's own model section: keep it, and the batch size where
        # the module takes it (as BatchSizeFinder sets model.batch_size / hparams.batch_size)
        init_args = dict(model.get("init_args") or {})
        if "batch_size" in init_args:
            init_args["batch_size"] = plan.micro_batch_size
        body["model"] = {"class_path": model["class_path"], "init_args": init_args}
        notes.append("A DataModule given by class_path takes the batch as "
                     "data.init_args.batch_size; this file sets data.batch_size (a fixed DataModule).")
    step = (results.get("step") or {}).get("kind")
    if step:
        notes.append(f"Proven with the {step} step.")
    strategy = parallel_of(results).strategy
    if strategy != "none":
        trainer["strategy"] = strategy
        notes.append(f"Per-rank memory was tuned for {strategy} over {plan.world_size} ranks"
                     + (" with FSDP2 (fully_shard); Lightning's 'fsdp' strategy wraps with FSDP1."
                        if strategy == "fsdp" else "."))
    header = file_header(results, plan, "Lightning CLI config overlay", "lightning")
    return header + comment(notes) + dump_yaml(body)


def render_hf(results: dict[str, Any], plan: BatchPlan) -> str:
    """HF ``TrainingArguments`` fields as JSON; drop keys starting with '_' before passing them."""
    tuned = TunedValues.from_dict(results["best"])
    provenance = _json_provenance(results, plan, "hf")
    provenance["usage"] = ("TrainingArguments(output_dir=..., **{k: v for k, v in d.items() "
                           "if not k.startswith('_')})")
    if tuned.checkpoint_segments:
        provenance["gradient_checkpointing_note"] = (
            "HF checkpoints every layer, which saves at least as much memory as the "
            f"{tuned.checkpoint_segments} tuned segments")
    body: dict[str, Any] = {
        "_autofit": provenance,
        "per_device_train_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "bf16": tuned.precision == "bf16",
        "fp16": tuned.precision == "fp16",
        "gradient_checkpointing": tuned.checkpoint_segments > 0,
    }
    parallel = parallel_of(results)
    if parallel.strategy == "fsdp":
        body["fsdp"] = "full_shard"
        if _reshard_set(results):
            body["fsdp_config"] = {"reshard_after_forward": parallel.reshard_after_forward}
    elif parallel.strategy == "ddp":
        body["ddp_find_unused_parameters"] = False
    return dump_json(body)


def render_deepspeed(results: dict[str, Any], plan: BatchPlan) -> str:
    """A DeepSpeed config: micro-batch, accumulation, global batch and mixed precision."""
    tuned = TunedValues.from_dict(results["best"])
    provenance = _json_provenance(results, plan, "deepspeed")
    body: dict[str, Any] = {
        "_autofit": provenance,
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "fp16": {"enabled": tuned.precision == "fp16"},
        "bf16": {"enabled": tuned.precision == "bf16"},
    }
    strategy = parallel_of(results).strategy
    if strategy in DEEPSPEED_ZERO_STAGE:
        stage = DEEPSPEED_ZERO_STAGE[strategy]
        body["zero_optimization"] = {"stage": stage}
        provenance["zero_note"] = (
            f"tuned for {strategy} over {plan.world_size} ranks; ZeRO stage {stage} is its nearest "
            "DeepSpeed equivalent" + (" (parameters, gradients and optimizer state sharded); "
                                      "it is not FSDP2 itself, so the per-rank memory tuned "
                                      "for fsdp is a guide here, not a measurement"
                                      if stage == 3 else " (data parallel, nothing sharded)"))
    return dump_json(body)
