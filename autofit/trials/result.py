"""What one real trial measured: a status that is data, and the measured breakdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autofit.breakdown import MemoryBreakdown
from autofit.candidate import Candidate
from autofit.choices import Choice, LimitKind, Phase


class TrialStatus(Choice):
    """How a trial ended. Only OOM means 'too big'; the rest stop the search."""

    FITS = "fits"
    OOM = "oom"
    ERROR = "error"
    TIMEOUT = "timeout"
    CRASHED = "crashed"


@dataclass
class TrialResult:
    """What one real trial measured."""

    candidate: Candidate
    status: TrialStatus
    message: str = ""
    memory: MemoryBreakdown | None = None
    """Measured breakdown (CUDA: peak_bytes = max_memory_allocated, reserved_bytes set)."""
    step_time_s: float | None = None
    """Median of the timed steps."""
    samples_per_s: float | None = None
    units_per_s: float | None = None
    units_name: str | None = None
    """tokens or pixels (per second in units_per_s)."""
    steps_run: int = 0
    wall_time_s: float = 0.0
    """Whole trial as the tuner saw it: process start, build, steps."""
    overhead_s: float = 0.0
    """Wall time not spent in training steps (process start, imports, model build)."""
    limit_bytes: int | None = None
    limit_kind: LimitKind = LimitKind.NONE
    """The limit the trial ran under, so the one that produced an OOM."""
    phase: Phase | None = None
    """Phase in which an OOM or error happened."""
    device: dict[str, Any] = field(default_factory=dict)
    warning: str = ""
    loss: float | None = None
    step_kind: str = ""
    """The training step the trial ran (``StepKind`` value; "" when the trial never built)."""
    extra: dict[str, Any] = field(default_factory=dict)
    op_log: dict[str, list[int]] = field(default_factory=dict)
    """``"<phase>|aten.op#i"`` -> [new storages, bytes] of the tracked steps (``MemoryTracker
    .op_log``): what ``predict.calibrate`` compares with the trace, op by op."""

    def __post_init__(self) -> None:
        # a runner may hand back plain strings (injected runners, older results)
        self.status = TrialStatus(self.status)
        self.limit_kind = LimitKind(self.limit_kind or "none")
        self.phase = Phase(self.phase) if self.phase else None

    @property
    def fits(self) -> bool:
        return self.status is TrialStatus.FITS

    @property
    def peak_bytes(self) -> int | None:
        """The number compared with the limit: reserved on CUDA, live bytes on CPU."""
        if self.memory is None:
            return None
        if self.memory.reserved_bytes is not None:
            return self.memory.reserved_bytes
        return self.memory.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "status": self.status.value,
            "message": self.message,
            "memory": self.memory.to_dict() if self.memory else None,
            "peak_bytes": self.peak_bytes,
            "step_time_s": self.step_time_s,
            "samples_per_s": self.samples_per_s,
            "units_per_s": self.units_per_s,
            "units_name": self.units_name,
            "steps_run": self.steps_run,
            "wall_time_s": self.wall_time_s,
            "overhead_s": self.overhead_s,
            "limit_bytes": self.limit_bytes,
            "limit_kind": LimitKind(self.limit_kind).value,
            "phase": Phase(self.phase).value if self.phase else "",
            "device": self.device,
            "warning": self.warning,
            "loss": self.loss,
            "step_kind": self.step_kind,
            **({"op_log": self.op_log} if self.op_log else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        memory = data.get("memory")
        return cls(
            candidate=Candidate.from_dict(data["candidate"]),
            status=TrialStatus(data["status"]),
            message=data.get("message", ""),
            memory=MemoryBreakdown.from_dict(memory) if memory else None,
            step_time_s=data.get("step_time_s"),
            samples_per_s=data.get("samples_per_s"),
            units_per_s=data.get("units_per_s"),
            units_name=data.get("units_name"),
            steps_run=int(data.get("steps_run", 0)),
            wall_time_s=float(data.get("wall_time_s", 0.0)),
            overhead_s=float(data.get("overhead_s", 0.0)),
            limit_bytes=data.get("limit_bytes"),
            limit_kind=LimitKind(data.get("limit_kind") or "none"),
            phase=Phase(data["phase"]) if data.get("phase") else None,
            device=data.get("device", {}),
            warning=data.get("warning", ""),
            loss=data.get("loss"),
            step_kind=data.get("step_kind", ""),
            op_log={k: [int(n), int(b)] for k, (n, b) in (data.get("op_log") or {}).items()},
        )
