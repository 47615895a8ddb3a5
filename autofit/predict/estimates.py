"""What a trace predicts for one candidate, without torch: ``MemoryEstimate`` (the traced
breakdown plus the device model's view of it) and ``LayerRow`` (per-module attribution).

``autofit.predict.trace`` makes them and re-exports them; the trace cache reads them back
without importing torch (``autofit.predict.cache``).
"""

from __future__ import annotations

import base64
import sys
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Any

from autofit.breakdown import MemoryBreakdown
from autofit.candidate import Candidate


@dataclass
class LayerRow:
    name: str
    kind: str
    params_bytes: int
    saved_bytes: int
    cumulative_bytes: int


@dataclass
class MemoryEstimate:
    """Predicted memory of one candidate on one device kind."""

    candidate: Candidate
    breakdown: MemoryBreakdown
    """Traced live bytes at the peak (block-rounded for CUDA)."""
    device_kind: str
    allocated_bytes: int
    """Predicted peak as the device counts it (CUDA: max_memory_allocated)."""
    reserved_bytes: int
    """Predicted reserved peak (CUDA allocator); equals allocated on CPU."""
    trace_time_s: float
    param_count: int
    layers: list[LayerRow] = field(default_factory=list)
    uses_blas: bool = False
    segment_peaks: dict[str, int] = field(default_factory=dict)
    """Traced peak of each stretch of the step, ``"<step>:<phase>"`` -> bytes (block-rounded,
    before the device model). Each is convex in batch size on its own, and far more often
    affine over the whole range than their maximum (see ``batch_curve``)."""
    stretch_lives: dict[str, list[int]] = field(default_factory=dict, repr=False)
    """Live bytes after each allocation of each stretch (same keys as ``segment_peaks``, whose
    values are their maxima): paired event by event with another batch's trace, the exact
    peak at any batch where tensor sizes are affine in it (``batch_curve``). Empty when not
    kept (per-rank traces, older cache entries)."""
    stretch_ops: dict[str, str] = field(default_factory=dict, repr=False)
    """Per stretch, a digest of the ops that made its allocations, in order: two traces pair
    up event by event only where these agree."""
    cached: bool = False
    """Read from the trace cache (``trace_time_s`` is then the original trace's)."""
    derived: bool = False
    """Not traced: read off per-stretch lines that traces proved affine (``batch_curve``)."""
    misreporting: list[str] = field(default_factory=list)
    """Ops of this step whose fake kernels are known to misreport (``predict.calibrate``)."""

    @property
    def peak_bytes(self) -> int:
        """The number planned against the budget."""
        return self.reserved_bytes

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        data = {
            "candidate": self.candidate.to_dict(),
            "peak_bytes": self.peak_bytes,
            "allocated_bytes": self.allocated_bytes,
            "reserved_bytes": self.reserved_bytes,
            "breakdown": self.breakdown.to_dict(),
            "device_kind": self.device_kind,
            "trace_time_s": round(self.trace_time_s, 4),
            "param_count": self.param_count,
        }
        if full:  # what the trace cache stores
            data.update(uses_blas=self.uses_blas, segment_peaks=self.segment_peaks,
                        trace_time_s=self.trace_time_s, misreporting=self.misreporting,
                        stretch_lives={k: _pack(v) for k, v in self.stretch_lives.items()},
                        stretch_ops=self.stretch_ops)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryEstimate:
        return cls(
            candidate=Candidate.from_dict(data["candidate"]),
            breakdown=MemoryBreakdown.from_dict(data["breakdown"]),
            device_kind=data["device_kind"], allocated_bytes=int(data["allocated_bytes"]),
            reserved_bytes=int(data["reserved_bytes"]),
            trace_time_s=float(data["trace_time_s"]), param_count=int(data["param_count"]),
            uses_blas=bool(data.get("uses_blas", False)),
            segment_peaks={k: int(v) for k, v in (data.get("segment_peaks") or {}).items()},
            stretch_lives={k: _unpack(v) for k, v in (data.get("stretch_lives") or {}).items()},
            stretch_ops={k: str(v) for k, v in (data.get("stretch_ops") or {}).items()},
            misreporting=list(data.get("misreporting") or []),
        )


def _pack(values: list[int]) -> str:
    """A list of byte counts as base64 of zlib'd little-endian int64 (a trace has thousands)."""
    raw = array("q", values)
    if sys.byteorder != "little":
        raw.byteswap()
    return base64.b64encode(zlib.compress(raw.tobytes(), 6)).decode("ascii")


def _unpack(text: str) -> list[int]:
    raw = array("q")
    raw.frombytes(zlib.decompress(base64.b64decode(text)))
    if sys.byteorder != "little":
        raw.byteswap()
    return raw.tolist()


__all__ = ["LayerRow", "MemoryEstimate"]
