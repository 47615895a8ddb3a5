"""CUDA trials (marked gpu; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from autofit.candidate import Candidate
from autofit.predict import estimate
from autofit.predict.device_model import CUDA_DEFAULT
from autofit.spec import spec_from_dict
from autofit.trials import TrialStatus, run_trial

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPEC = {
    "name": "gpu-gpt",
    "model": {"_target_": "autofit.zoo.gpt", "n_layer": 4, "n_embd": 256, "n_head": 4,
              "vocab_size": 4096, "block_size": 256},
    "data": {"kind": "tokens", "vocab_size": 4096, "seq_len": 256},
    "device": "cuda",
    "search": {"steps_per_trial": 2},
}


def test_cuda_trial_measures_allocated_and_reserved():
    spec = spec_from_dict(SPEC)
    cand = Candidate(batch_size=16, input_size=256, precision="bf16")
    result = run_trial(spec, cand, device="cuda")
    assert result.status is TrialStatus.FITS, result.message
    assert result.memory.reserved_bytes >= result.memory.peak_bytes > 0
    assert result.device["name"] and result.device["total_bytes"] > 0 and result.device["cuda"]
    predicted = estimate(spec, cand, CUDA_DEFAULT)
    assert abs(predicted.allocated_bytes / result.memory.peak_bytes - 1) < 0.10


def test_cuda_memory_fraction_cap_gives_oom():
    spec = spec_from_dict(SPEC)
    cand = Candidate(batch_size=256, input_size=256, precision="fp32")
    result = run_trial(spec, cand, device="cuda", limit_bytes=256 * 2**20)
    assert result.status is TrialStatus.OOM, result.message
    assert result.limit_kind == "cuda-fraction"
