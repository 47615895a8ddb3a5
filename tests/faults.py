"""Fault-injection models and callables for trial / step tests.

Importable as ``faults.X`` from a spec: pytest puts ``tests/`` on ``sys.path`` (rootdir-relative
"prepend" import mode, no ``__init__.py``) and the trial process inherits the parent's
``sys.path``. Every model is tiny (Linear 16 -> 4 on ``data: {kind: tensor, shape: [16]}``) so
a healthy trial takes well under a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

import torch
from torch import nn

IN_FEATURES = 16
OUT_FEATURES = 4
HUGE_BYTES = 256 * 2**20
"""Larger than any limit the tests use (they stay at or below 64 MiB)."""


def huge_allocation() -> torch.Tensor:
    """A real allocation through torch dispatch (the CPU budget tracker sees it)."""
    return torch.empty(HUGE_BYTES // 4, dtype=torch.float32)


class Tiny(nn.Module):
    """A model that is fine: Linear 16 -> 4."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN_FEATURES, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # (B, 4)


class OomForward(Tiny):
    """Forward allocates a tensor bigger than any test budget."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = huge_allocation()
        return self.lin(x) + big[:1].zero_()  # keep ``big`` used


class _HugeBackward(torch.autograd.Function):
    """Identity forward; backward allocates a huge tensor first."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        big = huge_allocation()
        return grad + big[:1].zero_()


class OomBackward(Tiny):
    """Forward is cheap; backward allocates a tensor bigger than any test budget."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HugeBackward.apply(self.lin(x))


class OomOptimizer(torch.optim.SGD):
    """SGD whose step allocates a tensor bigger than any test budget."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        big = huge_allocation()
        big[:1].zero_()
        return super().step(closure)


class ShapeError(Tiny):
    """Forward multiplies (B, 16) by (3, 5): a RuntimeError that is not an OOM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.ones(3, 5)


class Hang(Tiny):
    """Forward never returns (within any test's patience)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(3600)
        return self.lin(x)


class SelfKill(Tiny):
    """Forward SIGKILLs its own process, as the OS OOM killer would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGKILL)
        return self.lin(x)


class Segfault(Tiny):
    """Forward dereferences NULL: SIGSEGV."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctypes.string_at(0)
        return self.lin(x)


class NanLoss(Tiny):
    """Outputs are all NaN, so the loss is NaN (memory is still measurable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * float("nan")


class RaisesInInit(nn.Module):
    """The constructor fails, as a user model with a bad argument would."""

    def __init__(self, width: int = -1) -> None:
        super().__init__()
        raise ValueError("bad width")


class ScalarLoss(Tiny):
    """Returns its own loss (a 0-dim tensor), for ``loss: model``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).pow(2).mean()


def step(model: nn.Module, batch_size: int, input_size: int, device: torch.device) -> torch.Tensor:
    """A user step (``step: faults.step``): builds its own batch and returns the loss."""
    x = torch.randn(batch_size, IN_FEATURES, device=device)
    target = torch.randn(batch_size, OUT_FEATURES, device=device)
    return nn.functional.mse_loss(model(x), target)


class Slow(Tiny):
    """Each forward takes 0.4 s: trials last long enough to be interrupted mid-way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.4)
        return super().forward(x)
