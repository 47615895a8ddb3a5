"""Turn one tuned result (``results.json``) into cluster submission scripts and framework configs.

Everything here is a pure function of the results dict and the output spec, so
``autofit export results.json --format slurm`` regenerates any file without re-tuning and
two runs give identical bytes (no timestamps). Every file carries its provenance (spec hash,
GPU, torch version, memory margin, autofit version) so a stale config is recognisable:
shell and YAML files as ``#`` comments, JSON files in a top-level ``"_autofit"`` object.

Batch arithmetic: the tuned batch is the largest micro-batch that fits one GPU, and any
smaller batch fits too. Given ``output.global_batch_size`` and the world size
(nodes x GPUs per node), :func:`plan_batch` picks the largest micro-batch that divides the
per-GPU share exactly and makes up the rest with gradient accumulation.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autofit.errors import AutofitError, SpecError
from autofit.spec import PRECISIONS, SCRIPTS, OutputSpec, spec_from_dict
from autofit.units import format_bytes

FORMATS: tuple[str, ...] = ("slurm", "lsf", "torchrun", "lightning", "hf", "deepspeed", "targets")
"""Every export format, in the order files are written."""

FILE_NAMES: dict[str, str] = {
    "slurm": "submit_slurm.sh",
    "lsf": "submit_lsf.sh",
    "torchrun": "torchrun.sh",
    "lightning": "lightning.yaml",
    "hf": "hf_training_args.json",
    "deepspeed": "deepspeed.json",
    "targets": "targets.yaml",
}
"""Format -> file name inside the output directory (``targets`` also writes ``configs/*.yaml``)."""

RDZV_PORT = 29500
"""TCP port of the c10d rendezvous on the first node."""

TARGET_CAVEAT = (
    "capping the memory fraction emulates memory size, not architecture: speed, kernels and "
    "dtype support differ (e.g. no bf16 on V100/T4)"
)

LIGHTNING_PRECISION: dict[str, str] = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}

_REQUIRED_KEYS: tuple[tuple[str, ...], ...] = (
    ("spec",),
    ("spec_hash",),
    ("device",),
    ("device", "name"),
    ("device", "torch"),
    ("margin",),
    ("best",),
    ("best", "batch_size"),
    ("best", "precision"),
)


# --------------------------------------------------------------------------- batch plan


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split over GPUs and accumulation steps."""

    micro_batch_size: int
    """Samples per forward/backward on one GPU."""
    gradient_accumulation_steps: int
    """Micro-batches accumulated before each optimizer step."""
    world_size: int
    """GPUs in the job (nodes x GPUs per node)."""
    global_batch_size: int
    """Effective samples per optimizer step: micro x accumulation x world."""
    requested_global_batch_size: int | None
    """``output.global_batch_size`` as the user asked for it; None = not set."""
    exact: bool
    """True when the effective global batch equals the requested one (or none was requested)."""
    note: str
    """Why and by how much the effective batch differs, with a learning-rate hint; "" if exact."""


def _largest_divisor_at_most(number: int, limit: int) -> int:
    best = 1
    candidate = 1
    while candidate * candidate <= number:
        if number % candidate == 0:
            for divisor in (candidate, number // candidate):
                if best < divisor <= limit:
                    best = divisor
        candidate += 1
    return best


def _gpus(count: int) -> str:
    return f"{count} GPU" if count == 1 else f"{count} GPUs"


def plan_batch(max_micro_batch: int, world_size: int, global_batch_size: int | None) -> BatchPlan:
    """Pick micro-batch and gradient accumulation for a requested global batch.

    The micro-batch is the largest divisor of ``global / world`` that is <= ``max_micro_batch``
    (the tuned batch). When ``global`` cannot be split evenly over ``world`` GPUs the plan is
    inexact: micro = min(max, global // world) (at least 1), accumulation rounds
    ``global / (micro x world)`` half up (at least 1), and the note gives the nearest effective
    global batch and the learning-rate adjustment. Raises ``ValueError`` for values < 1.
    """
    for name, value in (("max_micro_batch", max_micro_batch), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if global_batch_size is None:
        return BatchPlan(
            micro_batch_size=max_micro_batch,
            gradient_accumulation_steps=1,
            world_size=world_size,
            global_batch_size=max_micro_batch * world_size,
            requested_global_batch_size=None,
            exact=True,
            note="",
        )
    if (isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int)
            or global_batch_size < 1):
        raise ValueError(f"global_batch_size must be an integer >= 1 or None, got {global_batch_size!r}")
    if global_batch_size % world_size == 0:
        per_gpu = global_batch_size // world_size
        micro = _largest_divisor_at_most(per_gpu, max_micro_batch)
        return BatchPlan(
            micro_batch_size=micro,
            gradient_accumulation_steps=per_gpu // micro,
            world_size=world_size,
            global_batch_size=global_batch_size,
            requested_global_batch_size=global_batch_size,
            exact=True,
            note="",
        )
    micro = min(max_micro_batch, max(1, global_batch_size // world_size))
    step = micro * world_size
    accumulation = max(1, (2 * global_batch_size + step) // (2 * step))
    effective = micro * accumulation * world_size
    if world_size > global_batch_size:
        reason = (f"the world size {world_size} is larger than the requested global batch "
                  f"{global_batch_size}")
    else:
        reason = (f"the requested global batch {global_batch_size} is not divisible by the "
                  f"world size {world_size}")
    note = (
        f"{reason}: the nearest effective global batch is {effective} (micro-batch {micro} x "
        f"{accumulation} accumulation x {_gpus(world_size)}), which differs from the requested "
        f"{global_batch_size}. Learning rate: scale it by {effective}/{global_batch_size} = "
        f"{effective / global_batch_size:.4g} (linear scaling rule, Goyal et al. 2017), or keep "
        f"the global batch {global_batch_size} by changing the world size."
    )
    return BatchPlan(
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        world_size=world_size,
        global_batch_size=effective,
        requested_global_batch_size=global_batch_size,
        exact=False,
        note=note,
    )


def summarize_plan(plan: BatchPlan) -> list[str]:
    """Human lines for the terminal: the split, then whether it matches the requested batch."""
    lines = [
        f"micro-batch {plan.micro_batch_size} x {plan.gradient_accumulation_steps} accumulation "
        f"x {_gpus(plan.world_size)} = global {plan.global_batch_size}"
    ]
    if plan.requested_global_batch_size is None:
        lines.append("no output.global_batch_size set: the global batch follows the tuned "
                     "micro-batch and the world size")
    elif plan.exact:
        lines.append(f"matches the requested global batch {plan.requested_global_batch_size}")
    if plan.note:
        lines.append(plan.note)
    return lines


# --------------------------------------------------------------------------- results


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` written by ``autofit tune``; one-line ``AutofitError`` if unusable."""
    path = Path(path)
    if not path.exists():
        raise AutofitError(f"{path}: file not found (write it with `autofit tune`)")
    if path.is_dir():
        raise AutofitError(f"{path}: is a directory, expected a results.json file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AutofitError(f"{path}: cannot read: {exc}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AutofitError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(results, dict):
        raise AutofitError(f"{path}: expected a JSON object, got {type(results).__name__}")
    for key_path in _REQUIRED_KEYS:
        node: Any = results
        for depth, key in enumerate(key_path):
            if not isinstance(node, dict):
                parent = ".".join(key_path[:depth])
                raise AutofitError(f"{path}: {parent!r} must be an object, got {node!r}")
            if key not in node:
                raise AutofitError(f"{path}: missing key {'.'.join(key_path)!r}")
            node = node[key]
    batch = results["best"]["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise AutofitError(f"{path}: best.batch_size must be an integer >= 1, got {batch!r}")
    precision = results["best"]["precision"]
    if precision not in PRECISIONS:
        raise AutofitError(
            f"{path}: best.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    targets = results.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise AutofitError(f"{path}: 'targets' must be a list of objects")
    return results


@dataclass(frozen=True)
class TunedValues:
    """The knobs a training run needs from one tuned configuration."""

    batch_size: int
    precision: str
    checkpoint_segments: int
    input_size: int
    verified: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunedValues:
        """From ``results["best"]`` or one ``results["targets"]`` entry."""
        return cls(
            batch_size=int(data["batch_size"]),
            precision=str(data.get("precision", "fp32")),
            checkpoint_segments=int(data.get("checkpoint_segments", 0) or 0),
            input_size=int(data.get("input_size", 0) or 0),
            verified=bool(data.get("verified", False)),
        )


@dataclass(frozen=True)
class Provenance:
    """Where a generated file came from, enough to recognise a stale one."""

    autofit_version: str
    spec_hash: str
    spec_path: str | None
    gpu_name: str
    gpu_total_bytes: int | None
    torch_version: str
    cuda_version: str | None
    margin: float
    limit_bytes: int | None

    @classmethod
    def from_results(cls, results: dict[str, Any]) -> Provenance:
        """Read provenance fields from a results dict."""
        device = results.get("device", {}) or {}
        total = device.get("total_bytes")
        limit = results.get("limit_bytes")
        return cls(
            autofit_version=str(results.get("autofit_version", "unknown")),
            spec_hash=str(results.get("spec_hash", "unknown")),
            spec_path=results.get("spec_path"),
            gpu_name=str(device.get("name", "unknown")),
            gpu_total_bytes=int(total) if total is not None else None,
            torch_version=str(device.get("torch", "unknown")),
            cuda_version=device.get("cuda"),
            margin=float(results.get("margin", 0.0)),
            limit_bytes=int(limit) if limit is not None else None,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready provenance (the ``"_autofit"`` object)."""
        return {
            "autofit_version": self.autofit_version,
            "spec_hash": self.spec_hash,
            "spec_path": self.spec_path,
            "gpu": self.gpu_name,
            "gpu_total_bytes": self.gpu_total_bytes,
            "torch": self.torch_version,
            "cuda": self.cuda_version,
            "margin": self.margin,
            "limit_bytes": self.limit_bytes,
        }

    def lines(self) -> list[str]:
        """Provenance as plain text lines (without comment markers)."""
        gpu = self.gpu_name
        if self.gpu_total_bytes is not None:
            gpu += f", {format_bytes(self.gpu_total_bytes)}"
        limit = f", limit {format_bytes(self.limit_bytes)}" if self.limit_bytes is not None else ""
        return [
            f"autofit {self.autofit_version}; spec hash {self.spec_hash}"
            + (f" ({self.spec_path})" if self.spec_path else ""),
            f"GPU: {gpu}",
            f"torch {self.torch_version}, CUDA {self.cuda_version or 'none'}",
            f"margin: {self.margin:g} ({self.margin:.0%} of the budget kept free{limit})",
        ]


def _tuned_lines(tuned: TunedValues, plan: BatchPlan) -> list[str]:
    status = "verified by real steps" if tuned.verified else "predicted only, not verified"
    size = f", input size {tuned.input_size}" if tuned.input_size else ""
    return [
        f"tuned: max micro-batch {tuned.batch_size}, {tuned.precision}, checkpoint segments "
        f"{tuned.checkpoint_segments}{size} ({status})",
        *summarize_plan(plan),
    ]


def _comment(lines: Sequence[str]) -> str:
    out = []
    for line in lines:
        for part in str(line).splitlines() or [""]:
            out.append(f"# {part}".rstrip())
    return "\n".join(out) + "\n"


def _header(results: dict[str, Any], plan: BatchPlan, what: str, fmt: str) -> str:
    tuned = TunedValues.from_dict(results["best"])
    return _comment([
        f"{what}, generated by `autofit export results.json --format {fmt}`. Do not edit:",
        "regenerate it instead (no re-tuning needed).",
        *Provenance.from_results(results).lines(),
        *_tuned_lines(tuned, plan),
    ])


def _spec_name(results: dict[str, Any]) -> str:
    spec = results.get("spec")
    name = spec.get("name") if isinstance(spec, dict) else None
    return name if isinstance(name, str) and name.strip() else "autofit"


def slugify(name: str, fallback: str = "autofit") -> str:
    """A file- and job-name-safe form: lowercase letters, digits, '.', '_' and '-'."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-.")
    return slug or fallback


def _plan_dict(plan: BatchPlan) -> dict[str, Any]:
    return {
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "world_size": plan.world_size,
        "global_batch_size": plan.global_batch_size,
        "requested_global_batch_size": plan.requested_global_batch_size,
        "exact": plan.exact,
        "note": plan.note,
    }


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
        "plan": _plan_dict(plan),
    }


# --------------------------------------------------------------------------- shell scripts


def _check_world(spec_output: OutputSpec, plan: BatchPlan) -> None:
    world = spec_output.nodes * spec_output.gpus_per_node
    if plan.world_size != world:
        raise ValueError(
            f"plan is for {plan.world_size} GPUs but the output spec has {spec_output.nodes} "
            f"node(s) x {spec_output.gpus_per_node} GPU(s) = {world}")


def _train_command(spec_output: OutputSpec) -> str:
    command = spec_output.train_command.strip()
    if "\n" in command or "\r" in command:
        raise AutofitError(f"output.train_command: must be one line, got {command!r}")
    try:
        shlex.split(command)
    except ValueError as exc:
        raise AutofitError(f"output.train_command: {exc} in {command!r}") from None
    return command


def _env_block(results: dict[str, Any], plan: BatchPlan) -> str:
    tuned = TunedValues.from_dict(results["best"])
    values = {
        "AUTOFIT_MICRO_BATCH_SIZE": plan.micro_batch_size,
        "AUTOFIT_GRAD_ACCUM_STEPS": plan.gradient_accumulation_steps,
        "AUTOFIT_GLOBAL_BATCH_SIZE": plan.global_batch_size,
        "AUTOFIT_PRECISION": tuned.precision,
        "AUTOFIT_CHECKPOINT_SEGMENTS": tuned.checkpoint_segments,
        "AUTOFIT_INPUT_SIZE": tuned.input_size,
        "AUTOFIT_SPEC_HASH": Provenance.from_results(results).spec_hash,
    }
    lines = ["# Tuned values for the training script (read them from the environment)."]
    lines += [f"export {key}={shlex.quote(str(value))}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _directive_value(value: Any) -> str:
    text = " ".join(str(value).split())
    return shlex.quote(text)


def _slurm_time(value: Any) -> tuple[str, list[str]]:
    if isinstance(value, int) and not isinstance(value, bool):
        days, rest = divmod(value, 24 * 60)
        hours, minutes = divmod(rest, 60)
        return str(value), [
            f"--time={value} is read by Slurm as minutes ({days}-{hours:02d}:{minutes:02d}:00).",
            "YAML reads an unquoted 04:00:00 as a number of seconds: quote times in the spec.",
        ]
    return _directive_value(value), []


def _torchrun_args(nnodes: str, nproc: int, endpoint: str, rdzv_id: str) -> list[str]:
    return [
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rdzv_id}",
    ]


def _continued(command: str, args: Sequence[str], train_command: str) -> str:
    parts = [command, *(f"    {arg}" for arg in args), f"    {train_command}"]
    return " \\\n".join(parts) + "\n"


def render_slurm(results: dict[str, Any], spec_output: OutputSpec, plan: BatchPlan) -> str:
    """An sbatch script: one task per node, each running ``torchrun`` with c10d rendezvous."""
    _check_world(spec_output, plan)
    slurm = spec_output.slurm
    job_name = slugify(str(slurm.get("job_name") or _spec_name(results)))
    directives = [
        f"--job-name={job_name}",
        f"--nodes={spec_output.nodes}",
        "--ntasks-per-node=1",
        f"--gres=gpu:{spec_output.gpus_per_node}",
    ]
    notes: list[str] = []
    if slurm.get("cpus_per_task") is not None:
        directives.append(f"--cpus-per-task={_directive_value(slurm['cpus_per_task'])}")
    if slurm.get("mem") is not None:
        directives.append(f"--mem={_directive_value(slurm['mem'])}")
    if slurm.get("time") is not None:
        time_text, notes = _slurm_time(slurm["time"])
        directives.append(f"--time={time_text}")
    if slurm.get("partition") is not None:
        directives.append(f"--partition={_directive_value(slurm['partition'])}")
    if slurm.get("account") is not None:
        directives.append(f"--account={_directive_value(slurm['account'])}")
    srun_env = ""
    if slurm.get("cpus_per_task") is not None:
        srun_env = (
            "# Slurm 22.05+ srun does not inherit --cpus-per-task from sbatch.\n"
            f"export SRUN_CPUS_PER_TASK={shlex.quote(str(slurm['cpus_per_task']))}\n"
        )
    run = _continued(
        "srun torchrun",
        _torchrun_args('"$SLURM_NNODES"', spec_output.gpus_per_node,
                       f'"$MASTER_ADDR:{RDZV_PORT}"', '"$SLURM_JOB_ID"'),
        _train_command(spec_output),
    )
    return (
        "#!/bin/bash\n"
        + "".join(f"#SBATCH {d}\n" for d in directives)
        + _header(results, plan, "Slurm batch script", "slurm")
        + (_comment(notes) if notes else "")
        + "set -euo pipefail\n\n"
        + _env_block(results, plan)
        + "\n"
        + "MASTER_ADDR=\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | awk 'NR == 1')\"\n"
        + "export MASTER_ADDR\n"
        + f"export MASTER_PORT={RDZV_PORT}\n"
        + srun_env
        + "\n"
        + run
    )


def render_lsf(results: dict[str, Any], spec_output: OutputSpec, plan: BatchPlan) -> str:
    """A bsub script: one slot per GPU; multi-node jobs start one ``torchrun`` per host via blaunch."""
    _check_world(spec_output, plan)
    lsf = spec_output.lsf
    job_name = slugify(str(lsf.get("job_name") or _spec_name(results)))
    gpus = spec_output.gpus_per_node
    directives = [f"-J {job_name}"]
    if lsf.get("queue") is not None:
        directives.append(f"-q {_directive_value(lsf['queue'])}")
    if lsf.get("walltime") is not None:
        directives.append(f"-W {_directive_value(lsf['walltime'])}")
    if lsf.get("project") is not None:
        directives.append(f"-P {_directive_value(lsf['project'])}")
    directives += [
        f"-n {plan.world_size}",
        f'-gpu "num={gpus}:mode=exclusive_process"',
        f'-R "span[ptile={gpus}]"',
        f"-o {job_name}.%J.out",
        f"-e {job_name}.%J.err",
    ]
    train = _train_command(spec_output)
    if spec_output.nodes == 1:
        launch = _continued("torchrun", ["--standalone", f"--nproc_per_node={gpus}"], train)
    else:
        launch = (
            "# LSB_HOSTS names each host once per slot; keep the first occurrence of each.\n"
            "mapfile -t HOSTS < <(tr ' ' '\\n' <<< \"$LSB_HOSTS\" | awk 'NF && !seen[$0]++')\n"
            'MASTER_ADDR="${HOSTS[0]}"\n'
            "export MASTER_ADDR\n"
            f"export MASTER_PORT={RDZV_PORT}\n\n"
            + _continued(
                'blaunch -z "${HOSTS[*]}" torchrun',
                _torchrun_args('"${#HOSTS[@]}"', gpus, f'"$MASTER_ADDR:{RDZV_PORT}"',
                               '"$LSB_JOBID"'),
                train,
            )
        )
    return (
        "#!/bin/bash\n"
        + "".join(f"#BSUB {d}\n" for d in directives)
        + _header(results, plan, "LSF job script", "lsf")
        + "set -euo pipefail\n\n"
        + _env_block(results, plan)
        + "\n"
        + launch
    )


def render_torchrun(results: dict[str, Any], spec_output: OutputSpec, plan: BatchPlan) -> str:
    """A plain bash script: ``torchrun --standalone`` on one node, c10d rendezvous on several."""
    _check_world(spec_output, plan)
    gpus = spec_output.gpus_per_node
    train = _train_command(spec_output)
    usage = [
        "Usage: single node:  bash torchrun.sh",
        f"       multi-node:   NNODES={max(spec_output.nodes, 2)} MASTER_ADDR=<first node> "
        "bash torchrun.sh   (on every node)",
    ]
    return (
        "#!/bin/bash\n"
        + _header(results, plan, "torchrun launcher", "torchrun")
        + _comment(usage)
        + "set -euo pipefail\n\n"
        + _env_block(results, plan)
        + "\n"
        + f'NNODES="${{NNODES:-{spec_output.nodes}}}"\n'
        + 'MASTER_ADDR="${MASTER_ADDR:-localhost}"\n'
        + f'MASTER_PORT="${{MASTER_PORT:-{RDZV_PORT}}}"\n'
        + 'RDZV_ID="${RDZV_ID:-autofit}"\n\n'
        + 'if [ "$NNODES" -eq 1 ]; then\n'
        + _indent(_continued("torchrun", ["--standalone", f"--nproc_per_node={gpus}"], train))
        + "else\n"
        + _indent(_continued(
            "torchrun",
            _torchrun_args('"$NNODES"', gpus, '"$MASTER_ADDR:$MASTER_PORT"', '"$RDZV_ID"'),
            train,
        ))
        + "fi\n"
    )


def _indent(text: str) -> str:
    return "".join(f"    {line}" if line.strip() else line for line in text.splitlines(True))


# --------------------------------------------------------------------------- framework configs


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def render_lightning(results: dict[str, Any], plan: BatchPlan) -> str:
    """A Lightning CLI config overlay (``--config lightning.yaml``): trainer and data batch size."""
    tuned = TunedValues.from_dict(results["best"])
    notes = ["Lightning has no Trainer flag for activation checkpointing: enable it in the"
             f" LightningModule ({tuned.checkpoint_segments} segments were tuned)."
             if tuned.checkpoint_segments else "Tuned without activation checkpointing."]
    body = {
        "trainer": {
            "precision": LIGHTNING_PRECISION.get(tuned.precision, "32-true"),
            "accumulate_grad_batches": plan.gradient_accumulation_steps,
        },
        "data": {"batch_size": plan.micro_batch_size},
    }
    return _header(results, plan, "Lightning CLI config overlay", "lightning") + _comment(notes) + _yaml(body)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


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
    return _json({
        "_autofit": provenance,
        "per_device_train_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "bf16": tuned.precision == "bf16",
        "fp16": tuned.precision == "fp16",
        "gradient_checkpointing": tuned.checkpoint_segments > 0,
    })


def render_deepspeed(results: dict[str, Any], plan: BatchPlan) -> str:
    """A DeepSpeed config: micro-batch, accumulation, global batch and mixed precision."""
    tuned = TunedValues.from_dict(results["best"])
    return _json({
        "_autofit": _json_provenance(results, plan, "deepspeed"),
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "fp16": {"enabled": tuned.precision == "fp16"},
        "bf16": {"enabled": tuned.precision == "bf16"},
    })


# --------------------------------------------------------------------------- targets


def _target_slugs(targets: Sequence[dict[str, Any]]) -> list[str]:
    slugs: list[str] = []
    for index, target in enumerate(targets):
        base = slugify(str(target.get("name", "")), fallback=f"target{index}")
        slug, n = base, 2
        while slug in slugs:
            slug, n = f"{base}-{n}", n + 1
        slugs.append(slug)
    return slugs


def render_targets(results: dict[str, Any], output: OutputSpec | None = None) -> str:
    """``targets.yaml``: one tuned configuration per target GPU, verified or predicted-only.

    With ``output`` each entry also gets its micro-batch / accumulation plan for that output.
    """
    targets = results.get("targets", []) or []
    entries = []
    for target, slug in zip(targets, _target_slugs(targets), strict=True):
        memory = target.get("memory_bytes")
        predicted = target.get("predicted_peak_bytes")
        batch = int(target.get("batch_size", 0) or 0)
        entry: dict[str, Any] = {
            "name": str(target.get("name", slug)),
            "config": f"configs/{slug}.yaml" if batch >= 1 else None,
            "memory": format_bytes(memory) if memory is not None else None,
            "memory_bytes": memory,
            "bf16": target.get("bf16"),
            "batch_size": batch,
            "precision": target.get("precision"),
            "checkpoint_segments": target.get("checkpoint_segments", 0),
            "input_size": target.get("input_size", 0),
            "predicted_peak": format_bytes(predicted) if predicted is not None else None,
            "predicted_peak_bytes": predicted,
            "status": "verified" if target.get("verified") else "predicted-only",
            "note": str(target.get("note", "")),
        }
        if output is not None and batch >= 1:
            plan = plan_batch(batch, output.nodes * output.gpus_per_node, output.global_batch_size)
            entry["plan"] = _plan_dict(plan)
        entries.append(entry)
    header = _comment([
        "Target GPU configs, generated by `autofit export results.json --format targets`.",
        *Provenance.from_results(results).lines(),
        f"Caveat: {TARGET_CAVEAT}.",
        "verified: a real run with the memory capped to the target size fitted;",
        "predicted-only: from the memory model, never run. Re-tune on the real GPU when you can.",
    ])
    return header + _yaml({"targets": entries})


def tuned_spec(raw: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the raw spec with the search pinned to one tuned configuration.

    ``search.batch_size`` becomes ``{min: b, max: b}``; precision and checkpoint segments
    become one-element lists. The input size is pinned (``search.input_size: [s]``) when the
    spec searched it or the data is images/tokens; ``data.size`` (when an int) or
    ``data.seq_len`` follows it. Every other key is kept as written.
    """
    spec = copy.deepcopy(raw)
    tuned = TunedValues.from_dict(best)
    search = spec.get("search")
    if not isinstance(search, dict):
        search = {}
    search["batch_size"] = {"min": tuned.batch_size, "max": tuned.batch_size}
    search["precision"] = [tuned.precision]
    search["checkpoint_segments"] = [tuned.checkpoint_segments]
    data = spec.get("data")
    kind = (data.get("kind", "image") if isinstance(data, dict) else None)
    if tuned.input_size >= 1 and ("input_size" in search or kind in ("image", "tokens")):
        search["input_size"] = [tuned.input_size]
        if isinstance(data, dict) and kind == "image" and isinstance(data.get("size"), int):
            data["size"] = tuned.input_size
        elif isinstance(data, dict) and kind == "tokens":
            data["seq_len"] = tuned.input_size
    spec["search"] = search
    return spec


def render_target_config(results: dict[str, Any], target: dict[str, Any]) -> str:
    """``configs/<slug>.yaml``: the spec pinned to one target's tuned values, with a header."""
    raw = results.get("spec") if isinstance(results.get("spec"), dict) else {}
    memory = target.get("memory_bytes")
    status = "verified" if target.get("verified") else "predicted-only"
    header = _comment([
        f"Experiment spec tuned for target {target.get('name')}"
        + (f" ({format_bytes(memory)})" if memory is not None else "") + f": {status}.",
        "Generated by `autofit export results.json --format targets`.",
        *Provenance.from_results(results).lines(),
        f"Caveat: {TARGET_CAVEAT}.",
    ])
    spec = tuned_spec(raw, target)
    # the config is for the target GPU: its device and its memory, not the tuning host's
    spec["device"] = "cuda"
    memory_spec = dict(spec.get("memory") or {})
    if memory is not None:
        memory_spec["budget"] = int(memory)
    spec["memory"] = memory_spec
    return header + _yaml(spec)


# --------------------------------------------------------------------------- writing


def _atomic_write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def output_spec_of(results: dict[str, Any]) -> OutputSpec:
    """The ``output`` section of the spec stored in the results; defaults if it does not validate."""
    try:
        return spec_from_dict(results.get("spec"), source="results.json:spec").output
    except SpecError:
        return OutputSpec()


def _check_formats(formats: Sequence[str]) -> list[str]:
    if isinstance(formats, str):
        formats = [formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise AutofitError(
            f"unknown export format {unknown[0]!r}; valid formats: {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def write_exports(results: dict[str, Any], out_dir: Path, formats: Sequence[str] | None = None,
                  output: OutputSpec | None = None) -> list[Path]:
    """Write the requested formats into ``out_dir``; returns the written paths in order.

    ``formats=None`` writes every format, except scripts missing from ``output.scripts``.
    ``output`` defaults to the spec's output section stored in ``results``. Files are written
    atomically (temp file in the same directory, then ``os.replace``); scripts are 0o755.
    """
    output = output if output is not None else output_spec_of(results)
    if formats is None:
        chosen = [f for f in FORMATS if f not in SCRIPTS or f in output.scripts]
    else:
        chosen = _check_formats(formats)
    out_dir = Path(out_dir)
    world = output.nodes * output.gpus_per_node
    plan = plan_batch(int(results["best"]["batch_size"]), world, output.global_batch_size)
    renderers: dict[str, Callable[[], str]] = {
        "slurm": lambda: render_slurm(results, output, plan),
        "lsf": lambda: render_lsf(results, output, plan),
        "torchrun": lambda: render_torchrun(results, output, plan),
        "lightning": lambda: render_lightning(results, plan),
        "hf": lambda: render_hf(results, plan),
        "deepspeed": lambda: render_deepspeed(results, plan),
        "targets": lambda: render_targets(results, output),
    }
    rendered: list[tuple[Path, str, int]] = []
    for fmt in chosen:
        name = FILE_NAMES[fmt]
        mode = 0o755 if name.endswith(".sh") else 0o644
        rendered.append((out_dir / name, renderers[fmt](), mode))
        if fmt == "targets":
            targets = results.get("targets", []) or []
            for target, slug in zip(targets, _target_slugs(targets), strict=True):
                if int(target.get("batch_size", 0) or 0) >= 1:
                    rendered.append((out_dir / "configs" / f"{slug}.yaml",
                                     render_target_config(results, target), 0o644))
    written = []
    for path, text, mode in rendered:
        _atomic_write(path, text, mode)
        written.append(path)
    return written
