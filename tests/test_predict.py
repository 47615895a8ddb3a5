"""Tests for autofit.predict: fake-tensor traces match real tracked steps, the breakdown reacts
to checkpointing and precision, the affine batch curve, and predict_max_batch's boundary."""

from __future__ import annotations

import resource
import time
from typing import Any

import pytest
import torch

from autofit.candidate import Candidate
from autofit.memory import MemoryBreakdown, MemoryTracker, PhaseHooks
from autofit.predict import BatchCurve, estimate, fit_line, predict_max_batch
from autofit.predict.device_model import CPU, CUDA_DEFAULT
from autofit.spec import ExperimentSpec, spec_from_dict
from autofit.step import TrainingJob

IMAGE = {"kind": "image", "channels": 3, "size": 8, "num_classes": 5}
TOKENS = {"kind": "tokens", "vocab_size": 64, "seq_len": 16}
TINY: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "mlp": ({"_target_": "autofit.zoo.mlp", "in_features": 3 * 8 * 8, "hidden": 32, "depth": 2,
             "out_features": 5}, IMAGE, 8),
    "gpt": ({"_target_": "autofit.zoo.gpt", "n_layer": 2, "n_embd": 32, "n_head": 2,
             "vocab_size": 64, "block_size": 16}, TOKENS, 16),
    "vit": ({"_target_": "autofit.zoo.vit", "image_size": 8, "patch_size": 4, "dim": 32,
             "depth": 2, "heads": 2, "num_classes": 5}, IMAGE, 8),
    "resnet": ({"_target_": "autofit.zoo.resnet", "depth": 18, "width": 8, "num_classes": 5},
               IMAGE, 8),
}
PHASES = ("forward", "backward", "optimizer")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_spec(model: dict[str, Any], data: dict[str, Any], **extra: Any) -> ExperimentSpec:
    return spec_from_dict({"name": "predict-test", "model": model, "data": data, "device": "cpu",
                           **extra})


def mlp_tensor_spec(hidden: int = 128, **search: Any) -> ExperimentSpec:
    return make_spec({"_target_": "autofit.zoo.mlp", "in_features": 16, "hidden": hidden,
                      "depth": 2, "out_features": 4},
                     {"kind": "tensor", "shape": [16], "num_classes": 4},
                     **({"search": search} if search else {}))


def measure(spec: ExperimentSpec, candidate: Candidate, steps: int = 2) -> MemoryBreakdown:
    """The real step on real CPU tensors under the same tracker (params tracked first)."""
    tracker = MemoryTracker()
    job = TrainingJob(spec, candidate, torch.device("cpu"), hooks=PhaseHooks(tracker))
    for tensor in job.parameters_and_buffers():
        tracker.track(tensor, "params")
    with tracker:
        for _ in range(steps):
            job.run_step()
    return tracker.breakdown()


def peak(spec: ExperimentSpec, candidate: Candidate) -> int:
    return estimate(spec, candidate, CPU).peak_bytes


# --------------------------------------------------------------------------- prediction == real


@pytest.mark.parametrize(("name", "precision", "segments"), [
    ("mlp", "fp32", 0), ("gpt", "fp32", 0), ("vit", "fp32", 0), ("resnet", "fp32", 0),
    ("gpt", "bf16", 0), ("gpt", "fp16", 0), ("gpt", "fp32", 2), ("mlp", "bf16", 2),
])
def test_prediction_matches_real_tracked_step(name: str, precision: str, segments: int) -> None:
    model, data, size = TINY[name]
    spec = make_spec(model, data)
    candidate = Candidate(batch_size=8, input_size=size, precision=precision,
                          checkpoint_segments=segments)
    predicted = estimate(spec, candidate, CPU)
    real = measure(spec, candidate)
    assert predicted.device_kind == "cpu"
    assert predicted.peak_bytes == predicted.breakdown.peak_bytes == predicted.allocated_bytes
    assert predicted.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    assert predicted.breakdown.peak_phase == real.peak_phase
    assert predicted.breakdown.peak_step == real.peak_step
    for category, value in predicted.breakdown.categories().items():
        assert value == pytest.approx(real.categories()[category], abs=0.01 * real.peak_bytes), \
            category
    assert sum(predicted.breakdown.categories().values()) == predicted.peak_bytes
    params = sum(p.numel() for p in TrainingJob(spec, candidate, torch.device("cpu"))
                 .model.parameters())
    assert predicted.param_count == params


def test_peak_phase_and_categories_are_sane() -> None:
    model, data, size = TINY["gpt"]
    spec = make_spec(model, data)
    bd = estimate(spec, Candidate(batch_size=8, input_size=size), CPU).breakdown
    assert bd.peak_phase in PHASES
    assert bd.peak_step in (1, 2)
    n_params = sum(p.numel() for p in TrainingJob(spec, Candidate(batch_size=1, input_size=size),
                                                  torch.device("cpu")).model.parameters())
    assert bd.params_bytes >= 4 * n_params  # fp32 params (+ buffers)
    assert bd.optimizer_state_bytes >= 2 * 4 * n_params  # AdamW: exp_avg and exp_avg_sq
    assert all(v >= 0 for v in bd.categories().values())


def test_cuda_model_adds_overheads() -> None:
    model, data, size = TINY["mlp"]
    spec = make_spec(model, data)
    cand = Candidate(batch_size=8, input_size=size)
    cpu, cuda = estimate(spec, cand, CPU), estimate(spec, cand, CUDA_DEFAULT)
    assert cuda.device_kind == "cuda"
    assert cuda.allocated_bytes == cuda.breakdown.peak_bytes + CUDA_DEFAULT.workspace_bytes
    assert cuda.reserved_bytes >= cuda.allocated_bytes
    assert cuda.reserved_bytes % CUDA_DEFAULT.segment_bytes == 0
    # every storage is rounded up to the allocator's 512 B blocks
    assert cuda.breakdown.params_bytes % 512 == 0
    assert cuda.breakdown.params_bytes > cpu.breakdown.params_bytes
    assert cpu.reserved_bytes == cpu.allocated_bytes == cpu.breakdown.peak_bytes


# --------------------------------------------------------------------------- what lowers memory


def test_checkpoint_segments_lower_activation_bytes() -> None:
    model = {"_target_": "autofit.zoo.gpt", "n_layer": 4, "n_embd": 64, "n_head": 2,
             "vocab_size": 64, "block_size": 64}
    spec = make_spec(model, {"kind": "tokens", "vocab_size": 64, "seq_len": 64})
    plain = estimate(spec, Candidate(batch_size=16, input_size=64), CPU).breakdown
    ckpt = estimate(spec, Candidate(batch_size=16, input_size=64, checkpoint_segments=2),
                    CPU).breakdown
    assert ckpt.activations_bytes < plain.activations_bytes / 2
    assert ckpt.peak_bytes < plain.peak_bytes
    assert ckpt.params_bytes == plain.params_bytes
    assert ckpt.optimizer_state_bytes == plain.optimizer_state_bytes


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_lowers_activation_bytes(precision: str) -> None:
    spec = make_spec({"_target_": "autofit.zoo.mlp", "in_features": 256, "hidden": 1024,
                      "depth": 4, "out_features": 10},
                     {"kind": "tensor", "shape": [256], "num_classes": 10})
    fp32 = estimate(spec, Candidate(batch_size=4096, input_size=0), CPU).breakdown
    half = estimate(spec, Candidate(batch_size=4096, input_size=0, precision=precision),
                    CPU).breakdown
    assert fp32.activations_bytes > fp32.peak_bytes / 2  # activations dominate this config
    assert half.activations_bytes < 0.7 * fp32.activations_bytes
    assert half.peak_bytes < fp32.peak_bytes
    # autocast keeps fp32 master weights and optimizer state
    assert half.params_bytes == fp32.params_bytes
    assert half.optimizer_state_bytes == fp32.optimizer_state_bytes


def test_peak_grows_with_batch_and_input_size() -> None:
    model, data, size = TINY["gpt"]
    spec = make_spec(model, data)
    small = peak(spec, Candidate(batch_size=8, input_size=8))
    assert peak(spec, Candidate(batch_size=16, input_size=8)) > small
    assert peak(spec, Candidate(batch_size=8, input_size=16)) > small


# --------------------------------------------------------------------------- the affine curve


@pytest.mark.parametrize(("intercept", "slope"), [(1000, 37), (0, 6), (2**30, 2**20)])
def test_fit_line_recovers_exact_affine_points(intercept: int, slope: int) -> None:
    points = [(b, intercept + slope * b) for b in (1, 2, 8, 64)]
    fitted_intercept, fitted_slope = fit_line(points)
    assert fitted_slope == pytest.approx(slope, rel=1e-9)
    assert fitted_intercept == pytest.approx(intercept, rel=1e-9, abs=1e-6)
    two = fit_line(points[:2])
    assert two == pytest.approx((intercept, slope), rel=1e-9, abs=1e-6)


def test_fit_line_degenerate_inputs() -> None:
    assert fit_line([(4, 400)]) == (0.0, 100.0)  # one point: through the origin
    assert fit_line([(3, 10), (3, 20)]) == (15.0, 0.0)  # no spread in batch: flat line


def test_batch_curve_max_batch_inverts_peak_at() -> None:
    curve = BatchCurve(intercept_bytes=1000.0, slope_bytes_per_sample=100.0, points=[])
    for b in (0, 1, 7, 123, 10_000):
        limit = curve.peak_at(b)
        assert curve.max_batch(limit) == b  # exactly at the limit fits
        assert curve.max_batch(limit - 1) == max(b - 1, 0)
        assert curve.max_batch(limit + 99) == b
    assert curve.max_batch(999) == 0  # limit below the intercept: nothing fits
    assert curve.max_batch(-5) == 0


def test_batch_curve_flat_or_negative_slope_is_unbounded() -> None:
    assert BatchCurve(10.0, 0.0, []).max_batch(100) == 2**31
    assert BatchCurve(10.0, -1.0, []).max_batch(100) == 2**31


# --------------------------------------------------------------------------- predict_max_batch


def assert_on_boundary(spec: ExperimentSpec, base: Candidate, b: int, limit: int,
                       step: int = 1) -> None:
    assert peak(spec, base.with_batch(b)) <= limit < peak(spec, base.with_batch(b + step))


@pytest.mark.parametrize("limit_mib", [1, 3, 10])
def test_predict_max_batch_is_the_traced_boundary(limit_mib: int) -> None:
    spec = mlp_tensor_spec(batch_size={"min": 64})
    base = Candidate(batch_size=64, input_size=0)
    limit = limit_mib * 2**20
    result = predict_max_batch(spec, base, CPU, limit)
    b = result.batch_size
    assert b > 64
    assert_on_boundary(spec, base, b, limit)
    assert result.estimate is not None and result.estimate.peak_bytes <= limit
    assert result.traces == sum(not e.derived for e in result.estimates.values()) <= 12
    assert result.curve.slope_bytes_per_sample > 0


def test_predict_max_batch_gpt_boundary() -> None:
    model = {"_target_": "autofit.zoo.gpt", "n_layer": 2, "n_embd": 64, "n_head": 2,
             "vocab_size": 64, "block_size": 64}
    spec = make_spec(model, {"kind": "tokens", "vocab_size": 64, "seq_len": 64},
                     search={"batch_size": {"min": 8}})
    base = Candidate(batch_size=8, input_size=64)
    limit = 16 * 2**20
    b = predict_max_batch(spec, base, CPU, limit).batch_size
    assert b > 8
    assert_on_boundary(spec, base, b, limit)


def test_predict_max_batch_multiple_of() -> None:
    spec = mlp_tensor_spec(batch_size={"min": 64, "multiple_of": 8})
    base = Candidate(batch_size=64, input_size=0)
    limit = 3 * 2**20
    b = predict_max_batch(spec, base, CPU, limit).batch_size
    assert b % 8 == 0 and b > 64
    assert_on_boundary(spec, base, b, limit, step=8)


def test_predict_max_batch_capped_by_spec_max() -> None:
    spec = mlp_tensor_spec(batch_size={"min": 64, "max": 100})
    base = Candidate(batch_size=64, input_size=0)
    assert predict_max_batch(spec, base, CPU, 2**30).batch_size == 100


def test_predict_max_batch_nothing_fits() -> None:
    spec = mlp_tensor_spec()
    base = Candidate(batch_size=1, input_size=0)
    limit = peak(spec, base) - 1
    result = predict_max_batch(spec, base, CPU, limit)
    assert result.batch_size == 0
    assert result.estimate is None


def test_predict_max_batch_when_peak_phase_changes() -> None:
    """Regression: the first two traces (batch 1, 2) peak in the optimizer step, with a far
    flatter slope than the backward peak of large batches. Re-fitting on the two traces nearest
    the limit in bytes kept that flat line and walked down one batch per trace from a huge
    overshoot, returning 2 instead of ~1093."""
    spec = mlp_tensor_spec()  # batch_size.min 1
    base = Candidate(batch_size=1, input_size=0)
    assert estimate(spec, base, CPU).breakdown.peak_phase == "optimizer"
    assert estimate(spec, base.with_batch(512), CPU).breakdown.peak_phase == "backward"
    limit = 3 * 2**20
    result = predict_max_batch(spec, base, CPU, limit)
    assert result.batch_size > 1000
    assert_on_boundary(spec, base, result.batch_size, limit)
    assert result.traces <= 12


# --------------------------------------------------------------------------- big models


def test_billion_parameter_model_estimates_without_its_memory() -> None:
    spec = make_spec({"_target_": "autofit.zoo.gpt", "preset": "gpt2-xl"},
                     {"kind": "tokens", "vocab_size": 50304, "seq_len": 128})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    result = estimate(spec, Candidate(batch_size=1, input_size=128), CPU)
    seconds = time.perf_counter() - start
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert result.param_count > 1.5e9
    # fp32 params + grads + two AdamW states alone are 16 bytes per parameter
    assert result.peak_bytes > 1.5e9 * 4 * 4
    assert result.breakdown.params_bytes >= 4 * result.param_count
    assert result.breakdown.optimizer_state_bytes >= 8 * result.param_count
    assert rss_growth < 2 * 2**30, rss_growth
    assert seconds < 120
