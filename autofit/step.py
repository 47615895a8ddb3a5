"""The one training step that predictions trace and trials run.

``TrainingJob`` builds model, optimizer, loss and synthetic batches for one candidate on one
device; ``run_step`` is forward, loss, backward, optimizer step, zero_grad. The predictor runs
it on fake tensors, the trial runner on real ones, so what is predicted is what is measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from autofit.build import (
    add_spec_dir_to_path,
    apply_checkpointing,
    build_loss,
    build_model,
    build_optimizer,
    import_object,
    make_input,
    make_target,
    model_output_tensor,
)
from autofit.candidate import Candidate
from autofit.choices import Phase, Precision
from autofit.errors import BuildError
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

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value.to(loss.dtype)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale_value.device)
        inv_scale = self.scale_value.double().reciprocal().float()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        optimizer.step()

    def update(self) -> None:
        pass


class TrainingJob:
    """Everything one candidate's training step needs, built on ``device``."""

    def __init__(self, spec: ExperimentSpec, candidate: Candidate, device: torch.device, *,
                 fake: bool = False, hooks: PhaseHooks | None = None,
                 model_factory: Callable[[], nn.Module] | None = None,
                 target_kind: str | None = None) -> None:
        self.spec = spec
        self.candidate = candidate
        self.device = device
        self.fake = fake
        self.hooks = hooks or PhaseHooks()
        add_spec_dir_to_path(spec)
        with torch.device(device):
            model = model_factory() if model_factory else build_model(spec, candidate.input_size)
        model.train()
        self.model = apply_checkpointing(model, candidate.checkpoint_segments, spec.model.blocks)
        self.optimizer = build_optimizer(spec, self.model, target_kind or device.type)
        self.loss_fn = build_loss(spec)
        self.user_step = import_object(spec.step, "step") if spec.step else None
        self.autocast_dtype = AUTOCAST_DTYPES.get(candidate.precision)
        self.scaler: Any = None
        if candidate.precision == Precision.FP16:
            self.scaler = (TraceGradScaler(device) if fake else
                           torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE))
        self._target_shape: torch.Size | None = None
        self.steps_done = 0

    def parameters_and_buffers(self) -> Iterator[torch.Tensor]:
        yield from self.model.parameters()
        yield from self.model.buffers()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The candidate's autocast context (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def run_step(self) -> torch.Tensor:
        """One full training step. Returns the (detached) loss."""
        hooks = self.hooks
        self.steps_done += 1
        hooks.phase(Phase.DATA, self.steps_done)
        if self.user_step is None:
            x = make_input(self.spec, self.candidate, self.device)
            # Targets come with the batch, as from a data loader; their shape follows the
            # model's output, learned in the first step.
            y = (make_target(self.spec, self._target_shape, self.device)
                 if self._target_shape is not None and self.spec.loss != "model" else None)
        hooks.phase(Phase.FORWARD)
        with self.autocast():
            if self.user_step is not None:
                loss = self.user_step(self.model, self.candidate.batch_size,
                                      self.candidate.input_size, self.device)
                output = None
            else:
                output = self.model(x)
                if self.spec.loss != "model" and y is None:
                    self._target_shape = model_output_tensor(output).shape
                    y = make_target(self.spec, self._target_shape, self.device)
                loss = self.loss_fn(output, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise BuildError(f"the step's loss must be a one-element tensor, got {type(loss).__name__}")
        hooks.forward_done()
        hooks.phase(Phase.BACKWARD)
        # `output` stays referenced through backward, as in the common training loop
        # (`out = model(x); loss = crit(out, y); loss.backward()`): it changes the peak.
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        hooks.backward_done(self.model)
        hooks.phase(Phase.OPTIMIZER)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        hooks.optimizer_done(self.optimizer)
        hooks.phase(Phase.ZERO_GRAD)
        self.optimizer.zero_grad(set_to_none=True)
        del output
        return loss.detach()

    def optimizer_has_state(self) -> bool:
        return bool(self.optimizer.state) or not any(True for _ in self.model.parameters())
