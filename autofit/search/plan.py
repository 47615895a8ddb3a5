"""What a tune plans before any trial: device, budget, usable limit, settings and strategy."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from autofit.candidate import Setting
from autofit.choices import Objective, Strategy
from autofit.device import check_device, device_info, resolve_device
from autofit.errors import AutofitError
from autofit.predict.device_model import CPU, CUDA_DEFAULT, DeviceModel, device_model_for
from autofit.spec import ExperimentSpec


@dataclass
class Plan:
    """Where a tune runs and how much memory it may use."""

    device: str
    device_info: dict[str, Any]
    device_model: DeviceModel
    budget_bytes: int
    """The device capacity planned for (``memory.budget``, or the device's own for 'auto')."""
    limit_bytes: int
    """budget x (1 - margin): every configuration must peak under it."""
    notes: list[str] = field(default_factory=list)
    """Warnings found while planning (a budget larger than the device)."""


def plan_limits(spec: ExperimentSpec, device: str | None = None, *,
                require_device: bool = True) -> Plan:
    """Resolve device, budget ('auto' = the device's capacity) and the usable limit.

    With ``require_device=False`` (validate, estimate) a CUDA spec on a machine without CUDA
    still gets the CUDA device model; an 'auto' budget is then unknown (0).
    """
    import torch

    check_device(device)
    device = device or resolve_device(spec.device)
    info = device_info(device)
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        if require_device:
            raise AutofitError(f"device: {device!r} requested but CUDA is not available here")
        budget = spec.memory.budget_bytes or 0
        return Plan(device, info, CUDA_DEFAULT, budget, int(budget * (1.0 - spec.memory.margin)))
    model = device_model_for("cuda", info["name"]) if cuda else CPU
    capacity = int(info["total_bytes"]) - (model.context_bytes if cuda else 0)
    budget = spec.memory.budget_bytes if spec.memory.budget_bytes is not None else capacity
    plan = Plan(device, info, model, budget, int(budget * (1.0 - spec.memory.margin)))
    if capacity > 0 and budget > capacity:
        from autofit.units import format_bytes

        plan.notes.append(
            f"memory.budget {format_bytes(budget)} is larger than this {info['kind'].upper()} "
            f"({info['name']}: {format_bytes(capacity)} usable); trials will hit the device's "
            f"own limit before the budget's")
    return plan


def settings_of(spec: ExperimentSpec) -> list[Setting]:
    """Every combination of the discrete axes, in spec order; ``parallel.strategy`` is an
    axis only when it lists several (each setting then runs with its own strategy)."""
    s = spec.search
    strategies = spec.parallel.strategies if len(spec.parallel.strategies) > 1 else ("",)
    return [Setting(*combo) for combo in
            itertools.product(spec.input_sizes, s.precisions, s.checkpoint_segments, strategies)]


def choose_strategy(spec: ExperimentSpec) -> Strategy:
    """The strategy that runs: ``auto`` is ``optuna`` for max_throughput over several
    settings, else ``binary``; ``max_input_size`` walks sizes in order, always ``binary``."""
    s = spec.search
    if s.objective == Objective.MAX_INPUT_SIZE:
        return Strategy.BINARY
    if s.strategy != Strategy.AUTO:
        return Strategy(s.strategy)
    several = len(settings_of(spec)) > 1
    return Strategy.OPTUNA if several and s.objective == Objective.MAX_THROUGHPUT else Strategy.BINARY


def batch_cap_note(spec: ExperimentSpec, batch_size: int, peak_bytes: int | None,
                   limit_bytes: int) -> str | None:
    """The note for a largest batch that ``search.batch_size.max`` set, not memory (None
    when the batch is under the cap): the search never tried past the cap, so the true
    maximum is unknown."""
    highest = spec.search.batch_size.highest
    if batch_size < highest:
        return None
    used = (f" (its peak is {peak_bytes / limit_bytes:.1%} of the limit)"
            if peak_bytes and limit_bytes else "")
    return (f"batch {batch_size} is search.batch_size.max, not a memory limit{used}: raise "
            f"search.batch_size.max to find the true maximum")


def nothing_fits_message(spec: ExperimentSpec, plan: Plan, settings: list[Setting],
                         sharding: str | None = None) -> str:
    """Why nothing fits, with the knobs left to turn (``sharding``: the model
    "needs sharding over >=N ranks", from ``predict.distributed.sharding_note``)."""
    from autofit.units import format_bytes

    s = spec.search
    tips = []
    if max(s.checkpoint_segments) == 0:
        tips.append("activation checkpointing (search.checkpoint_segments: [2, 4])")
    if "bf16" not in s.precisions and "fp16" not in s.precisions:
        tips.append("lower precision (search.precision: [bf16])")
    if spec.data.kind in ("image", "tokens"):
        tips.append(f"a smaller input size (search.input_size below {min(spec.input_sizes)})")
    if sharding:
        tips.append(f"sharding (parallel.strategy: fsdp; {sharding})")
    tips.append("a larger memory.budget or a smaller memory.margin")
    return (f"nothing fits: batch {s.batch_size.min} does not fit under "
            f"{format_bytes(plan.limit_bytes)} (budget x (1 - margin)) at any of "
            f"{len(settings)} setting(s); try " + "; ".join(tips))
