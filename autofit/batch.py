"""Synthetic batches that look like the user's data: one tensor, a dict or a tuple of fields.

``make_batch`` builds the batch a data loader would hand over for one candidate: token ids
below ``vocab_size``, ones for attention masks, class ids, normal floats, images, each with
its per-sample shape (the ``input_size`` axis follows the candidate). ``Batch`` then says how
the step passes it on: ``model(**fields)`` for a dict, ``model(*inputs)`` plus a target for a
tuple, ``model(x)`` for the single-tensor shorthand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from autofit.candidate import Candidate
from autofit.errors import BuildError
from autofit.spec import BatchField, ExperimentSpec

DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
INT_KINDS = ("tokens", "ones", "zeros", "classes")


def image_hw(spec: ExperimentSpec, input_size: int) -> tuple[int, int]:
    """Image height and width for an input size, keeping the aspect ratio of ``data.size``."""
    h, w = spec.data.size
    if input_size and input_size != spec.default_input_size:
        w = max(1, round(w * input_size / h))
        h = input_size
    return h, w


def field_shape(spec: ExperimentSpec, field: BatchField, candidate: Candidate) -> tuple[int, ...]:
    """Full shape of one field for a candidate: (batch, *per-sample shape)."""
    size = candidate.input_size or spec.default_input_size
    if field.shape is not None:
        per_sample = tuple(size if dim == "input_size" else int(dim) for dim in field.shape)
    elif field.kind == "image" or (field.kind in ("normal", "uniform") and spec.data.kind == "image"):
        per_sample = (spec.data.channels, *image_hw(spec, size))
    elif field.kind in ("normal", "uniform") and spec.data.kind == "tensor":
        per_sample = spec.data.shape
    else:
        per_sample = (size,)
    return (candidate.batch_size, *per_sample)


def make_field(spec: ExperimentSpec, field: BatchField, candidate: Candidate,
               device: torch.device) -> torch.Tensor:
    shape = field_shape(spec, field, candidate)
    default = torch.int64 if field.kind in INT_KINDS else torch.float32
    dtype = DTYPES[field.dtype] if field.dtype else default
    if field.kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if field.kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if field.kind in ("tokens", "classes"):
        high = field.high or spec.data.vocab_size or spec.data.num_classes or 2
        return torch.randint(0, high, shape, dtype=dtype, device=device)
    if field.kind == "uniform":
        return torch.rand(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=device)


@dataclass
class Batch:
    """One synthetic batch and how the step hands it to the model and the loss."""

    value: Any
    """What a data loader yields: a tensor, a dict of tensors or a tuple of tensors."""
    form: str
    target_name: str | None = None
    """dict form: the field the loss takes when the loss is not ``model``."""

    def model_inputs(self, model_computes_loss: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments of the model call."""
        if self.form == "dict":
            fields = dict(self.value)
            if not model_computes_loss and self.target_name:
                fields.pop(self.target_name)
            return (), fields
        if self.form == "tuple":
            items = tuple(self.value)
            if not model_computes_loss and len(items) > 1:
                items = items[:-1]
            return items, {}
        return (self.value,), {}

    def target(self) -> torch.Tensor | None:
        """The loss target the batch carries (None: derive it from the model's output)."""
        if self.form == "dict" and self.target_name:
            return self.value[self.target_name]
        if self.form == "tuple" and len(self.value) > 1:
            return self.value[-1]
        return None


def make_batch(spec: ExperimentSpec, candidate: Candidate, device: torch.device) -> Batch:
    """The structured batch of ``data.batch`` (callers use the shorthand when it is empty)."""
    data = spec.data
    if not data.batch:
        raise BuildError("make_batch needs data.batch fields")
    tensors = [make_field(spec, field, candidate, device) for field in data.batch]
    if data.batch_form == "dict":
        return Batch({f.name: t for f, t in zip(data.batch, tensors, strict=True)}, "dict",
                     data.target)
    return Batch(tuple(tensors), "tuple")
