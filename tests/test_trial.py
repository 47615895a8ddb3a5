"""Tests for autofit.trial / autofit.worker: real trials in isolated processes, all on CPU.

Fault-injection models live in ``tests/faults.py`` (``faults.X`` import paths in the spec).
Every trial is tiny (< 1 s) except the hang, which is killed by a 3 s timeout.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any

import pytest
import torch

from autofit.candidate import Candidate
from autofit.predict import estimate, predict_max_batch
from autofit.predict.device_model import CPU
from autofit.spec import ExperimentSpec, spec_from_dict
from autofit.trials import TrialResult, TrialStatus, run_trial
from autofit.trials.oom import is_oom_error

LIMIT = 64 * 2**20
"""Budget of the fault trials; faults.HUGE_BYTES (256 MiB) is far above it."""


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_spec(model_target: str, **overrides: Any) -> ExperimentSpec:
    """A CPU spec for ``model_target`` on (B, 16) tensors with 4 classes; overrides merge."""
    model: Any = {"_target_": model_target, **overrides.pop("model_kwargs", {})}
    raw = {
        "name": "trial-test",
        "model": model,
        "data": {"kind": "tensor", "shape": [16], "num_classes": 4},
        "device": "cpu",
        "search": {"steps_per_trial": 1, "warmup_steps": 2, "timeout_s": 60},
    }
    return spec_from_dict(_merge(raw, overrides))


def cand(batch: int = 4, precision: str = "fp32") -> Candidate:
    return Candidate(batch_size=batch, input_size=0, precision=precision)


@pytest.fixture(scope="module", autouse=True)
def warm_fork_server() -> None:
    """Start the fork server once, so per-test timings do not include the torch import."""
    result = run_trial(make_spec("faults.Tiny"), cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.FITS, result.message


def assert_healthy_trial_still_works() -> None:
    result = run_trial(make_spec("faults.Tiny"), cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.FITS, result.message
    assert result.steps_run == 3
    assert result.memory is not None and 0 < result.memory.peak_bytes <= LIMIT


# --------------------------------------------------------------------------- the boundary


def test_predicted_boundary_fits_and_one_more_sample_ooms() -> None:
    # from batch 1: small batches peak in the optimizer step, large ones in backward
    # (test_predict.test_predict_max_batch_when_peak_phase_changes)
    spec = make_spec("autofit.zoo.mlp",
                     model_kwargs={"in_features": 16, "hidden": 128, "depth": 2, "out_features": 4})
    limit = 3 * 2**20
    pred = predict_max_batch(spec, cand(1), CPU, limit)
    b = pred.batch_size
    assert 64 < b < 65536
    predicted = pred.estimates[b] if b in pred.estimates else estimate(spec, cand(b), CPU)

    at = run_trial(spec, cand(b), limit_bytes=limit)
    assert at.status is TrialStatus.FITS, at.message
    assert at.limit_kind == "cpu-budget"
    assert at.peak_bytes is not None and at.peak_bytes <= limit
    assert at.peak_bytes == pytest.approx(predicted.peak_bytes, rel=0.03)

    above = run_trial(spec, cand(b + 1), limit_bytes=limit)
    assert above.status is TrialStatus.OOM, above.message
    assert above.limit_kind == "cpu-budget"
    assert above.phase in ("data", "forward", "backward", "optimizer", "zero_grad")
    assert "out of memory" in above.message


def test_fits_result_is_complete() -> None:
    result = run_trial(make_spec("faults.Tiny"), cand(8), limit_bytes=LIMIT)
    assert result.fits
    assert result.steps_run == 3  # warmup 2 + 1 timed
    assert result.step_time_s is not None and result.step_time_s > 0
    assert result.samples_per_s is not None and result.samples_per_s > 0
    assert result.loss is not None and math.isfinite(result.loss)
    assert result.memory is not None
    # params (16*4+4 floats) are in the breakdown, the optimizer (AdamW) holds 2 states each
    assert result.memory.params_bytes == (16 * 4 + 4) * 4
    assert result.memory.peak_phase in ("forward", "backward", "optimizer", "data", "zero_grad")
    assert result.extra.get("optimizer_state") is True
    roundtrip = TrialResult.from_dict(result.to_dict())
    assert roundtrip.status is TrialStatus.FITS and roundtrip.peak_bytes == result.peak_bytes


# --------------------------------------------------------------------------- OOM by phase


@pytest.mark.parametrize(
    ("target", "overrides", "phase"),
    [
        ("faults.OomForward", {}, "forward"),
        ("faults.OomBackward", {}, "backward"),
        ("faults.Tiny", {"optimizer": {"_target_": "faults.OomOptimizer", "lr": 0.1}}, "optimizer"),
    ],
    ids=["forward", "backward", "optimizer"],
)
def test_oom_in_each_phase(target: str, overrides: dict[str, Any], phase: str) -> None:
    result = run_trial(make_spec(target, **overrides), cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.OOM, result.message
    assert result.phase == phase
    assert result.limit_kind == "cpu-budget"
    assert f"out of memory in {phase}" in result.message
    assert result.memory is not None and result.memory.peak_bytes > LIMIT


def test_huge_allocation_fits_under_a_larger_limit() -> None:
    # the same huge allocation under a limit above it is not an OOM (the budget is the cause)
    result = run_trial(make_spec("faults.OomForward"), cand(), limit_bytes=2**30)
    assert result.status is TrialStatus.FITS, result.message


# --------------------------------------------------------------------------- user errors


def test_shape_error_is_an_error_not_oom() -> None:
    result = run_trial(make_spec("faults.ShapeError"), cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.ERROR
    assert result.phase == "forward"
    assert "RuntimeError" in result.message
    assert "mat1 and mat2 shapes cannot be multiplied" in result.message
    assert "mat1 and mat2" in result.extra.get("traceback", "")


def test_error_in_constructor() -> None:
    result = run_trial(make_spec("faults.RaisesInInit"), cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.ERROR
    assert "bad width" in result.message
    assert result.phase == "setup"


def test_nan_loss_still_fits_with_warning() -> None:
    result = run_trial(make_spec("faults.NanLoss"), cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.FITS, result.message
    assert "NaN" in result.warning
    assert result.memory is not None and result.memory.peak_bytes > 0


# --------------------------------------------------------------------------- dead processes


def test_hang_times_out_quickly() -> None:
    start = time.perf_counter()
    result = run_trial(make_spec("faults.Hang"), cand(), limit_bytes=LIMIT, timeout_s=3)
    elapsed = time.perf_counter() - start
    assert result.status is TrialStatus.TIMEOUT
    assert "3 s" in result.message
    assert 3 <= elapsed < 10
    assert result.wall_time_s >= 3


def test_self_kill_is_crashed_with_sigkill() -> None:
    result = run_trial(make_spec("faults.SelfKill"), cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.CRASHED
    assert "SIGKILL" in result.message


def test_segfault_is_crashed_with_sigsegv() -> None:
    result = run_trial(make_spec("faults.Segfault"), cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.CRASHED
    assert "SIGSEGV" in result.message


def test_process_survives_faults_and_trials_still_work() -> None:
    pid = os.getpid()
    for target in ("faults.SelfKill", "faults.Segfault", "faults.ShapeError", "faults.OomForward"):
        result = run_trial(make_spec(target), cand(), limit_bytes=LIMIT)
        assert result.status is not TrialStatus.FITS
    assert os.getpid() == pid
    assert_healthy_trial_still_works()


def test_trial_after_timeout_still_works() -> None:
    result = run_trial(make_spec("faults.Hang"), cand(), limit_bytes=LIMIT, timeout_s=1)
    assert result.status is TrialStatus.TIMEOUT
    assert_healthy_trial_still_works()


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trials_fit(precision: str) -> None:
    spec = make_spec("faults.Tiny", search={"steps_per_trial": 2, "warmup_steps": 2})
    result = run_trial(spec, cand(8, precision), limit_bytes=LIMIT)
    assert result.status is TrialStatus.FITS, result.message
    assert result.candidate.precision == precision
    assert result.steps_run >= spec.search.warmup_steps + spec.search.steps_per_trial
    assert result.extra.get("optimizer_state") is True
    assert result.warning == ""


# --------------------------------------------------------------------------- OOM classification


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                      "can't allocate memory: you tried to allocate 268435456 bytes."), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x16 and 3x5)"), False),
        (ValueError("out of memory"), False),
        (MemoryError(), True),
    ],
    ids=["torch-oom", "cpu-allocator", "shape-error", "value-error", "memory-error"],
)
def test_is_oom_error(exc: BaseException, expected: bool) -> None:
    oom, kind = is_oom_error(exc)
    assert oom is expected
    if not expected:
        assert kind is None


def test_is_oom_error_kinds() -> None:
    from autofit.memory import BudgetExceeded

    assert is_oom_error(BudgetExceeded("over")) == (True, "cpu-budget")
    assert is_oom_error(torch.OutOfMemoryError("x")) == (True, None)  # the limit the trial ran under
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))[1] \
        == "rlimit"


# --------------------------------------------------------------------------- rlimit backend


def test_rlimit_backend_reports_oom() -> None:
    spec = make_spec("faults.OomForward", memory={"cpu_limit": "rlimit"})
    assert spec.memory.cpu_limit == "rlimit"
    result = run_trial(spec, cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.OOM, result.message
    assert result.limit_kind == "rlimit"
    assert result.phase == "forward"
    assert "can't allocate memory" in result.message


def test_rlimit_backend_lets_a_small_model_fit() -> None:
    spec = make_spec("faults.Tiny", memory={"cpu_limit": "rlimit"})
    result = run_trial(spec, cand(), limit_bytes=LIMIT)
    assert result.status is TrialStatus.FITS, result.message
    assert result.limit_kind == "rlimit"


def test_fork_server_preload_asks_for_each_missing_framework_once() -> None:
    """``ForkServer.preload`` sends the server only known frameworks it has not been asked
    for (the spec loaded them after the server started), each once, and nothing to a dead
    server; the server imports them before its next fork, with no reply on the protocol."""
    import io
    import json

    from autofit.trials.forkserver import FRAMEWORKS, ForkServer

    class Proc:
        def __init__(self) -> None:
            self.stdin = io.BytesIO()
            self.code: int | None = None

        def poll(self) -> int | None:
            return self.code

    server = ForkServer.__new__(ForkServer)
    server.proc, server.preloaded = Proc(), {"transformers"}
    server.preload(("transformers", "lightning.pytorch", "wave"))
    server.preload(("lightning.pytorch",))
    sent = [json.loads(line) for line in server.proc.stdin.getvalue().decode().splitlines()]
    assert sent == [{"kind": "preload", "modules": ["lightning.pytorch"]}]
    assert "wave" not in FRAMEWORKS and server.preloaded == {"transformers", "lightning.pytorch"}
    server.proc.code = 0  # exited: nothing is written
    server.preload(("pytorch_lightning",))
    assert len(server.proc.stdin.getvalue().decode().splitlines()) == 1
