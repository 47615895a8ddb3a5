"""Models that misbehave on one rank only, for 2-rank trial tests (``rank_faults.X``)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Net(nn.Module):
    """Two Linear 16 -> 16 blocks and a head: fine on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


class HugeOnRank1(Net):
    """Allocates 64 MiB in forward on rank 1 (over any test budget): OOM there only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rank() == 1:
            x = x + torch.zeros(16 * 2**20, dtype=torch.float32)[: x.numel()].view_as(x)
        return super().forward(x)


class DiesOnRank1(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rank() == 1:
            os._exit(3)
        return super().forward(x)


class HangsOnRank1(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rank() == 1:
            time.sleep(3600)
        return super().forward(x)
