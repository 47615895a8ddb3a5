"""Batch arithmetic: split one optimizer step's global batch over GPUs and accumulation steps.

The tuned batch is the largest micro-batch that fits one GPU, and any smaller batch fits too.
Given ``output.global_batch_size`` and the world size (nodes x GPUs per node),
:func:`plan_batch` picks the largest micro-batch that divides the per-GPU share exactly and
makes up the rest with gradient accumulation. :func:`plan_for_output` is the one place that
turns a tuned batch and an output section into the plan that scripts, framework configs and
``tuned.yaml`` all carry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from autofit.export.common import ExportError
from autofit.spec import OutputSpec


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

    def as_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready fields, in declaration order."""
        return asdict(self)


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


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _inexact_plan(max_micro_batch: int, world_size: int, global_batch_size: int) -> BatchPlan:
    """The nearest plan when ``global_batch_size`` cannot be split evenly over the GPUs."""
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
    return BatchPlan(micro_batch_size=micro, gradient_accumulation_steps=accumulation,
                     world_size=world_size, global_batch_size=effective,
                     requested_global_batch_size=global_batch_size, exact=False, note=note)


def plan_batch(max_micro_batch: int, world_size: int, global_batch_size: int | None) -> BatchPlan:
    """Pick micro-batch and gradient accumulation for a requested global batch.

    The micro-batch is the largest divisor of ``global / world`` that is <= ``max_micro_batch``
    (the tuned batch). When ``global`` cannot be split evenly over ``world`` GPUs the plan is
    inexact: micro = min(max, global // world) (at least 1), accumulation rounds
    ``global / (micro x world)`` half up (at least 1), and the note gives the nearest effective
    global batch and the learning-rate adjustment. Raises ``ExportError`` for values < 1.
    """
    for name, value in (("max_micro_batch", max_micro_batch), ("world_size", world_size)):
        if not _is_count(value):
            raise ExportError(f"{name} must be an integer >= 1, got {value!r}")
    if global_batch_size is None:
        return BatchPlan(micro_batch_size=max_micro_batch, gradient_accumulation_steps=1,
                         world_size=world_size, global_batch_size=max_micro_batch * world_size,
                         requested_global_batch_size=None, exact=True, note="")
    if not _is_count(global_batch_size):
        raise ExportError(
            f"global_batch_size must be an integer >= 1 or None, got {global_batch_size!r}")
    if global_batch_size % world_size:
        return _inexact_plan(max_micro_batch, world_size, global_batch_size)
    per_gpu = global_batch_size // world_size
    micro = _largest_divisor_at_most(per_gpu, max_micro_batch)
    return BatchPlan(micro_batch_size=micro, gradient_accumulation_steps=per_gpu // micro,
                     world_size=world_size, global_batch_size=global_batch_size,
                     requested_global_batch_size=global_batch_size, exact=True, note="")


def plan_for_output(max_micro_batch: int, output: OutputSpec) -> BatchPlan:
    """The plan for an ``output`` section: world = nodes x GPUs per node, its global batch.

    Raises a one-line ``ExportError`` naming the ``output.*`` fields that make the world size
    (or the global batch) impossible.
    """
    bad = [f"output.{name} must be an integer >= 1, got {value!r}"
           for name, value in (("nodes", output.nodes), ("gpus_per_node", output.gpus_per_node))
           if not _is_count(value)]
    requested = output.global_batch_size
    if requested is not None and not _is_count(requested):
        bad.append(f"output.global_batch_size must be an integer >= 1 or unset, got {requested!r}")
    if bad:
        raise ExportError("cannot plan the batch: " + "; ".join(bad))
    return plan_batch(max_micro_batch, output.nodes * output.gpus_per_node, requested)


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
