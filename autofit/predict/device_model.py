"""What a trace on fake tensors cannot see: the device's allocator and runtime overheads.

The tracker counts live tensor bytes. A CUDA process also holds:

* block rounding: the caching allocator rounds every request up to 512 B (applied per
  storage by the tracker's ``round_to``), which is what ``max_memory_allocated`` counts;
* cuBLAS/cuDNN workspaces, allocated through the caching allocator on first use;
* fragmentation and segment slack: ``max_memory_reserved`` - ``max_memory_allocated``;
  small requests come from 2 MiB segments, large ones from segments rounded to 2 MiB;
* the CUDA context (several hundred MiB), which PyTorch's counters never see but which is
  taken from the card: ``budget: auto`` subtracts it.

These are a handful of constants, refitted by a GPU calibration run (``scripts/gpu_check.sh``
writes them with ``DeviceModel.save``) and loaded per GPU name. On CPU the model is the
identity: the CPU backend's budget counts exactly the tracker's bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MiB = 2**20


@dataclass(frozen=True, kw_only=True)
class DeviceModel:
    kind: str = "cpu"
    """cpu | cuda."""
    block_bytes: int = 1
    """Per-allocation rounding (CUDA caching allocator: 512 B)."""
    segment_bytes: int = 1
    """Reserved memory grows in segments of this size (CUDA: 2 MiB for small pools)."""
    workspace_bytes: int = 0
    """cuBLAS workspace inside the allocator's counters (only when the step runs BLAS ops)."""
    fragmentation: float = 0.0
    """Reserved = allocated * (1 + fragmentation) + slack, rounded up to whole segments."""
    slack_bytes: int = 0
    """Constant part of reserved - allocated (partly used segments)."""
    context_bytes: int = 0
    """CUDA context and non-PyTorch memory, outside PyTorch's counters."""
    calibrated_on: str = ""
    """GPU name of the calibration run, empty for the built-in defaults."""
    notes: dict[str, Any] = field(default_factory=dict)

    def allocated(self, traced_peak_bytes: int, uses_blas: bool = True) -> int:
        """Predicted ``max_memory_allocated`` from the (block-rounded) traced peak."""
        if self.kind == "cpu":
            return traced_peak_bytes
        return traced_peak_bytes + (self.workspace_bytes if uses_blas else 0)

    def reserved(self, traced_peak_bytes: int, uses_blas: bool = True) -> int:
        """Predicted ``max_memory_reserved``: allocated plus fragmentation, in whole segments."""
        if self.kind == "cpu":
            return traced_peak_bytes
        raw = self.allocated(traced_peak_bytes, uses_blas) * (1.0 + self.fragmentation) + self.slack_bytes
        seg = self.segment_bytes
        return int(-(-raw // seg) * seg)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DeviceModel:
        return cls(**json.loads(Path(path).read_text()))


CPU = DeviceModel(kind="cpu")

# Defaults from the allocator's source (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize 512,
# kSmallBuffer 2 MiB) and typical Hopper/Ampere runs; replaced by a calibration file if present.
CUDA_DEFAULT = DeviceModel(
    kind="cuda",
    block_bytes=512,
    segment_bytes=2 * MiB,
    workspace_bytes=64 * MiB,  # seen on an H100 with torch 2.11 (fp32 GPT: alloc - traced)
    fragmentation=0.03,
    slack_bytes=8 * MiB,
    context_bytes=512 * MiB,
)


def calibration_path(gpu_name: str) -> Path:
    root = Path(os.environ.get("AUTOFIT_CACHE", Path.home() / ".cache" / "autofit"))
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in gpu_name)
    return root / f"device_model_{safe}.json"


SHIPPED = Path(__file__).parent / "calibrations"


def device_model_for(kind: str, gpu_name: str = "") -> DeviceModel:
    """The model for a device kind: the user's calibration for this GPU name, else a shipped
    one (``autofit/calibrations/``), else the defaults."""
    if kind != "cuda":
        return CPU
    if gpu_name:
        for path in (calibration_path(gpu_name), SHIPPED / calibration_path(gpu_name).name.replace("device_model_", "")):
            if path.exists():
                try:
                    return DeviceModel.load(path)
                except (OSError, ValueError, TypeError):
                    continue
    return CUDA_DEFAULT
