"""Builders: spec -> model, optimizer, synthetic batch, loss. The only place that reads specs.

Components take plain arguments; every failure of user code (import, constructor) becomes a
one-line ``BuildError`` carrying the spec file line of the section that caused it
(``exp.yaml:2: model: ...``, from ``ExperimentSpec.where``) and the original message.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autofit.batch import image_hw
from autofit.candidate import Candidate
from autofit.errors import BuildError
from autofit.spec import ExperimentSpec, resolve_import

INPUT_SIZE_PLACEHOLDER = "${input_size}"


def add_spec_dir_to_path(spec: ExperimentSpec) -> None:
    """Make modules next to the spec file importable, as Hydra does for its config dir."""
    if spec.source_path:
        folder = str(Path(spec.source_path).resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _target_path(spec: ExperimentSpec, section: str) -> tuple[str, ...]:
    """YAML path of a section's import path: ``(section, "_target_")``, ``class_path`` or the
    section itself when it is a plain string."""
    value = spec.raw.get(section)
    if isinstance(value, dict):
        for key in ("class_path", "_target_"):
            if key in value:
                return (section, key)
    return (section,)


def import_object(path: str, what: str = "object", *, where: str = "") -> Any:
    """Import ``pkg.module.Name`` (also nested attributes ``pkg.mod.Class.method``).

    ``where``: message prefix naming the spec line (``spec.where(...)``); the message then
    reads ``exp.yaml:3: model._target_: cannot import 'x.y': ...``.
    """
    obj, why, cause = resolve_import(path)
    if why:
        head = f"{where}cannot import {path!r}" if where else f"{what} {path!r}"
        raise BuildError(f"{head}: {_one_line(why)}") from cause
    return obj


def _substitute(value: Any, input_size: int) -> Any:
    if value == INPUT_SIZE_PLACEHOLDER:
        return input_size
    if isinstance(value, dict):
        return {k: _substitute(v, input_size) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, input_size) for v in value]
    return value


def _instantiate(value: Any, spec: ExperimentSpec | None = None, path: tuple = ()) -> Any:
    """Nested ``{_target_: ...}`` mappings in kwargs are built too (Hydra's recursive mode)."""
    if isinstance(value, dict):
        built = {k: _instantiate(v, spec, path + (k,)) for k, v in value.items() if k != "_target_"}
        if "_target_" in value:
            where = spec.where(path + ("_target_",)) if spec is not None else ""
            factory = import_object(value["_target_"], "model.kwargs target", where=where)
            try:
                return factory(**built)
            except BuildError:
                raise
            except Exception as exc:
                raise BuildError(f"{where or 'model.kwargs target: '}{value['_target_']}(...) raised "
                                 f"{type(exc).__name__}: {_one_line(exc)}") from exc
        return built
    if isinstance(value, list):
        return [_instantiate(v, spec, path + (i,)) for i, v in enumerate(value)]
    return value


def build_model(spec: ExperimentSpec, input_size: int) -> nn.Module:
    """Call the model constructor on the current default device (caller sets it)."""
    add_spec_dir_to_path(spec)
    target = spec.model.target
    where = spec.where(("model",))
    factory = import_object(target, "model", where=spec.where(_target_path(spec, "model")))
    if not callable(factory):
        raise BuildError(f"{where}{target!r} is not callable (a {type(factory).__name__})")
    model_raw = spec.raw.get("model")
    lightning = isinstance(model_raw, dict) and "class_path" in model_raw
    kwargs = _instantiate(_substitute(spec.model.kwargs, input_size), spec,
                          ("model", "init_args") if lightning else ("model",))
    try:
        model = factory(**kwargs)
    except BuildError:
        raise
    except TypeError as exc:
        raise BuildError(f"{where}{target}(**{kwargs}) failed: {_one_line(exc)}") from exc
    except Exception as exc:
        raise BuildError(
            f"{where}{target}(...) raised {type(exc).__name__}: {_one_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise BuildError(f"{where}{target!r} returned {type(model).__name__}, not an nn.Module")
    return model


# --------------------------------------------------------------------------- checkpointing


class CheckpointedSegment(nn.Module):
    """Runs a slice of blocks as one activation-checkpointed unit (use_reentrant=False)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def _run(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        for block in self.blocks:
            x = block(x, *args, **kwargs)
        return x

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self._run(x, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self._run, x, *args, use_reentrant=False, **kwargs)


class CheckpointedSequential(nn.Module):
    """``checkpoint_sequential`` over an ``nn.Sequential`` in K segments."""

    def __init__(self, body: nn.Sequential, segments: int) -> None:
        super().__init__()
        self.body = body
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.body(x)
        return torch.utils.checkpoint.checkpoint_sequential(
            self.body, self.segments, x, use_reentrant=False
        )


BLOCK_CONTAINERS = (nn.ModuleList, nn.Sequential)
"""What ``model.blocks`` may name: the blocks run one after another from this container."""


def _resolve_stage(model: nn.Module, path: str) -> nn.Module:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise BuildError(f"model.blocks: {type(model).__name__} has no attribute path {path!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, BLOCK_CONTAINERS):
        raise BuildError(f"model.blocks: {path!r} is a {type(obj).__name__}, not an "
                         f"nn.ModuleList or nn.Sequential of blocks")
    if not len(obj):
        raise BuildError(f"model.blocks: {path!r} is empty")
    return obj


def _stage_hint(model: nn.Module) -> str:
    """"; e.g. model.blocks: [layer1, layer2]" from the model's Sequential children."""
    names = [name for name, m in model.named_children()
             if isinstance(m, BLOCK_CONTAINERS) and len(m) > 1]
    return f", e.g. model.blocks: [{', '.join(names)}]" if names else ""


def find_blocks(model: nn.Module, path: str | Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """The stages to checkpoint, in order: each (attribute path, ModuleList or Sequential).

    ``path``: the spec's ``model.blocks`` (one path or several named stages, e.g. a ResNet's
    ``[layer1, layer2, layer3, layer4]``); None = the longest ModuleList.
    """
    if path:
        paths = [path] if isinstance(path, str) else list(path)
        return [(p, _resolve_stage(model, p)) for p in paths]
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise BuildError(
            f"checkpoint_segments > 0 needs an nn.Sequential model or an nn.ModuleList of blocks; "
            f"{type(model).__name__} has none (set model.blocks{_stage_hint(model)})"
        )
    return [max(lists, key=lambda item: len(item[1]))]


def apply_checkpointing(model: nn.Module, segments: int,
                        blocks_path: str | Sequence[str] | None) -> nn.Module:
    """Wrap the model so its blocks run as ``segments`` checkpointed segments (0 = no-op).

    The blocks of every named stage, in order, are split into ``segments`` contiguous runs of
    ceil(n / K) blocks (``checkpoint_sequential``'s split); a run that crosses from one stage
    into the next is checkpointed as one unit per stage, since the model's own forward calls
    each stage. Each stage keeps its container type (ModuleList or Sequential).
    """
    if segments <= 0:
        return model
    if isinstance(model, nn.Sequential) and not blocks_path:
        if segments > len(model):
            raise BuildError(f"checkpoint_segments={segments} exceeds the {len(model)} layers of the model")
        return CheckpointedSequential(model, segments)
    stages = find_blocks(model, blocks_path)
    blocks = [(i, block) for i, (_, stage) in enumerate(stages) for block in stage]
    if segments > len(blocks):
        where = stages[0][0] if len(stages) == 1 else ", ".join(name for name, _ in stages)
        raise BuildError(
            f"checkpoint_segments={segments} exceeds the {len(blocks)} blocks in {where!r}"
        )
    per = math.ceil(len(blocks) / segments)
    units: list[list[CheckpointedSegment]] = [[] for _ in stages]
    for start in range(0, len(blocks), per):
        run = blocks[start:start + per]
        for i in dict.fromkeys(stage for stage, _ in run):
            units[i].append(CheckpointedSegment([b for stage, b in run if stage == i]))
    for (name, stage), grouped in zip(stages, units, strict=True):
        parent: Any = model
        parts = name.split(".")
        for part in parts[:-1]:
            parent = getattr(parent, part)
        container = nn.Sequential if isinstance(stage, nn.Sequential) else nn.ModuleList
        setattr(parent, parts[-1], container(*grouped) if container is nn.Sequential
                else nn.ModuleList(grouped))
    return model


# --------------------------------------------------------------------------- optimizer


def build_optimizer(spec: ExperimentSpec, model: nn.Module, device_type: str) -> torch.optim.Optimizer:
    """The spec's optimizer; ``foreach`` pinned to what the target device runs by default."""
    where = spec.where(("optimizer",))
    factory = import_object(spec.optimizer.target, "optimizer",
                            where=spec.where(_target_path(spec, "optimizer")))
    kwargs = dict(spec.optimizer.kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    # torch picks foreach on CUDA and the for-loop on CPU; a fake CPU trace of a CUDA target
    # must run the CUDA choice, since the two differ in peak (DESIGN.md: 545 vs 641 MiB).
    if "foreach" in params and "foreach" not in kwargs and "fused" not in kwargs:
        kwargs["foreach"] = device_type == "cuda"
    try:
        return factory(model.parameters(), **kwargs)
    except Exception as exc:
        raise BuildError(
            f"{where}{spec.optimizer.target}(**{spec.optimizer.kwargs}) raised "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from exc


# --------------------------------------------------------------------------- data and loss


def input_shape(spec: ExperimentSpec, candidate: Candidate) -> tuple[int, ...]:
    """Shape of one synthetic input batch ``x``."""
    data = spec.data
    b = candidate.batch_size
    if data.kind == "image":
        # keep the aspect ratio of data.size when searching the resolution
        h, w = image_hw(spec, candidate.input_size)
        return (b, data.channels, h, w)  # batch, channels, height, width
    if data.kind == "tokens":
        return (b, candidate.input_size or data.seq_len)  # batch, tokens
    return (b, *data.shape)


def make_input(spec: ExperimentSpec, candidate: Candidate, device: torch.device) -> torch.Tensor:
    """A synthetic input batch: token ids below ``vocab_size``, or standard normal floats."""
    shape = input_shape(spec, candidate)
    if spec.data.kind == "tokens":
        assert spec.data.vocab_size is not None
        return torch.randint(0, spec.data.vocab_size, shape, device=device)
    return torch.randn(shape, device=device)


def make_pair(spec: ExperimentSpec, candidate: Candidate, device: torch.device) -> Any:
    """The shorthand batch as a data loader yields it to a LightningModule or a custom step:
    ``(x, y)`` with class ids per sample (image, tensor) or next-token ids (tokens); ``x``
    alone when the data has no class count."""
    x = make_input(spec, candidate, device)
    b = candidate.batch_size
    if spec.data.kind == "tokens":
        assert spec.data.vocab_size is not None
        return x, torch.randint(0, spec.data.vocab_size, tuple(x.shape), device=device)
    if spec.data.num_classes:
        return x, torch.randint(0, spec.data.num_classes, (b,), device=device)
    return x


def make_target(spec: ExperimentSpec, output_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Targets derived from the model's output shape (see loss_fn for the layout)."""
    if spec.loss == "cross_entropy":
        if len(output_shape) < 2:
            raise BuildError(
                f"loss cross_entropy needs model outputs of shape (B, classes, ...), got {tuple(output_shape)}"
            )
        if spec.data.kind == "tokens":
            classes, target_shape = output_shape[-1], tuple(output_shape[:-1])  # (B, T) ids
        else:
            classes = output_shape[1]
            target_shape = (output_shape[0], *output_shape[2:])  # (B,) or per pixel (B, H, W)
        return torch.randint(0, int(classes), target_shape, device=device)
    return torch.randn(tuple(output_shape), device=device)


def extract_loss(output: Any) -> torch.Tensor:
    """loss: model -> the model returns a scalar, or an object/dict with ``loss``."""
    if isinstance(output, torch.Tensor):
        loss = output
    elif isinstance(output, dict) and "loss" in output:
        loss = output["loss"]
    elif hasattr(output, "loss"):
        loss = output.loss
        if loss is None:
            raise BuildError(f"loss: model: {type(output).__name__}.loss is None: the model computes "
                             "no loss without labels; add a labels field to data.batch, or set loss")
    elif isinstance(output, tuple | list) and output and isinstance(output[-1], torch.Tensor):
        loss = output[-1]
    else:
        raise BuildError(f"loss: model: the model returned {type(output).__name__}, not a loss")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise BuildError("loss: model: the model's loss must be a one-element tensor")
    return loss


def model_output_tensor(output: Any) -> torch.Tensor:
    """The logits/prediction tensor of a model output (HF-style objects included)."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "out", "output"):
        if isinstance(output, dict) and key in output:
            return output[key]
        if hasattr(output, key) and isinstance(getattr(output, key), torch.Tensor):
            return getattr(output, key)
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BuildError(f"cannot find the output tensor in a {type(output).__name__}; use loss: model or step:")


def build_loss(spec: ExperimentSpec) -> Callable[[Any, torch.Tensor | None], torch.Tensor]:
    """``loss_fn(output, target) -> scalar``."""
    if spec.loss == "model":
        return lambda output, target: extract_loss(output)
    if spec.loss == "cross_entropy":
        tokens = spec.data.kind == "tokens"

        def cross_entropy(output: Any, target: torch.Tensor | None) -> torch.Tensor:
            logits = model_output_tensor(output)
            assert target is not None
            if tokens:  # (B, T, V) logits, (B, T) ids: nanoGPT's flattening
                return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1))
            return nn.functional.cross_entropy(logits, target)

        return cross_entropy
    if spec.loss == "mse":
        return lambda output, target: nn.functional.mse_loss(model_output_tensor(output), target)
    user = import_object(spec.loss, "loss", where=spec.where(("loss",)))
    return lambda output, target: user(model_output_tensor(output), target)
