"""A full custom training step for ``step: custom_step.clip_ema_accum`` (README: "Your own step").

autofit calls it with what it names: the built model, its optimizer, the batch (``data.batch``,
or ``(x, y)`` from the data section), the fp16 GradScaler (None otherwise), the candidate's
autocast and a ``state`` dict kept across steps. It runs the whole step and returns the loss.
"""

from __future__ import annotations

from typing import Any

import torch


def clip_ema_accum(model: Any, optimizer: Any, batch: Any, scaler: Any, autocast: Any,
                   state: dict[str, Any]) -> Any:
    """Two accumulated micro-batches, gradient clipping and an EMA copy of the weights."""
    x, y = batch
    loss = None
    for part_x, part_y in zip(x.chunk(2), y.chunk(2), strict=True):
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(part_x), part_y) / 2
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if "ema" not in state:
        state["ema"] = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for ema, p in zip(state["ema"], model.parameters(), strict=True):
            ema.lerp_(p, 0.01)
    return loss
