"""The one memory breakdown type, without torch: predictions, measurements and cached answers
all carry it, and a cached answer is read back without importing torch.

``autofit.memory`` (the tracker that fills it) re-exports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from autofit.choices import Category, Phase


@dataclass(kw_only=True)
class MemoryBreakdown:
    """Bytes live at the peak moment, by category. Used for predictions and measurements."""

    params_bytes: int = 0
    """Parameters and buffers."""
    grads_bytes: int = 0
    optimizer_state_bytes: int = 0
    activations_bytes: int = 0
    """Saved for backward (and the input batch)."""
    temporaries_bytes: int = 0
    """Everything else alive at the peak: outputs, workspace tensors, partial results."""
    peak_bytes: int = 0
    """Peak live tensor bytes (== sum of the categories above)."""
    peak_phase: Phase | None = None
    """Where the peak occurred (None: not known)."""
    peak_step: int = 0
    """1-based training step in which the peak occurred."""
    reserved_bytes: int | None = None
    """CUDA: the caching allocator's reserved peak (measured or modelled)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["peak_phase"] = self.peak_phase.value if self.peak_phase else ""
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryBreakdown:
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in names}
        values["peak_phase"] = Phase(values["peak_phase"]) if values.get("peak_phase") else None
        return cls(**values)

    def categories(self) -> dict[str, int]:
        """Bytes per category, keyed by the category's name."""
        return {category.value: getattr(self, f"{category.value}_bytes") for category in Category}


__all__ = ["MemoryBreakdown"]
