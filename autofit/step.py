"""The one training step that predictions trace and trials run.

``TrainingJob`` builds model, optimizer(s), loss and synthetic batches for one candidate on one
device; ``run_step`` runs one full step of the kind the spec is proven with (``autofit.loops``). The predictor runs
it on fake tensors, the trial runner on real ones, so what is predicted is what is measured.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from autofit.batch import Batch, make_batch
from autofit.build import (
    add_spec_dir_to_path,
    apply_checkpointing,
    build_loss,
    build_model,
    build_optimizer,
    import_object,
    make_input,
    make_pair,
    make_target,
    model_output_tensor,
)
from autofit.candidate import Candidate
from autofit.choices import Precision, StepKind
from autofit.errors import BuildError
from autofit.loops import (
    LIGHTNING_BASES,
    FabricShim,
    lightning_optimizers,
    run_custom,
    run_default,
    run_lightning,
    run_lightning_manual,
    step_kind,
)
from autofit.memory import PhaseHooks
from autofit.spec import ExperimentSpec

AUTOCAST_DTYPES = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
# A lower first loss scale than GradScaler's 2**16 so synthetic fp16 steps do not all overflow
# and skip optimizer.step() (which would hide the optimizer state from the measurement).
FP16_INIT_SCALE = 2.0**10


class TraceGradScaler:
    """GradScaler's memory behaviour without its data-dependent inf check.

    ``GradScaler.step`` calls ``.item()`` on the found-inf flags, which cannot run on fake
    tensors. This does the same allocations (scaled loss, found_inf, in-place unscale) and
    always steps, which is what a healthy fp16 run does.
    """

    def __init__(self, device: torch.device) -> None:
        self.scale_value = torch.full((), FP16_INIT_SCALE, dtype=torch.float32, device=device)
        self._unscaled: set[int] = set()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value.to(loss.dtype)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """In-place unscale of the gradients (before clipping), as GradScaler.unscale_."""
        if id(optimizer) in self._unscaled:
            return
        self._unscaled.add(id(optimizer))
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale_value.device)
        inv_scale = self.scale_value.double().reciprocal().float()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.unscale_(optimizer)
        optimizer.step()

    def update(self) -> None:
        self._unscaled.clear()


class TrainingJob:
    """Everything one candidate's training step needs, built on ``device``.

    ``run_step`` runs the step the spec is proven with (``autofit.loops``): autofit's own,
    Hugging Face's, Lightning's or the user's; ``step_kind`` says which.
    """

    def __init__(self, spec: ExperimentSpec, candidate: Candidate, device: torch.device, *,
                 fake: bool = False, hooks: PhaseHooks | None = None,
                 model_factory: Callable[[], nn.Module] | None = None,
                 target_kind: str | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        self.spec = spec
        self.candidate = candidate
        self.device = device
        self.fake = fake
        self.target_kind = target_kind or device.type
        self.hooks = hooks or PhaseHooks()
        add_spec_dir_to_path(spec)
        with torch.device(device):
            model = model_factory() if model_factory else build_model(spec, candidate.input_size)
        model.train()
        self.model = apply_checkpointing(model, candidate.checkpoint_segments, spec.model.blocks)
        if wrap is not None:  # data parallelism (autofit.parallel): DDP or FSDP2 on this rank
            self.model = wrap(self.model)
        self.step_kind = step_kind(spec, self.model)
        if self.step_kind in (StepKind.LIGHTNING, StepKind.LIGHTNING_MANUAL):
            if not fake:
                self.model.to(device)  # a LightningModule's self.device follows .to()
            self._check_lightning()
            self.optimizers = lightning_optimizers(self.model)
            self.model._fabric = FabricShim(self)
            self.model._fabric_optimizers = list(self.optimizers)
        else:
            self.optimizers = [build_optimizer(spec, self.model, self.target_kind)]
        self.optimizer = self.optimizers[0]
        self.loss_fn = build_loss(spec)
        self.user_step = (import_object(spec.step, "step", where=spec.where(("step",)))
                          if self.step_kind in (StepKind.CUSTOM, StepKind.CUSTOM_FORWARD) else None)
        self.user_state: dict[str, Any] = {}
        self.autocast_dtype = AUTOCAST_DTYPES.get(candidate.precision)
        self.scaler: Any = None
        if candidate.precision == Precision.FP16:
            self.scaler = (TraceGradScaler(device) if fake else
                           torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE))
        self._target_shape: torch.Size | None = None
        self._checked_kwargs = False
        self.steps_done = 0

    def _check_lightning(self) -> None:
        module = self.model
        own = getattr(type(module), "training_step", None)
        base = next((getattr(c, "training_step", None) for c in type(module).__mro__
                     if (c.__module__, c.__name__) in LIGHTNING_BASES), None)
        if own is None or own is base:
            raise BuildError(f"{self.spec.where(('model',))}{type(module).__name__} does not "
                             "define training_step (a LightningModule needs one to be trained)")

    def parameters_and_buffers(self) -> Iterator[torch.Tensor]:
        yield from self.model.parameters()
        yield from self.model.buffers()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The candidate's autocast context (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ----------------------------------------------------------------- batches

    def make_batch(self) -> Batch:
        """The batch autofit's step hands to the model (``data.batch`` or the shorthand).

        The shorthand's targets are shaped after the model's output: once the first step has
        shown it, they come with the batch, as from a data loader (``(x, y)``)."""
        if self.spec.data.batch:
            return make_batch(self.spec, self.candidate, self.device)
        x = make_input(self.spec, self.candidate, self.device)
        if self._target_shape is None or self.spec.loss == "model":
            return Batch(x, "tensor")
        return Batch((x, make_target(self.spec, self._target_shape, self.device)), "tuple")

    def derived_target(self, output: Any) -> torch.Tensor:
        """The first step's targets, shaped after the model's output (later steps' come with
        the batch: ``make_batch``)."""
        self._target_shape = model_output_tensor(output).shape
        return make_target(self.spec, self._target_shape, self.device)

    def loader_batch(self) -> Any:
        """What a DataLoader yields to a LightningModule or a custom step: ``data.batch``, or
        ``(x, y)`` for the shorthand (``x`` alone when there is no class count). Lightning
        fetches ahead only from loaders without a length, so one batch is live, as here."""
        if self.spec.data.batch:
            return make_batch(self.spec, self.candidate, self.device).value
        return make_pair(self.spec, self.candidate, self.device)

    # ----------------------------------------------------------------- pieces of a step

    def call_model(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs and not self._checked_kwargs:
            self._checked_kwargs = True
            check_model_kwargs(self.spec, self.model, kwargs)
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward(*args, **kwargs)
        else:
            loss.backward(*args, **kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def run_step(self) -> torch.Tensor:
        """One full training step of the spec's step kind. Returns the (detached) loss."""
        self.steps_done += 1
        kind = self.step_kind
        if kind == StepKind.LIGHTNING:
            return run_lightning(self)
        if kind == StepKind.LIGHTNING_MANUAL:
            return run_lightning_manual(self)
        if kind == StepKind.CUSTOM:
            return run_custom(self)
        return run_default(self, hold_output=kind != StepKind.HF_TRAINER)

    def optimizer_has_state(self) -> bool:
        return any(bool(o.state) for o in self.optimizers) or not any(
            True for _ in self.model.parameters())


HF_TENSOR_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                    "num_items_in_batch")
"""Tensors Hugging Face models accept through ``**kwargs`` (packed-sequence attention)."""


def check_model_kwargs(spec: ExperimentSpec, model: nn.Module, kwargs: dict[str, Any]) -> None:
    """A dict batch's field the model's forward does not take is a spec error, said once."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        # Hugging Face models take **kwargs for flags (output_attentions, ...) and drop what
        # they do not know: a batch field landing there is a misspelled or foreign input.
        if not type(model).__module__.startswith("transformers."):
            return
        kwargs = {k: v for k, v in kwargs.items() if k not in HF_TENSOR_KWARGS}
    unknown = [name for name in kwargs if name not in params]
    if unknown:
        takes = ", ".join(n for n, p in params.items() if p.kind not in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
        raise BuildError(f"{spec.where(('data', 'batch', unknown[0]))}{type(model).__name__}.forward() "
                         f"takes no argument {unknown[0]!r} (it takes: {takes})")
