"""One point of the search space, and one setting of its discrete axes.

A ``Setting`` is (input size, precision, checkpoint segments): what stays fixed while the
batch size is searched. A ``Candidate`` is a setting plus a batch size: what a trial runs and
a prediction is made for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from autofit.choices import Precision


@dataclass(frozen=True, kw_only=True, order=True)
class Candidate:
    batch_size: int
    """Samples per optimizer step on one device (the micro-batch)."""
    input_size: int
    """Image side in pixels, sequence length in tokens, or 0 where the data has no size axis."""
    precision: Precision = Precision.FP32
    """fp32 | fp16 (autocast + GradScaler) | bf16 (autocast)."""
    checkpoint_segments: int = 0
    """0 = no activation checkpointing; K = the blocks split into K checkpointed segments."""
    strategy: str = ""
    """none | ddp | fsdp when ``parallel.strategy`` lists several (an axis of the search);
    "" = the spec's own strategy."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError:
            raise ValueError(f"unknown precision {self.precision!r}; "
                             f"use one of {', '.join(Precision.values())}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "input_size": self.input_size,
                "precision": self.precision.value,
                "checkpoint_segments": self.checkpoint_segments,
                **({"strategy": self.strategy} if self.strategy else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(
            batch_size=int(data["batch_size"]),
            input_size=int(data["input_size"]),
            precision=Precision(data.get("precision", "fp32")),
            checkpoint_segments=int(data.get("checkpoint_segments", 0)),
            strategy=str(data.get("strategy") or ""),
        )

    @property
    def setting(self) -> Setting:
        return Setting(self.input_size, self.precision, self.checkpoint_segments, self.strategy)

    def with_batch(self, batch_size: int) -> Candidate:
        return replace(self, batch_size=batch_size)

    def label(self) -> str:
        seg = f" ckpt={self.checkpoint_segments}" if self.checkpoint_segments else ""
        size = f" size={self.input_size}" if self.input_size else ""
        parallel = f" {self.strategy}" if self.strategy else ""
        return f"batch={self.batch_size}{size} {self.precision}{seg}{parallel}"


class Setting(NamedTuple):
    """The discrete axes of one search line: everything but the batch size."""

    input_size: int
    precision: Precision
    checkpoint_segments: int
    strategy: str = ""
    """Set only when ``parallel.strategy`` lists several (see ``Candidate.strategy``)."""

    @property
    def key(self) -> str:
        """``"256/bf16/2"`` (``"256/bf16/2/fsdp"`` with a strategy): the setting's name in
        results.json (curves, plots)."""
        tail = f"/{self.strategy}" if self.strategy else ""
        return f"{self.input_size}/{Precision(self.precision).value}/{self.checkpoint_segments}{tail}"

    def candidate(self, batch_size: int) -> Candidate:
        return Candidate(batch_size=batch_size, input_size=self.input_size,
                         precision=Precision(self.precision),
                         checkpoint_segments=self.checkpoint_segments, strategy=self.strategy)

    def describe(self) -> str:
        size = f"size {self.input_size}, " if self.input_size else ""
        parallel = f", {self.strategy}" if self.strategy else ""
        return f"{size}{Precision(self.precision).value}, ckpt={self.checkpoint_segments}{parallel}"
