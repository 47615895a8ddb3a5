"""One point of the search space: what a trial runs and a prediction is made for."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True, order=True)
class Candidate:
    batch_size: int
    """Samples per optimizer step on one device (the micro-batch)."""
    input_size: int
    """Image side in pixels, sequence length in tokens, or 0 where the data has no size axis."""
    precision: str = "fp32"
    """fp32 | fp16 (autocast + GradScaler) | bf16 (autocast)."""
    checkpoint_segments: int = 0
    """0 = no activation checkpointing; K = the blocks split into K checkpointed segments."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(
            batch_size=int(data["batch_size"]),
            input_size=int(data["input_size"]),
            precision=str(data.get("precision", "fp32")),
            checkpoint_segments=int(data.get("checkpoint_segments", 0)),
        )

    def with_batch(self, batch_size: int) -> Candidate:
        return Candidate(batch_size=batch_size, input_size=self.input_size,
                         precision=self.precision, checkpoint_segments=self.checkpoint_segments)

    def label(self) -> str:
        seg = f" ckpt={self.checkpoint_segments}" if self.checkpoint_segments else ""
        size = f" size={self.input_size}" if self.input_size else ""
        return f"batch={self.batch_size}{size} {self.precision}{seg}"
