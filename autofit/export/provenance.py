"""Where a generated file came from, and the tuned values it was made for.

Every exported file carries its provenance (spec hash, device, torch version, memory margin,
autofit version) so a stale one is recognisable: shell and YAML files as the ``#`` header
built by :func:`file_header`, JSON files in a top-level ``"_autofit"`` object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autofit.export.batch_plan import BatchPlan, summarize_plan
from autofit.export.common import comment
from autofit.units import format_bytes


@dataclass(frozen=True)
class TunedValues:
    """The knobs a training run needs from one tuned configuration."""

    batch_size: int
    """The largest micro-batch that ran and fit (samples per GPU)."""
    precision: str
    checkpoint_segments: int
    input_size: int
    """Image side in pixels or sequence length in tokens; 0 where the data has no size axis."""
    verified: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunedValues:
        """From ``results["best"]`` or one ``results["targets"]`` entry."""
        return cls(
            batch_size=int(data["batch_size"]),
            precision=str(data.get("precision", "fp32")),
            checkpoint_segments=int(data.get("checkpoint_segments", 0) or 0),
            input_size=int(data.get("input_size", 0) or 0),
            verified=bool(data.get("verified", False)),
        )


@dataclass(frozen=True)
class Provenance:
    """Where a generated file came from, enough to recognise a stale one."""

    autofit_version: str
    spec_hash: str
    spec_path: str | None
    gpu_name: str
    """The tuning device's name (a CPU's name for a CPU run, see ``device_label``)."""
    gpu_total_bytes: int | None
    torch_version: str
    cuda_version: str | None
    margin: float
    limit_bytes: int | None
    device_kind: str | None = None
    """``device.kind`` of the results: "cuda" | "cpu"; None in files written before it existed."""

    @classmethod
    def from_results(cls, results: dict[str, Any]) -> Provenance:
        """Read provenance fields from a results dict."""
        device = results.get("device", {}) or {}
        total = device.get("total_bytes")
        limit = results.get("limit_bytes")
        kind = device.get("kind")
        return cls(
            autofit_version=str(results.get("autofit_version", "unknown")),
            spec_hash=str(results.get("spec_hash", "unknown")),
            spec_path=results.get("spec_path"),
            gpu_name=str(device.get("name", "unknown")),
            gpu_total_bytes=int(total) if total is not None else None,
            torch_version=str(device.get("torch", "unknown")),
            cuda_version=device.get("cuda"),
            margin=float(results.get("margin", 0.0)),
            limit_bytes=int(limit) if limit is not None else None,
            device_kind=str(kind) if kind is not None else None,
        )

    @property
    def device_label(self) -> str:
        """"CPU" for a CPU run, "GPU" for a CUDA run (or an older file with a CUDA version),
        "Device" for an older file that cannot tell."""
        if self.device_kind == "cpu":
            return "CPU"
        if self.device_kind == "cuda" or self.cuda_version:
            return "GPU"
        return "Device"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready provenance (the ``"_autofit"`` object)."""
        return {
            "autofit_version": self.autofit_version,
            "spec_hash": self.spec_hash,
            "spec_path": self.spec_path,
            "gpu": self.gpu_name,
            "gpu_total_bytes": self.gpu_total_bytes,
            "torch": self.torch_version,
            "cuda": self.cuda_version,
            "margin": self.margin,
            "limit_bytes": self.limit_bytes,
        }

    def lines(self) -> list[str]:
        """Provenance as plain text lines (without comment markers)."""
        device = self.gpu_name
        if self.gpu_total_bytes is not None:
            device += f", {format_bytes(self.gpu_total_bytes)}"
        limit = f", limit {format_bytes(self.limit_bytes)}" if self.limit_bytes is not None else ""
        return [
            f"autofit {self.autofit_version}; spec hash {self.spec_hash}"
            + (f" ({self.spec_path})" if self.spec_path else ""),
            f"{self.device_label}: {device}",
            f"torch {self.torch_version}, CUDA {self.cuda_version or 'none'}",
            f"margin: {self.margin:g} ({self.margin:.0%} of the budget kept free{limit})",
        ]


def tuned_lines(tuned: TunedValues, plan: BatchPlan) -> list[str]:
    """The tuned configuration and its batch plan, as plain text lines."""
    status = "verified by real steps" if tuned.verified else "predicted only, not verified"
    size = f", input size {tuned.input_size}" if tuned.input_size else ""
    return [
        f"tuned: max micro-batch {tuned.batch_size}, {tuned.precision}, checkpoint segments "
        f"{tuned.checkpoint_segments}{size} ({status})",
        *summarize_plan(plan),
    ]


def file_header(results: dict[str, Any], plan: BatchPlan, what: str, fmt: str) -> str:
    """The ``#`` header of a generated shell or YAML file: what it is, provenance, the plan."""
    tuned = TunedValues.from_dict(results["best"])
    return comment([
        f"{what}, generated by `autofit export results.json --format {fmt}`. Do not edit:",
        "regenerate it instead (no re-tuning needed).",
        *Provenance.from_results(results).lines(),
        *tuned_lines(tuned, plan),
    ])
