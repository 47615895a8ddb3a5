"""The training steps autofit can prove: its own, Hugging Face's, Lightning's, the user's.

A trial is only as good as the step it ran. These are the loops users train with, each
reproduced with the allocation order that decides its peak:

- ``autofit`` / ``hf``: ``out = model(...)``, loss, backward with ``out`` still referenced,
  ``optimizer.step()``, ``zero_grad`` (the common hand-written loop; ``hf`` is
  ``model(**batch)`` with the model computing its loss).
- ``hf_trainer``: as HF ``Trainer.training_step``: only the loss survives the forward, so the
  logits are freed before backward.
- ``lightning``: Lightning's automatic optimization: ``training_step``, then ``zero_grad``
  (the previous step's gradients live through the forward), backward, ``optimizer.step``.
- ``lightning_manual``: ``automatic_optimization = False``: the module's ``training_step`` runs
  the whole step with ``self.optimizers()`` and ``self.manual_backward``.
- ``custom``: the user's full step function; ``custom_forward``: the user's forward-and-loss
  function, with autofit's backward and optimizer step.

Every loop is the same code on fake tensors (prediction) and real ones (trials).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autofit.build import extract_loss
from autofit.choices import Phase, StepKind
from autofit.errors import BuildError
from autofit.spec import ExperimentSpec, resolve_import

if TYPE_CHECKING:
    from autofit.step import TrainingJob

FULL_STEP_PARAMETERS = ("model", "optimizer", "optimizers", "batch", "scaler", "autocast",
                        "state", "step", "device", "batch_size", "input_size")
"""What a full custom step may ask for by parameter name (see README: "Your own step")."""
LIGHTNING_BASES = {("lightning.pytorch.core.module", "LightningModule"),
                   ("pytorch_lightning.core.module", "LightningModule")}


def is_lightning_module(obj: Any) -> bool:
    """Whether ``obj`` (a class or instance) is a LightningModule, without importing Lightning."""
    cls = obj if isinstance(obj, type) else type(obj)
    return any((base.__module__, base.__name__) in LIGHTNING_BASES for base in cls.__mro__)


def is_full_step(fn: Callable[..., Any]) -> bool:
    """A user step that takes the optimizer(s) runs the whole step itself."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "optimizer" in params or "optimizers" in params


def step_kind(spec: ExperimentSpec, model: Any = None) -> StepKind:
    """Which step proves this spec. ``model``: the built model, when there is one (a
    LightningModule's automatic/manual choice is only known once it is built)."""
    if spec.step == "hf_trainer":
        return StepKind.HF_TRAINER
    if spec.step and spec.step != "autofit":
        fn, _, _ = resolve_import(spec.step)
        return StepKind.CUSTOM if fn is not None and is_full_step(fn) else StepKind.CUSTOM_FORWARD
    if spec.step != "autofit":
        target = model if model is not None else resolve_import(spec.model.target)[0]
        if target is not None and is_lightning_module(target):
            manual = model is not None and not getattr(model, "automatic_optimization", True)
            return StepKind.LIGHTNING_MANUAL if manual else StepKind.LIGHTNING
    if spec.loss == "model" and spec.data.batch_form == "dict":
        return StepKind.HF
    return StepKind.AUTOFIT


def lightning_optimizers(module: nn.Module) -> list[torch.optim.Optimizer]:
    """``configure_optimizers()`` parsed as Lightning parses it (its schedulers are built too)."""
    if not hasattr(module, "configure_optimizers"):
        raise BuildError(f"{type(module).__name__} has no configure_optimizers()")
    conf = module.configure_optimizers()
    try:
        from lightning.pytorch.core.optimizer import _configure_optimizers
    except ImportError:  # pytorch_lightning, or a Lightning without the helper
        _configure_optimizers = None
    if _configure_optimizers is not None:
        try:
            optimizers = _configure_optimizers(conf)[0]
        except Exception as exc:
            raise BuildError(f"{type(module).__name__}.configure_optimizers(): {exc}") from exc
    elif isinstance(conf, torch.optim.Optimizer):
        optimizers = [conf]
    elif isinstance(conf, Mapping):
        optimizers = [conf["optimizer"]]
    elif isinstance(conf, list | tuple) and conf and isinstance(conf[0], list):
        optimizers = list(conf[0])
    else:
        optimizers = [c["optimizer"] if isinstance(c, Mapping) else c for c in (conf or [])]
    if not optimizers:
        raise BuildError(f"{type(module).__name__}.configure_optimizers() returned no optimizer")
    return optimizers


class FabricShim:
    """What a LightningModule's ``optimizers()``, ``manual_backward`` and ``self.log`` reach for
    outside a Trainer: the job's optimizers, a (scaled) backward, and a log that keeps nothing."""

    def __init__(self, job: TrainingJob) -> None:
        self._job = job

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self._job.backward(loss, *args, **kwargs)

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name in ("logger", "loggers"):
            return None if name == "logger" else []
        raise AttributeError(name)


def _checked_loss(loss: Any, source: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"shape {tuple(loss.shape)}"
        raise BuildError(f"{source} returned {got}, not a one-element loss tensor")
    return loss


def run_default(job: TrainingJob, *, hold_output: bool) -> torch.Tensor:
    """autofit / hf / hf_trainer / custom_forward: forward, loss, backward, step, zero_grad."""
    hooks, spec = job.hooks, job.spec
    hooks.phase(Phase.DATA, job.steps_done)
    batch = None if job.user_step is not None else job.make_batch()
    model_loss = spec.loss == "model"
    hooks.phase(Phase.FORWARD)
    with job.autocast():
        if job.user_step is not None:
            output = None
            loss = _checked_loss(job.user_step(job.model, job.candidate.batch_size,
                                               job.candidate.input_size, job.device), "the step")
        else:
            assert batch is not None
            args, kwargs = batch.model_inputs(model_loss)
            output = job.call_model(*args, **kwargs)
            if model_loss:
                loss = extract_loss(output)
            else:
                target = batch.target()
                if target is None:
                    target = job.derived_target(output)
                loss = job.loss_fn(output, target)
    if not hold_output:
        output = None  # HF Trainer: compute_loss returns only the loss
    _checked_loss(loss, "the loss")
    hooks.forward_done()
    hooks.phase(Phase.BACKWARD)
    # `output` stays referenced through backward, as in the common training loop
    # (`out = model(x); loss = crit(out, y); loss.backward()`): it changes the peak.
    job.backward(loss)
    hooks.backward_done(job.model)
    hooks.phase(Phase.OPTIMIZER)
    job.optimizer_step(job.optimizer)
    hooks.optimizer_done(job.optimizer)
    hooks.phase(Phase.ZERO_GRAD)
    job.optimizer.zero_grad(set_to_none=True)
    del output
    return loss.detach()


def run_lightning(job: TrainingJob) -> torch.Tensor:
    """Lightning's automatic optimization, in the order of its ``Closure``:
    training_step, zero_grad, backward; then (fp16) unscale_ and the optimizer step."""
    hooks, module = job.hooks, job.model
    hooks.phase(Phase.DATA, job.steps_done)
    batch = job.loader_batch()
    hooks.phase(Phase.FORWARD)
    with job.autocast():
        out = module.training_step(batch, job.steps_done - 1)
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise BuildError(f"{type(module).__name__}.training_step returned a dict without 'loss'")
        loss = out["loss"]
    elif out is None:
        raise BuildError(f"{type(module).__name__}.training_step returned None; autofit needs "
                         "the loss to prove the step (Lightning would skip the optimizer step)")
    else:
        loss = out
    del out  # Lightning keeps only the loss and detached extras
    loss = _checked_loss(loss, f"{type(module).__name__}.training_step") / 1  # its normalize
    hooks.forward_done()
    optimizer = job.optimizer
    hooks.phase(Phase.ZERO_GRAD)
    optimizer.zero_grad(set_to_none=True)
    hooks.phase(Phase.BACKWARD)
    job.backward(loss)
    hooks.backward_done(module)
    hooks.phase(Phase.OPTIMIZER)
    if job.scaler is not None:
        job.scaler.unscale_(optimizer)
    job.optimizer_step(optimizer)
    hooks.optimizer_done(optimizer)
    return loss.detach()


@contextlib.contextmanager
def _optimizer_phase_hooks(job: TrainingJob) -> Any:
    """Mark backward's end and the optimizer phase from inside a step autofit does not drive."""
    handles = []
    for optimizer in job.optimizers:
        def pre(opt: torch.optim.Optimizer, *_: Any) -> None:
            job.hooks.backward_done(job.model)
            job.hooks.phase(Phase.OPTIMIZER)

        def post(opt: torch.optim.Optimizer, *_: Any) -> None:
            job.hooks.optimizer_done(opt)

        handles.append(optimizer.register_step_pre_hook(pre))
        handles.append(optimizer.register_step_post_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_lightning_manual(job: TrainingJob) -> torch.Tensor:
    """``automatic_optimization = False``: the module's training_step is the whole step."""
    hooks, module = job.hooks, job.model
    hooks.phase(Phase.DATA, job.steps_done)
    batch = job.loader_batch()
    hooks.phase(Phase.FORWARD)
    with _optimizer_phase_hooks(job), job.autocast():
        out = module.training_step(batch, job.steps_done - 1)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    return _checked_loss(loss, f"{type(module).__name__}.training_step").detach()


def run_custom(job: TrainingJob) -> torch.Tensor:
    """The user's full step, given what it asks for by parameter name."""
    hooks = job.hooks
    hooks.phase(Phase.DATA, job.steps_done)
    batch = job.loader_batch()
    available = {
        "model": job.model, "optimizer": job.optimizer, "optimizers": job.optimizers,
        "batch": batch, "scaler": job.scaler, "autocast": job.autocast, "state": job.user_state,
        "step": job.steps_done - 1, "device": job.device,
        "batch_size": job.candidate.batch_size, "input_size": job.candidate.input_size,
    }
    fn = job.user_step
    assert fn is not None
    params = inspect.signature(fn).parameters
    kwargs = {name: available[name] for name in params if name in available}
    outer = contextlib.nullcontext() if "autocast" in params else job.autocast()
    hooks.phase(Phase.FORWARD)
    with _optimizer_phase_hooks(job), outer:
        loss = fn(**kwargs)
    return _checked_loss(loss, f"step {job.spec.step}").detach()
