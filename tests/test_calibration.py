"""Probe calibration (issue 14): the trace and a real run compared op by op.

``WorkspaceNet`` injects a fake-vs-real mismatch with no LSTM: a custom op whose real kernel
returns a workspace of ``WORKSPACE_PER_ELEMENT`` bytes per input element, saved for backward,
while its fake kernel returns an empty one (as ``aten.mkldnn_rnn_layer``'s does).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from autofit.candidate import Candidate
from autofit.memory import MemoryTracker
from autofit.predict import cache as trace_cache
from autofit.predict import calibrate as C
from autofit.predict.device_model import CPU
from autofit.predict.trace import estimate, trace
from autofit.spec import spec_from_dict
from autofit.trials.child import run_in_child
from autofit.trials.result import TrialResult

WORKSPACE_PER_ELEMENT = 24


@torch.library.custom_op("autofit_test::scale_ws", mutates_args=())
def scale_ws(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a C++ kernel's insides never reach dispatch; hide this Python kernel's insides too
    with _disable_current_modes():
        return x * 2, torch.zeros(x.numel() * WORKSPACE_PER_ELEMENT, dtype=torch.uint8)


@scale_ws.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(0, dtype=torch.uint8)  # under-reports


def _setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    ctx.save_for_backward(output[1])  # the workspace lives until backward, as cuDNN's does
    ctx.set_materialize_grads(False)  # no zero gradient the size of the workspace


def _backward(ctx, grad, _grad_ws):  # type: ignore[no-untyped-def]
    return grad * 2


scale_ws.register_autograd(_backward, setup_context=_setup)


class WorkspaceNet(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = torch.ops.autofit_test.scale_ws(self.a(x))
        return self.b(torch.relu(y))


def workspace_net() -> nn.Module:
    return WorkspaceNet()


WS_RAW = {"name": "ws", "model": {"_target_": "test_calibration.workspace_net"},
          "data": {"kind": "tensor", "shape": [64], "num_classes": 4}, "loss": "mse",
          "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.01}, "device": "cpu",
          "memory": {"budget": "1GiB"}}

LSTM_RAW = {"name": "lstm", "model": {"_target_": "autofit.zoo.lstm_lm", "vocab_size": 2000,
                                      "dim": 128, "num_layers": 2},
            "data": {"kind": "tokens", "vocab_size": 2000, "seq_len": 64},
            "loss": "cross_entropy", "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
            "device": "cpu", "memory": {"budget": "1GiB"}}


def _real(raw: dict, candidate: Candidate) -> TrialResult:
    """A real trial, in this process (the child's own code, without the fork)."""
    result = TrialResult.from_dict(run_in_child(
        {"spec": raw, "candidate": candidate.to_dict(), "device": "cpu", "limit_bytes": None,
         "warmup_steps": 2, "steps": 1}))
    assert result.fits, result.message
    return result


def _error(predicted: int, measured: int) -> float:
    return (predicted - measured) / measured


@pytest.fixture(scope="module")
def ws_spec():  # type: ignore[no-untyped-def]
    try:
        return spec_from_dict(WS_RAW)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"spec did not load: {exc}")


# ------------------------------------------------------------------ the allocation log
def test_tracker_logs_new_storages_per_phase_op_and_output() -> None:
    tracker = MemoryTracker()
    x = torch.ones(8, 8)
    with tracker:
        y = x + 1  # new storage: aten.add#0
        y.add_(1)  # in place: no new storage
        z = torch.ops.aten.var_mean(y, dim=0)  # two outputs
    assert tracker.op_log["setup|aten.add#0"] == [1, 256]
    assert tracker.op_log["setup|aten.var_mean#0"] == [1, 32]
    assert tracker.op_log["setup|aten.var_mean#1"] == [1, 32]
    assert not any("add_" in k for k in tracker.op_log)
    del z


def test_tracker_correction_adds_bytes_even_to_an_empty_fake_output() -> None:
    plain, corrected = MemoryTracker(), MemoryTracker(corrections={"aten.new_empty#0": 1000})
    x = torch.ones(4)
    for tracker in (plain, corrected):
        with tracker:
            ws = x.new_empty(0)
        del ws
    assert plain.peak_bytes == 0
    assert corrected.peak_bytes == 1000
    assert corrected.op_log["setup|aten.new_empty#0"] == [1, 0]  # the log stays uncorrected


def test_compare_finds_the_injected_op_and_ignores_matching_ones() -> None:
    traced = {"forward|aten.mm#0": [4, 4000], "forward|my.op#1": [2, 0],
              "backward|aten.mm#0": [4, 4000]}
    real = {"forward|aten.mm#0": [6, 6000], "forward|my.op#1": [3, 3_000_000],
            "backward|aten.mm#0": [6, 6000]}
    diffs, one_sided = C.compare(traced, real, traced_steps=2, measured_bytes=10_000_000)
    assert [d.op for d in diffs] == ["my.op#1"]
    assert diffs[0].real_per_call == 1_000_000 and diffs[0].traced_per_call == 0
    assert diffs[0].calls_per_step == 1
    assert one_sided == []
    _, one_sided = C.compare(traced, {**real, "forward|other.op#0": [3, 3_000_000]},
                             traced_steps=2, measured_bytes=10_000_000)
    assert one_sided == ["other.op#0 (real only)"]


def test_one_probe_is_proportional_two_probes_affine() -> None:
    corr = C.OpCorrection("x.op#0", probes=[C.OpProbe(16, 64, 1024, 1, 0, 8192)])
    corr.refit()
    assert corr.intercept == 0 and corr.bytes_per_call(2048) == 16384
    corr.probes.append(C.OpProbe(32, 64, 2048, 1, 0, 8192 * 2 - 1000 + 1000))
    corr.probes[-1].real_per_call = 1000 + 8 * 2048
    corr.probes[0].real_per_call = 1000 + 8 * 1024
    corr.refit()
    assert corr.intercept == pytest.approx(1000) and corr.slope == pytest.approx(8)


# ------------------------------------------------------------------ injected mismatch, end to end
def test_injected_mismatch_is_found_corrected_and_extrapolated(ws_spec, one_thread) -> None:  # type: ignore[no-untyped-def]
    probe = Candidate(batch_size=64, input_size=0)
    real = _real(WS_RAW, probe)
    before = estimate(ws_spec, probe, CPU)
    missing = 64 * 64 * WORKSPACE_PER_ELEMENT
    assert real.memory.peak_bytes - before.peak_bytes >= missing * 0.9  # the trace misses it

    store = C.CalibrationStore()
    cal = C.calibrate_from_trial(ws_spec, real, CPU, store)
    assert list(cal.ops) == ["autofit_test.scale_ws#1"]
    corr = cal.ops["autofit_test.scale_ws#1"]
    assert corr.at_peak_bytes == missing
    assert "autofit_test.scale_ws (output 1): fake kernel under-reports by" in cal.messages[0]
    assert "at batch 64" in cal.messages[0] and cal.messages[0].endswith("corrected")
    assert cal.unexplained_slope == 0

    with C.using(store):
        after = estimate(ws_spec, probe, CPU)
        bigger = estimate(ws_spec, probe.with_batch(256), CPU)
    assert abs(_error(after.peak_bytes, real.memory.peak_bytes)) < 0.01
    real_big = _real(WS_RAW, probe.with_batch(256))
    assert abs(_error(bigger.peak_bytes, real_big.memory.peak_bytes)) < 0.01
    # outside the scope, and for another precision, nothing is applied
    assert estimate(ws_spec, probe, CPU).peak_bytes == before.peak_bytes
    assert store.applied(ws_spec, Candidate(batch_size=64, input_size=0, precision="bf16"),
                         "cpu") is None


def test_unexplained_total_is_said_and_the_measured_slope_used(ws_spec, one_thread) -> None:  # type: ignore[no-untyped-def]
    probe = Candidate(batch_size=32, input_size=0)
    tracker, _, _ = trace(ws_spec, probe, CPU)
    measured = int(tracker.peak_bytes * 1.10)  # same ops, 10 % more: nothing explains it
    store = C.CalibrationStore()
    cal = C.calibrate(ws_spec, probe, CPU, dict(tracker.op_log), measured, store)
    assert not cal.ops
    assert "no op explains it" in cal.messages[-1] and "using the measured slope" in cal.messages[-1]
    assert cal.unexplained_slope == pytest.approx((measured - tracker.peak_bytes) / 32)
    with C.using(store):
        after = estimate(ws_spec, probe, CPU)
    assert abs(_error(after.peak_bytes, measured)) < 0.001
    assert after.breakdown.peak_bytes == after.peak_bytes


def test_store_round_trips_and_keys_corrected_traces_apart(ws_spec, tmp_path, one_thread) -> None:  # type: ignore[no-untyped-def]
    probe = Candidate(batch_size=16, input_size=0)
    store = C.CalibrationStore()
    C.calibrate_from_trial(ws_spec, _real(WS_RAW, probe), CPU, store)
    store.save(tmp_path / "calibration.json")
    loaded = C.CalibrationStore.load(tmp_path / "calibration.json")
    assert loaded.to_dict() == json.loads(json.dumps(store.to_dict()))
    cache = trace_cache.TraceCache(tmp_path / "cache")
    with trace_cache.using(cache):
        plain = estimate(ws_spec, probe, CPU)
        with C.using(loaded):
            corrected = estimate(ws_spec, probe, CPU)
            again = estimate(ws_spec, probe, CPU)
    assert corrected.peak_bytes > plain.peak_bytes
    assert again.cached and again.peak_bytes == corrected.peak_bytes
    # a CUDA-kind target of the same precision borrows the CPU probe's corrections
    assert loaded.find(probe, "cuda") is loaded.calibrations["fp32/0/cpu"]


def test_trial_result_carries_the_allocation_log() -> None:
    data = {"candidate": Candidate(batch_size=2, input_size=0).to_dict(), "status": "fits",
            "op_log": {"forward|aten.mm#0": [2, 64]}}
    result = TrialResult.from_dict(data)
    assert result.op_log == {"forward|aten.mm#0": [2, 64]}
    assert TrialResult.from_dict(result.to_dict()).op_log == result.op_log


# ------------------------------------------------------------------ the LSTM case (issue 14)
def test_lstm_estimate_after_calibration_matches_the_trial(one_thread) -> None:  # type: ignore[no-untyped-def]
    spec = spec_from_dict(LSTM_RAW)
    probe = Candidate(batch_size=16, input_size=64)
    real = _real(LSTM_RAW, probe)
    before = estimate(spec, probe, CPU)
    assert _error(before.peak_bytes, real.memory.peak_bytes) < -0.15  # the fake kernel's hole
    assert any("aten.mkldnn_rnn_layer" in line for line in C.known_misreporting(
        trace(spec, probe, CPU)[0].op_log))

    store = C.CalibrationStore()
    cal = C.calibrate_from_trial(spec, real, CPU, store)
    assert [c.name for c in cal.ops.values()] == ["aten.mkldnn_rnn_layer"]
    assert "aten.mkldnn_rnn_layer (output 3): fake kernel under-reports by" in cal.messages[0]
    with C.using(store):
        after = estimate(spec, probe, CPU)
        other = Candidate(batch_size=24, input_size=96)  # another batch and input size
        after_other = estimate(spec, other, CPU)
    assert abs(_error(after.peak_bytes, real.memory.peak_bytes)) < 0.03
    real_other = _real(LSTM_RAW, other)
    assert abs(_error(after_other.peak_bytes, real_other.memory.peak_bytes)) < 0.03


# ------------------------------------------------------------------ tune: calibrated on its first fit
def _in_process_runner(spec, candidate, *, limit_bytes=None, steps=None, warmup_steps=None,  # type: ignore[no-untyped-def]
                       timeout_s=None, device=None):
    return TrialResult.from_dict(run_in_child(
        {"spec": spec.raw, "candidate": candidate.to_dict(), "device": "cpu",
         "limit_bytes": limit_bytes, "cpu_limit": "budget",
         "warmup_steps": 2 if warmup_steps is None else warmup_steps,
         "steps": 1 if steps is None else steps}))


def test_tune_calibrates_on_its_first_fit_and_keeps_it(tmp_path, one_thread) -> None:  # type: ignore[no-untyped-def]
    from autofit.search.tuner import run_search

    raw = {**WS_RAW, "memory": {"budget": "4MiB", "margin": 0.0},
           "search": {"batch_size": {"min": 8, "max": 4096}, "verify_steps": 2},
           "targets": [{"name": "small", "memory": "1GiB"}]}
    spec = spec_from_dict(raw)
    result = run_search(spec, out_dir=tmp_path, runner=_in_process_runner)
    assert "fp32/0/cpu" in result.calibration["settings"]
    assert any(n.startswith("calibration: autofit_test.scale_ws (output 1): fake kernel "
                            "under-reports") for n in result.notes)
    trials = result.trials
    first_fit = next(i for i, t in enumerate(trials) if t.result.fits)
    for record in trials[first_fit + 1:]:  # every later prediction is the corrected one
        if record.result.fits:
            assert abs(_error(record.predicted_peak_bytes, record.result.peak_bytes)) < 0.01
    note = result.targets[0]["note"]
    assert "trace corrected by the probe calibration (" in note and "autofit_test.scale_ws" in note
    assert "calibration" in result.to_dict()
    kept = C.load_for(spec, tmp_path)  # what --resume and later estimates read
    assert kept.to_dict() == result.calibration


# ------------------------------------------------------------------ CUDA-native traces
def test_cuda_targets_fall_back_to_fake_cpu_tensors_without_a_cuda_build(monkeypatch) -> None:
    from autofit.predict import cuda_native
    from autofit.predict.device_model import CUDA_DEFAULT

    assert cuda_native.trace_device(CPU).type == "cpu"
    monkeypatch.setenv(cuda_native.ENV, "native")
    expected = "cuda" if cuda_native.cuda_build() else "cpu"  # never forced on a CPU build
    assert cuda_native.trace_device(CUDA_DEFAULT).type == expected
    monkeypatch.setenv(cuda_native.ENV, "cpu")
    assert cuda_native.trace_device(CUDA_DEFAULT).type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_native_trace_matches_max_memory_allocated(precision: str) -> None:
    from autofit.predict import cuda_native
    from autofit.predict.device_model import device_model_for
    from autofit.trials import run_trial

    raw = {"name": "gpu-gpt", "model": {"_target_": "autofit.zoo.gpt", "n_layer": 4,
                                        "n_embd": 256, "n_head": 4, "vocab_size": 4096,
                                        "block_size": 256},
           "data": {"kind": "tokens", "vocab_size": 4096, "seq_len": 256}, "device": "cuda",
           "search": {"steps_per_trial": 2}}
    spec = spec_from_dict(raw)
    model = device_model_for("cuda", torch.cuda.get_device_name())
    assert cuda_native.trace_device(model).type == "cuda"
    cand = Candidate(batch_size=16, input_size=256, precision=precision)
    tracker, _, _ = trace(spec, cand, model)
    assert any("flash" in k or "efficient" in k or "cudnn" in k
               for k in tracker.op_log) or precision == "fp32"  # the GPU's attention kernel
    result = run_trial(spec, cand, device="cuda")
    assert result.fits, result.message
    predicted = estimate(spec, cand, model)
    assert abs(_error(predicted.allocated_bytes, result.memory.peak_bytes)) < 0.05


# ------------------------------------------------------------------ autofit estimate --calibrate
def test_estimate_calibrate_probes_prints_and_keeps_the_corrections(tmp_path, one_thread) -> None:  # type: ignore[no-untyped-def]
    from autofit.api import estimate as api_estimate

    raw = {**LSTM_RAW, "output": {"dir": str(tmp_path / "out")},
           "search": {"batch_size": {"min": 8, "max": 512}}}
    plain = api_estimate(raw, max_batch=False, cache=False)
    assert any(line.startswith("aten.mkldnn_rnn_layer: ") and "--calibrate" in line
               for line in plain.calibration)  # named without a probe
    probed = api_estimate(raw, max_batch=False, cache=False, calibrate=True)
    assert probed.calibration[0].startswith("aten.mkldnn_rnn_layer (output 3): fake kernel "
                                            "under-reports by")
    assert probed.estimate.peak_bytes > plain.estimate.peak_bytes
    assert (tmp_path / "out" / C.CALIBRATION_FILE).exists()
    later = api_estimate(raw, max_batch=False, cache=False, batch_size=8)
    assert later.estimate.peak_bytes == probed.estimate.peak_bytes
    assert later.calibration[0].startswith("using the probe calibration in ")
    assert later.to_dict()["calibration"] == later.calibration
    changed = {**raw, "model": {**raw["model"], "dim": 96}}  # another model: not reused
    assert not any(line.startswith("using") for line in
                   api_estimate(changed, max_batch=False, cache=False).calibration)


# ------------------------------------------------------------------ the allocator's reserve
def test_reserve_is_calibrated_per_setting_from_the_probe(ws_spec, one_thread) -> None:  # type: ignore[no-untyped-def]
    from autofit.predict.device_model import CUDA_DEFAULT

    probe = Candidate(batch_size=256, input_size=0)
    tracker, _, _ = trace(ws_spec, probe, CUDA_DEFAULT)
    allocated = CUDA_DEFAULT.allocated(tracker.peak_bytes, tracker.uses_blas)
    reserved = int(allocated * 1.25)  # an allocator that holds a quarter more than it hands out
    before = estimate(ws_spec, probe, CUDA_DEFAULT)
    assert _error(before.reserved_bytes, reserved) < -0.05
    store = C.CalibrationStore()
    cal = C.calibrate(ws_spec, probe, CUDA_DEFAULT, dict(tracker.op_log), allocated, store,
                      measured_reserved=reserved)
    assert cal.reserve_ratio == pytest.approx(1.25, rel=1e-6)
    assert any(m.startswith("allocator reserve at batch=256 fp32: measured 1.250 x")
               for m in cal.messages)
    with C.using(store):
        after = estimate(ws_spec, probe, CUDA_DEFAULT)
    assert abs(_error(after.reserved_bytes, reserved)) < 0.03
    assert after.allocated_bytes == before.allocated_bytes  # nothing else was wrong
    assert store.applied(ws_spec, probe, "cpu") is None  # a CUDA reserve says nothing of CPU


# ------------------------------------------------------------------ the CPU allocator's view
SCRATCH_BYTES = 8 * 2**20


@torch.library.custom_op("autofit_test::scratch_relu", mutates_args=())
def scratch_relu(x: torch.Tensor) -> torch.Tensor:
    # as a oneDNN kernel's scratch: allocated, written, freed before the op returns, never
    # an output, so dispatch (and the tracker) never sees it; the CPU allocator does
    with _disable_current_modes():
        scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8)
        scratch.fill_(1)
        del scratch
        return torch.relu(x)


@scratch_relu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _scratch_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    ctx.save_for_backward(output)


def _scratch_backward(ctx, grad):  # type: ignore[no-untyped-def]
    (out,) = ctx.saved_tensors
    return grad * (out > 0)


scratch_relu.register_autograd(_scratch_backward, setup_context=_scratch_setup)


class ScratchNet(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.ops.autofit_test.scratch_relu(self.a(x)))


def scratch_net() -> nn.Module:
    return ScratchNet()


SCRATCH_RAW = {**WS_RAW, "name": "scratch", "model": {"_target_": "test_calibration.scratch_net"}}


def _real_with_allocator_view(raw: dict, candidate: Candidate) -> TrialResult:
    data = run_in_child({"spec": raw, "candidate": candidate.to_dict(), "device": "cpu",
                         "limit_bytes": None, "warmup_steps": 2, "steps": 1,
                         "allocator_view": True})
    result = TrialResult.from_dict(data)
    assert result.fits, result.message
    result.extra = {k: data[k] for k in ("allocator_peak_bytes", "allocator_peak_op")}
    return result


def test_allocator_view_sees_scratch_dispatch_never_sees(one_thread) -> None:  # type: ignore[no-untyped-def]
    spec = spec_from_dict(SCRATCH_RAW)
    probe = Candidate(batch_size=8, input_size=0)
    real = _real_with_allocator_view(SCRATCH_RAW, probe)
    tracked, allocated = real.memory.peak_bytes, real.extra["allocator_peak_bytes"]
    assert tracked < SCRATCH_BYTES / 10  # the tracker never sees the scratch
    assert abs(allocated - tracked - SCRATCH_BYTES) < 0.02 * SCRATCH_BYTES
    assert real.extra["allocator_peak_op"] == "autofit_test::scratch_relu"
    assert abs(_error(estimate(spec, probe, CPU).peak_bytes, tracked)) < 0.01  # trace == tracker

    store = C.CalibrationStore()
    cal = C.calibrate_from_trial(spec, real, CPU, store)
    assert not cal.ops and not cal.unexplained_slope  # no op output is wrong: nothing per op
    line = next(m for m in cal.messages if m.startswith("allocator view at batch=8"))
    assert "inside autofit_test::scratch_relu" in line and "cpu_limit: rlimit" in line
    other = Candidate(batch_size=64, input_size=0)
    real_other = _real_with_allocator_view(SCRATCH_RAW, other)
    # the budget limit counts tracked tensors: no scratch added
    assert store.applied(spec, other, "cpu") is None
    # the rlimit limit is the allocator: the scratch is added, within 3% of its view
    rlimit = spec_from_dict({**SCRATCH_RAW, "memory": {"budget": "1GiB", "cpu_limit": "rlimit"}})
    with C.using(store):
        before = estimate(rlimit, other, CPU).peak_bytes
    with C.using(C.CalibrationStore.from_dict(json.loads(json.dumps(store.to_dict())))):
        after = estimate(rlimit, other, CPU).peak_bytes
    assert before == after  # the round trip keeps it
    assert _error(estimate(rlimit, other, CPU).peak_bytes,
                  real_other.extra["allocator_peak_bytes"]) < -0.5
    assert abs(_error(after, real_other.extra["allocator_peak_bytes"])) < 0.03


def test_scratch_fit_one_probe_constant_two_affine_never_negative() -> None:
    cal = C.Calibration("fp32/0/cpu")
    cal.allocator = [C.AllocatorProbe(8, 32, 256, 10_000_000, 10_500_000, "aten::convolution_backward")]
    cal.refit_scratch()
    assert cal.scratch_bytes(256) == cal.scratch_bytes(4096) == 500_000
    cal.allocator.append(C.AllocatorProbe(16, 32, 512, 20_000_000, 20_700_000, ""))
    cal.refit_scratch()
    assert cal.scratch_bytes(256) == 500_000 and cal.scratch_bytes(768) == 900_000
    cal.allocator = [C.AllocatorProbe(4, 1, 4, 100, 900, ""), C.AllocatorProbe(8, 1, 8, 200, 500, "")]
    cal.refit_scratch()
    assert cal.scratch_bytes(64) == 0  # a falling fit stops at no scratch
    assert C.Calibration.from_dict(cal.to_dict()).scratch_bytes(6) == cal.scratch_bytes(6) == 550


# ------------------------------------------------------------------ GRU: no mkldnn path on CPU
GRU_RAW = {"name": "gru", "model": {"_target_": "autofit.zoo.gru_seq2seq", "vocab_size": 50,
                                    "dim": 32, "num_layers": 2, "bidirectional": True},
           "data": {"kind": "tokens", "vocab_size": 50, "seq_len": 8,
                    "batch": {"src": "tokens", "tgt": "tokens"}},
           "loss": "model", "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
           "device": "cpu", "memory": {"budget": "1GiB"}}


def test_gru_seq2seq_needs_no_correction_on_cpu(one_thread) -> None:  # type: ignore[no-untyped-def]
    """CPU GRUs (bidirectional, multi-layer, batch_first) run as plain ATen ops, no
    ``mkldnn_rnn_layer``: the trace is exact and the calibration corrects nothing."""
    spec = spec_from_dict(GRU_RAW)
    probe = Candidate(batch_size=8, input_size=8)
    real = _real(GRU_RAW, probe)
    assert not any("rnn" in key for key in real.op_log)
    assert C.known_misreporting(real.op_log) == []
    assert abs(_error(estimate(spec, probe, CPU).peak_bytes, real.memory.peak_bytes)) < 0.01
    cal = C.calibrate_from_trial(spec, real, CPU, C.CalibrationStore())
    assert not cal.ops and not cal.unexplained_slope


def test_convolution_is_named_only_where_the_allocator_is_the_limit() -> None:
    log = {"forward|aten.convolution#0": [1, 4096], "forward|aten.mkldnn_rnn_layer#3": [1, 0]}
    budget = spec_from_dict(WS_RAW)
    rlimit = spec_from_dict({**WS_RAW, "memory": {"budget": "1GiB", "cpu_limit": "rlimit"}})
    assert [line.split(":")[0] for line in C.known_misreporting(log, budget, "cpu")] == \
        ["aten.mkldnn_rnn_layer"]
    lines = C.known_misreporting(log, rlimit, "cpu")
    assert [line.split(":")[0] for line in lines] == ["aten.mkldnn_rnn_layer", "aten.convolution"]
    assert "oneDNN" in lines[1] and "--calibrate" in lines[1]
    assert len(C.known_misreporting(log, rlimit, "cuda")) == 1


def test_profile_applies_the_calibration_in_use(ws_spec, one_thread) -> None:  # type: ignore[no-untyped-def]
    """``autofit profile``'s fake-tensor timeline carries the op corrections, and its peak
    the residual, as ``estimate`` under the same store."""
    from autofit.predict.profile import profile_step

    probe = Candidate(batch_size=64, input_size=0)
    real = _real(WS_RAW, probe)
    store = C.CalibrationStore()
    C.calibrate_from_trial(ws_spec, real, CPU, store)
    plain = profile_step(ws_spec, probe, CPU)
    with C.using(store):
        prof = profile_step(ws_spec, probe, CPU)
        est = estimate(ws_spec, probe, CPU)
    assert plain.peak_bytes < real.memory.peak_bytes * 0.9
    assert prof.peak_bytes == est.peak_bytes
    assert max(p.live_bytes for p in prof.timeline) == prof.traced_peak_bytes == est.peak_bytes
    assert abs(_error(prof.peak_bytes, real.memory.peak_bytes)) < 0.01
    assert any(n.startswith("trace corrected by the probe calibration: autofit_test.scale_ws#1")
               for n in prof.notes)
    # a residual no op explains goes on the peak, not the timeline
    store.calibrations[C.setting_key(probe, "cpu")].unexplained_slope = 100.0
    with C.using(store):
        prof = profile_step(ws_spec, probe, CPU)
        est = estimate(ws_spec, probe, CPU)
    assert prof.peak_bytes == est.peak_bytes == prof.traced_peak_bytes + 6400
    assert prof.breakdown.peak_bytes == prof.peak_bytes
    assert any("unexplained residual" in n for n in prof.notes)


# ------------------------------------------------------------------ the calibration's own traces
def test_a_repeated_calibration_reads_its_traces_from_the_cache(ws_spec, tmp_path, one_thread) -> None:  # type: ignore[no-untyped-def]
    """The plain and the corrected trace a calibration compares with are kept in the trace
    cache: the same setting calibrated again traces nothing and gives the same calibration,
    and a different real log is still compared op by op (a calibration, not a replay)."""
    probe = Candidate(batch_size=64, input_size=0)
    real = _real(WS_RAW, probe)
    uncached = C.calibrate_from_trial(ws_spec, real, CPU, C.CalibrationStore())  # no cache
    with trace_cache.using(trace_cache.TraceCache(tmp_path)):
        start = dict(C.LOG_STATS)
        first = C.calibrate_from_trial(ws_spec, real, CPU, C.CalibrationStore())
        assert C.LOG_STATS["traced"] - start["traced"] == 2  # plain, then corrected
        assert len(list((tmp_path / C.LOG_DIR).glob("*.json"))) == 2
        assert not list(tmp_path.glob("*.json"))  # beside the trace entries, not among them
        mid = dict(C.LOG_STATS)
        again = C.calibrate_from_trial(ws_spec, real, CPU, C.CalibrationStore())
        assert C.LOG_STATS["traced"] == mid["traced"]  # nothing traced
        assert C.LOG_STATS["hits"] - mid["hits"] == 2
        assert again.to_dict() == first.to_dict() == uncached.to_dict()
        assert again.ops["autofit_test.scale_ws#1"].at_peak_bytes == 64 * 64 * WORKSPACE_PER_ELEMENT
        # the real kernel's workspace doubled: the cached trace, a new comparison
        doubled = {k: [n, b * 2] if k.endswith("autofit_test.scale_ws#1") else [n, b]
                   for k, (n, b) in real.op_log.items()}
        other = C.calibrate(ws_spec, probe, CPU, doubled, real.memory.peak_bytes,
                            C.CalibrationStore())
    corr, was = other.ops["autofit_test.scale_ws#1"], first.ops["autofit_test.scale_ws#1"]
    assert corr.probes[-1].real_per_call == 2 * was.probes[-1].real_per_call
    assert corr.slope == pytest.approx(2 * was.slope)
    # another batch is another trace
    with trace_cache.using(trace_cache.TraceCache(tmp_path)):
        before = C.LOG_STATS["traced"]
        C.traced_log(ws_spec, probe.with_batch(32), CPU)
        assert C.LOG_STATS["traced"] == before + 1


def test_the_pending_trace_is_the_trace_calibrate_takes(ws_spec, tmp_path, monkeypatch, one_thread) -> None:  # type: ignore[no-untyped-def]
    """``PendingTrace`` traces in a thread what ``traced_log`` traces here; with the log
    cached it starts no thread; a failed trace is raised by ``get``."""
    from dataclasses import asdict

    from autofit.errors import BuildError

    probe = Candidate(batch_size=32, input_size=0)
    serial = C.traced_log(ws_spec, probe, CPU)
    assert asdict(C.PendingTrace(ws_spec, probe, CPU).get()) == asdict(serial)
    with trace_cache.using(trace_cache.TraceCache(tmp_path)):
        traced = C.LOG_STATS["traced"]
        first = C.PendingTrace(ws_spec, probe, CPU)
        assert asdict(first.get()) == asdict(serial)
        hit = C.PendingTrace(ws_spec, probe, CPU)  # the thread kept it in the cache
        assert hit._thread is None and asdict(hit.get()) == asdict(serial)
        assert C.LOG_STATS["traced"] == traced + 1

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise BuildError("tracing failed: injected")

    monkeypatch.setattr(C, "_trace_log", broken)
    pending = C.PendingTrace(ws_spec, probe, CPU)
    with pytest.raises(BuildError, match="injected"):
        pending.get()


def test_a_trace_runs_beside_a_trial_only_where_it_takes_no_cpu_from_it(monkeypatch) -> None:
    from autofit.predict import trace as trace_mod
    from autofit.search.tuner import room_beside_trial

    spec, fastest = spec_from_dict(WS_RAW), spec_from_dict(
        {**WS_RAW, "search": {"objective": "max_throughput"}})
    monkeypatch.setattr(trace_mod, "idle_cpu", lambda: True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert room_beside_trial(spec, "cpu") and room_beside_trial(fastest, "cuda")
    assert not room_beside_trial(fastest, "cpu")  # its trials' step times pick the answer
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not room_beside_trial(spec, "cpu") and room_beside_trial(spec, "cuda")
    monkeypatch.delenv("OMP_NUM_THREADS")  # torch takes every core
    assert not room_beside_trial(spec, "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(trace_mod, "idle_cpu", lambda: False)  # a busy machine
    assert not room_beside_trial(spec, "cpu")


def test_tune_traces_the_probe_beside_its_trial_and_reuses_it(tmp_path, monkeypatch, one_thread) -> None:  # type: ignore[no-untyped-def]
    """Trials in their own process (``run_trial``): the calibration's trace runs beside the
    probe trial, with the same calibration and trials as the in-process tune; a second tune
    on the same trace cache calibrates without tracing."""
    from autofit.search import tuner
    from autofit.search.tuner import out_of_process, run_search
    from autofit.trials import runner

    monkeypatch.setattr(tuner, "room_beside_trial", lambda spec, kind: True)  # an idle machine

    raw = {**WS_RAW, "memory": {"budget": "4MiB", "margin": 0.0},
           "search": {"batch_size": {"min": 8, "max": 4096}, "verify_steps": 2}}
    spec = spec_from_dict(raw)
    assert out_of_process(runner.run_trial) and not out_of_process(_in_process_runner)

    def ran(result):  # type: ignore[no-untyped-def]
        return [(t.result.candidate.batch_size, t.result.fits) for t in result.trials]

    for name in ("serial", "side", "again"):
        (tmp_path / name).mkdir()
    serial = run_search(spec, out_dir=tmp_path / "serial", runner=_in_process_runner)
    try:
        with trace_cache.using(trace_cache.TraceCache(tmp_path / "cache")):
            start = dict(C.LOG_STATS)
            side = run_search(spec, out_dir=tmp_path / "side", runner=runner.run_trial)
            traced = C.LOG_STATS["traced"] - start["traced"]
            mid = dict(C.LOG_STATS)
            again = run_search(spec, out_dir=tmp_path / "again", runner=runner.run_trial)
    finally:
        runner.shutdown()
    assert ran(side) == ran(again) == ran(serial)
    assert side.best.result.candidate == serial.best.result.candidate
    assert side.calibration == again.calibration == serial.calibration
    assert "autofit_test.scale_ws#1" in side.calibration["settings"]["fp32/0/cpu"]["ops"]
    # a plain trace beside each trial up to the first fit (each predicted to fit: the trace
    # misses the workspace, so the first ones OOM and their traces go unused), then the
    # corrected trace
    predicted = side.settings[0].predicted_batch_size
    first_fit = next(i for i, t in enumerate(side.trials) if t.result.fits)
    assert all(b <= predicted for b, _ in ran(side)[:first_fit + 1])
    assert traced == first_fit + 2
    assert C.LOG_STATS["traced"] == mid["traced"] and C.LOG_STATS["hits"] - mid["hits"] >= 2
