"""The named choices of autofit: precision, phase, memory category, limit kind, trial purpose.

Each is a ``str`` enum, so a value compares equal to its spelling in YAML and JSON
(``Precision.BF16 == "bf16"``), prints as that spelling and serialises as a plain string,
while the code never passes a bare string around where one of these is meant.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """Base of autofit's enums: ``str(x)`` and ``f"{x}"`` give the value, not the member name."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return format(str(self.value), format_spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Precision(Choice):
    """Training precision: fp16 = autocast + GradScaler, bf16 = autocast."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Phase(Choice):
    """Where in the training step an allocation (or the peak, or a failure) happened."""

    SETUP = "setup"
    DATA = "data"
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    ZERO_GRAD = "zero_grad"


class Category(Choice):
    """What a storage turned out to be (the fields of ``MemoryBreakdown``)."""

    PARAMS = "params"
    GRADS = "grads"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"


class LimitKind(Choice):
    """Which memory limit a trial ran under (and so which one produced its OOM)."""

    CPU_BUDGET = "cpu-budget"
    """The tracker's live-byte budget over real CPU execution (deterministic)."""
    RLIMIT = "rlimit"
    """RLIMIT_AS: the real CPU allocator fails."""
    CUDA_FRACTION = "cuda-fraction"
    """``set_per_process_memory_fraction`` caps the caching allocator below the card."""
    CUDA_DEVICE = "cuda-device"
    """The whole card."""
    NONE = "none"


class Purpose(Choice):
    """Why the tuner ran a trial."""

    PREDICTED = "predicted"
    """The first trial of a setting, at its predicted largest batch."""
    REFINE = "refine"
    """A step up or down from a measured fit or OOM."""
    VERIFY = "verify"
    """The winner re-run over ``verify_steps`` steps."""
    EXPLORE = "explore"
    """A setting proposed by optuna's sampler (max_throughput)."""


class Strategy(Choice):
    """How the search proposes trials (``search.strategy``)."""

    AUTO = "auto"
    BINARY = "binary"
    """Prediction-seeded bracketing, settings in predicted order."""
    OPTUNA = "optuna"
    """optuna's TPE sampler proposes (setting, batch) points from the recorded trials."""


class Objective(Choice):
    MAX_BATCH = "max_batch"
    MAX_THROUGHPUT = "max_throughput"
    MAX_INPUT_SIZE = "max_input_size"
