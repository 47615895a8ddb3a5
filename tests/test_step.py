"""Tests for autofit.step.TrainingJob on real CPU tensors: every zoo model, precision and
checkpointing setting trains (finite loss, parameters move), plus the loss / step options."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from autofit.build import CheckpointedSegment, CheckpointedSequential
from autofit.candidate import Candidate
from autofit.errors import BuildError
from autofit.spec import ExperimentSpec, spec_from_dict
from autofit.step import TrainingJob

CPU = torch.device("cpu")
IMAGE = {"kind": "image", "channels": 3, "size": 8, "num_classes": 5}
TOKENS = {"kind": "tokens", "vocab_size": 64, "seq_len": 16}

# zoo model -> (model section, data section, input size)
ZOO: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "resnet": ({"_target_": "autofit.zoo.resnet", "depth": 18, "width": 8, "num_classes": 5},
               IMAGE, 8),
    "vit": ({"_target_": "autofit.zoo.vit", "image_size": 8, "patch_size": 4, "dim": 32,
             "depth": 2, "heads": 2, "num_classes": 5}, IMAGE, 8),
    "gpt": ({"_target_": "autofit.zoo.gpt", "n_layer": 2, "n_embd": 32, "n_head": 2,
             "vocab_size": 64, "block_size": 16}, TOKENS, 16),
    "mlp": ({"_target_": "autofit.zoo.mlp", "in_features": 3 * 8 * 8, "hidden": 32, "depth": 2,
             "out_features": 5}, IMAGE, 8),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_spec(model: dict[str, Any], data: dict[str, Any] | None, **extra: Any) -> ExperimentSpec:
    raw: dict[str, Any] = {"name": "step-test", "model": model, "device": "cpu", **extra}
    if data is not None:
        raw["data"] = data
    return spec_from_dict(raw)


def run_steps(job: TrainingJob, steps: int = 2) -> list[float]:
    return [float(job.run_step()) for _ in range(steps)]


def snapshot(job: TrainingJob) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in job.model.named_parameters()}


def max_change(before: dict[str, torch.Tensor], job: TrainingJob) -> dict[str, float]:
    return {name: (p.detach() - before[name]).abs().max().item()
            for name, p in job.model.named_parameters()}


@pytest.mark.parametrize("segments", [0, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_trains(name: str, precision: str, segments: int) -> None:
    torch.manual_seed(0)
    model, data, size = ZOO[name]
    spec = make_spec(model, data)
    cand = Candidate(batch_size=2, input_size=size, precision=precision,
                     checkpoint_segments=segments)
    job = TrainingJob(spec, cand, CPU)
    if segments:
        wrapped = (isinstance(job.model, CheckpointedSequential) or
                   any(isinstance(m, CheckpointedSegment) for m in job.model.modules()))
        assert wrapped
    if precision == "fp16":
        assert isinstance(job.scaler, torch.amp.GradScaler)
    before = snapshot(job)
    losses = run_steps(job)
    assert all(math.isfinite(v) for v in losses), losses
    assert job.steps_done == 2
    assert job.optimizer_has_state()
    changes = max_change(before, job)
    # AdamW moves a parameter with a gradient by ~lr (1e-3) per step; weight decay alone by
    # lr * wd * |p| (< 1e-5 here), so a change > 1e-4 means gradients reached it
    first = next(iter(changes))
    assert changes[first] > 1e-4, (first, changes[first])
    moved = sum(c > 1e-4 for c in changes.values())
    assert moved >= 0.8 * len(changes), changes
    # grads are cleared after each step
    assert all(p.grad is None for p in job.model.parameters())


def test_checkpointing_keeps_the_loss() -> None:
    """Checkpointed segments compute the same function as the plain model."""
    model, data, size = ZOO["gpt"]
    spec = make_spec(model, data)
    losses = []
    for segments in (0, 2):
        torch.manual_seed(0)
        job = TrainingJob(spec, Candidate(batch_size=2, input_size=size,
                                          checkpoint_segments=segments), CPU)
        torch.manual_seed(1)
        losses.append(run_steps(job))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_loss_model_with_scalar_output() -> None:
    spec = make_spec({"_target_": "faults.ScalarLoss"},
                     {"kind": "tensor", "shape": [16]}, loss="model")
    job = TrainingJob(spec, Candidate(batch_size=3, input_size=0), CPU)
    before = snapshot(job)
    losses = run_steps(job)
    assert all(math.isfinite(v) and v >= 0 for v in losses)
    assert job._target_shape is None  # no targets are made for loss: model
    assert max(max_change(before, job).values()) > 1e-4


def test_loss_model_rejects_non_scalar_output() -> None:
    spec = make_spec({"_target_": "faults.Tiny"}, {"kind": "tensor", "shape": [16]}, loss="model")
    job = TrainingJob(spec, Candidate(batch_size=3, input_size=0), CPU)
    with pytest.raises(BuildError, match="one-element tensor"):
        job.run_step()


def test_mse_loss() -> None:
    spec = make_spec({"_target_": "faults.Tiny"}, {"kind": "tensor", "shape": [16]}, loss="mse")
    job = TrainingJob(spec, Candidate(batch_size=4, input_size=0), CPU)
    before = snapshot(job)
    losses = run_steps(job)
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert job._target_shape == torch.Size([4, 4])
    assert max(max_change(before, job).values()) > 1e-4


def test_user_step_escape_hatch() -> None:
    spec = make_spec({"_target_": "faults.Tiny"}, None, step="faults.step")
    job = TrainingJob(spec, Candidate(batch_size=4, input_size=0), CPU)
    import faults

    assert job.user_step is faults.step
    before = snapshot(job)
    losses = run_steps(job)
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert job._target_shape is None  # the user step makes its own batch
    assert max(max_change(before, job).values()) > 1e-4


def test_user_step_with_fp16_scaler() -> None:
    spec = make_spec({"_target_": "faults.Tiny"}, None, step="faults.step")
    job = TrainingJob(spec, Candidate(batch_size=4, input_size=0, precision="fp16"), CPU)
    losses = run_steps(job, 3)
    assert all(math.isfinite(v) for v in losses)
    assert job.optimizer_has_state()


@pytest.mark.parametrize(("name", "segments", "count"), [("gpt", 3, 2), ("mlp", 7, 6),
                                                        ("resnet", 9, 8)])
def test_more_segments_than_blocks_is_build_error(name: str, segments: int, count: int) -> None:
    model, data, size = ZOO[name]
    spec = make_spec(model, data)
    cand = Candidate(batch_size=2, input_size=size, checkpoint_segments=segments)
    with pytest.raises(BuildError, match=f"checkpoint_segments={segments} exceeds the {count}"):
        TrainingJob(spec, cand, CPU)


def test_segments_equal_to_blocks_is_fine() -> None:
    model, data, size = ZOO["gpt"]
    job = TrainingJob(make_spec(model, data),
                      Candidate(batch_size=2, input_size=size, checkpoint_segments=2), CPU)
    assert len(job.model.blocks) == 2
    assert all(isinstance(b, CheckpointedSegment) for b in job.model.blocks)


def test_checkpointing_needs_blocks() -> None:
    spec = make_spec({"_target_": "faults.Tiny"}, {"kind": "tensor", "shape": [16],
                                                   "num_classes": 4})
    with pytest.raises(BuildError, match="has none"):
        TrainingJob(spec, Candidate(batch_size=2, input_size=0, checkpoint_segments=1), CPU)


def test_unknown_precision_is_refused() -> None:
    spec = make_spec({"_target_": "faults.Tiny"}, {"kind": "tensor", "shape": [16],
                                                   "num_classes": 4})
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        TrainingJob(spec, Candidate(batch_size=2, input_size=0, precision="fp8"), CPU)


def test_optimizer_foreach_follows_target_kind() -> None:
    spec = make_spec({"_target_": "faults.Tiny"}, {"kind": "tensor", "shape": [16],
                                                   "num_classes": 4})
    cand = Candidate(batch_size=2, input_size=0)
    assert TrainingJob(spec, cand, CPU).optimizer.defaults["foreach"] is False
    assert TrainingJob(spec, cand, CPU, target_kind="cuda").optimizer.defaults["foreach"] is True
