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


PRECISION_ALIASES: dict[str, str] = {
    "32-true": "fp32", "32": "fp32", "float32": "fp32",
    "16-mixed": "fp16", "16": "fp16", "float16": "fp16",
    "bf16-mixed": "bf16", "bfloat16": "bf16",
}
"""Lightning's and torch's names for the same precisions (``Trainer(precision="bf16-mixed")``)."""


class StepKind(Choice):
    """Which training step a result was proven with."""

    AUTOFIT = "autofit"
    """autofit's step: ``out = model(x); loss = loss_fn(out, y)``, output held through backward."""
    HF = "hf"
    """``out = model(**batch); out.loss.backward()``: the model computes its loss, output held."""
    HF_TRAINER = "hf_trainer"
    """HF ``Trainer.training_step``: only the loss is kept, the output is freed before backward."""
    LIGHTNING = "lightning"
    """A LightningModule's ``training_step`` in Lightning's automatic-optimization loop."""
    LIGHTNING_MANUAL = "lightning_manual"
    """A LightningModule with ``automatic_optimization = False``: its training_step is the step."""
    CUSTOM = "custom"
    """The user's full step function: forward, backward and optimizer."""
    CUSTOM_FORWARD = "custom_forward"
    """The user's forward-and-loss function; autofit runs backward and the optimizer."""

    def describe(self) -> str:
        return STEP_DESCRIPTIONS[self]


STEP_DESCRIPTIONS: dict[StepKind, str] = {
    StepKind.AUTOFIT: "autofit's step (out = model(x); loss(out, y); output held through backward; "
                      "zero_grad after optimizer.step)",
    StepKind.HF: "Hugging Face model(**batch) computing its own loss (output held through backward)",
    StepKind.HF_TRAINER: "Hugging Face Trainer step (model(**batch).loss; output freed before backward)",
    StepKind.LIGHTNING: "Lightning automatic optimization (training_step, zero_grad, backward, "
                        "optimizer.step)",
    StepKind.LIGHTNING_MANUAL: "Lightning manual optimization (the module's training_step is the step)",
    StepKind.CUSTOM: "the spec's custom step function (forward, backward and optimizer)",
    StepKind.CUSTOM_FORWARD: "the spec's forward function (its loss; autofit runs backward and step)",
}


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
