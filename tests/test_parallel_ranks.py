"""Fewer GPUs than ranks (issue 15): the trials verify the largest world size the machine
has, and the answer at the job's own world size is marked predicted-only. The CUDA branch
is decided by ``rank_shortfall``, whose device count is injected here (no GPU needed)."""

from __future__ import annotations

import json
import os

from landscape import Landscape

from autofit.api import tune
from autofit.candidate import Candidate
from autofit.parallel import RankPlan
from autofit.predict.batch_curve import predict_max_batch
from autofit.predict.device_model import CPU
from autofit.predict.distributed import estimate_rank
from autofit.spec import spec_from_dict
from autofit.trials import ranks
from autofit.trials.ranks import RankShortfall, rank_shortfall, run_rank_trial, spec_shortfall
from autofit.trials.result import TrialResult, TrialStatus

os.environ.setdefault("OMP_NUM_THREADS", "1")

GPT = {"_target_": "autofit.zoo.gpt", "vocab_size": 128, "block_size": 32, "n_layer": 2,
       "n_head": 2, "n_embd": 32}
TOKENS = {"kind": "tokens", "vocab_size": 128, "seq_len": 32}
RANK_LIMIT = 1_200_000


def gpt_raw(parallel: dict | None) -> dict:
    raw = {"name": "gpt-short", "model": GPT, "data": TOKENS, "device": "cpu",
           "memory": {"budget": RANK_LIMIT, "margin": 0.0},
           "search": {"batch_size": {"min": 1, "max": 64}, "steps_per_trial": 1}}
    if parallel is not None:
        raw["parallel"] = parallel
    return raw


def test_shortfall_decision():
    """CPU ranks are processes: never short. CUDA: short only with fewer devices than ranks
    (and at least one to verify on); the largest world size available is the device count."""
    assert rank_shortfall(8, "cpu", device_count=0) is None
    assert rank_shortfall(8, "cuda", device_count=8) is None
    assert rank_shortfall(8, "cuda:0", device_count=16) is None
    assert rank_shortfall(8, "cuda", device_count=0) is None
    assert rank_shortfall(1, "cuda", device_count=1) is None
    short = rank_shortfall(8, "cuda", device_count=3)
    assert short == RankShortfall(world_size=8, verified_world_size=3)
    assert short.note().startswith("verified on 3 ranks; world size 8 is predicted-only")
    assert short.to_dict()["predicted_only"] is True
    assert "1 CUDA device," in rank_shortfall(2, "cuda", device_count=1).note()
    fsdp = spec_from_dict(gpt_raw({"strategy": ["none", "fsdp"], "world_size": 4}))
    assert spec_shortfall(fsdp, "cuda", device_count=2) == RankShortfall(4, 2)
    assert spec_shortfall(fsdp, "cpu", device_count=2) is None
    single = spec_from_dict(gpt_raw({"strategy": "none", "world_size": 4}))
    assert spec_shortfall(single, "cuda", device_count=2) is None


def test_rank_trial_runs_the_ranks_available(monkeypatch):
    """A CUDA rank trial asked for 4 ranks on 2 devices launches 2, and says 4 is
    predicted-only; with enough devices it launches all 4."""
    launched: list[int] = []

    def fake_run(spec, candidate, plan, device, *args):
        launched.append(plan.world_size)
        return TrialResult(candidate=candidate, status=TrialStatus.FITS,
                           extra={"world_size": plan.world_size})

    monkeypatch.setattr(ranks, "_run_ranks", fake_run)
    spec = spec_from_dict(gpt_raw({"strategy": "fsdp", "world_size": 4}))
    cand = Candidate(batch_size=2, input_size=32)
    short = run_rank_trial(spec, cand, device="cuda", device_count=2)
    assert launched == [2]
    assert short.extra["requested_world_size"] == 4
    assert "verified on 2 ranks; world size 4 is predicted-only" in short.warning
    full = run_rank_trial(spec, cand, device="cuda", device_count=4)
    assert launched == [2, 4] and "requested_world_size" not in full.extra and not full.warning


def test_tune_short_of_gpus_verifies_k_ranks_and_marks_n_predicted_only(
        tmp_path, monkeypatch, one_thread):
    """fsdp x4 on a machine with 2 GPUs (injected): every trial runs 2 ranks and is compared
    with the prediction at 2 ranks; results.json marks world size 4 predicted-only, with the
    max batch per rank predicted at 4."""
    import autofit.search.tuner as tuner

    monkeypatch.setattr(tuner, "spec_shortfall",
                        lambda spec, device: spec_shortfall(spec, "cuda", device_count=2))
    landscape, worlds = Landscape(), []

    def run(spec, candidate, **kwargs):
        worlds.append(spec.world_size)
        return landscape(spec, candidate, **kwargs)

    raw = gpt_raw({"strategy": "fsdp", "world_size": 4})
    result = tune(raw, out_dir=tmp_path, runner=run, cache=False)
    assert worlds and set(worlds) == {2}
    best = result.best.result.candidate
    at2 = spec_from_dict(gpt_raw({"strategy": "fsdp", "world_size": 2}))
    assert result.best.predicted_peak_bytes == estimate_rank(
        at2, best, CPU, RankPlan.from_spec(at2)).peak_bytes  # the prediction at k ranks

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["spec"]["parallel"]["world_size"] == 4  # the user's spec, as written
    marked = data["ranks"]
    assert marked["world_size"] == 4 and marked["verified_world_size"] == 2
    assert marked["predicted_only"] is True and marked["strategy"] == "fsdp"
    at4 = spec_from_dict(raw)
    want = predict_max_batch(at4, best.with_batch(1), CPU, RANK_LIMIT, exact=True).batch_size
    assert marked["predicted_batch_size"] == want
    assert want >= best.batch_size  # fsdp: more ranks hold less each
    assert marked["verified_batch_size"] == best.batch_size
    assert marked["predicted_peak_bytes_at_verified_batch"] < result.best.predicted_peak_bytes
    assert any(n.startswith("verified on 2 ranks; world size 4 is predicted-only")
               for n in data["notes"])
    assert marked["note"] in data["notes"]


def test_tune_with_enough_ranks_marks_nothing(tmp_path, monkeypatch, one_thread):
    """Enough devices (injected): the trials run the job's world size; no ``ranks`` entry."""
    import autofit.search.tuner as tuner

    monkeypatch.setattr(tuner, "spec_shortfall",
                        lambda spec, device: spec_shortfall(spec, "cuda", device_count=4))
    worlds: list[int] = []
    landscape = Landscape()

    def run(spec, candidate, **kwargs):
        worlds.append(spec.world_size)
        return landscape(spec, candidate, **kwargs)

    tune(gpt_raw({"strategy": "fsdp", "world_size": 4}), out_dir=tmp_path, runner=run,
         cache=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(worlds) == {4} and "ranks" not in data
    assert not any("predicted-only" in n for n in data["notes"])
