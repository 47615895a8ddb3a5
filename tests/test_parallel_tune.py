"""Tuning per rank (issue 15): ``autofit tune`` with ``parallel``, end to end on 2-rank gloo
trials; ``parallel.strategy`` lists as a search axis; the winner's strategy in the hand-over;
the trace cache keyed by the parallel plan; "needs sharding" in a tune that cannot fit."""

from __future__ import annotations

import json
import os

import pytest
from landscape import Landscape

from autofit.api import tune
from autofit.candidate import Candidate
from autofit.errors import TuneFailed
from autofit.export.tuned import load_tuned
from autofit.predict import cache as trace_cache
from autofit.predict.device_model import CPU
from autofit.predict.distributed import RankEstimate
from autofit.predict.trace import estimate
from autofit.spec import spec_from_dict
from autofit.trials.result import TrialStatus

os.environ.setdefault("OMP_NUM_THREADS", "1")

GPT = {"_target_": "autofit.zoo.gpt", "vocab_size": 128, "block_size": 32, "n_layer": 2,
       "n_head": 2, "n_embd": 32}
TOKENS = {"kind": "tokens", "vocab_size": 128, "seq_len": 32}
RANK_LIMIT = 1_200_000
"""Per-rank budget (margin 0) under which fsdp x2 fits batch 4 and not 5 (1,019,384 and
1,219,448 bytes per rank, predicted and measured alike)."""


def gpt_raw(parallel: dict | None, budget: int = RANK_LIMIT) -> dict:
    raw = {"name": "gpt-ranks", "model": GPT, "data": TOKENS, "device": "cpu",
           "memory": {"budget": budget, "margin": 0.0},
           "search": {"batch_size": {"min": 1, "max": 64}, "steps_per_trial": 1}}
    if parallel is not None:
        raw["parallel"] = parallel
    return raw


def test_fsdp_tune_returns_the_true_max_per_rank_batch(tmp_path, one_thread):
    """Real 2-rank gloo trials pin the per-rank batch: it fits on both ranks, one more does
    not; no more real trials than the single-process search of the same model and budget."""
    result = tune(gpt_raw({"strategy": "fsdp", "world_size": 2}), out_dir=tmp_path / "fsdp",
                  cache=False)
    best = result.best.result.candidate.batch_size
    ran = {t.result.candidate.batch_size: t.result for t in result.trials}
    assert ran[best].fits and ran[best + 1].status is TrialStatus.OOM
    for trial in result.trials:
        extra = trial.result.extra
        assert extra["strategy"] == "fsdp" and extra["world_size"] == 2
        if trial.result.fits:  # every rank's peak; an OOM stops the group at the first
            assert len(extra["rank_peaks"]) == 2 and all(extra["rank_peaks"])
        else:
            assert "oom" in extra["rank_status"]
    assert result.best.purpose.value == "verify"
    # exact on every rank (collectives settled: see test_parallel)
    peaks = result.best.result.extra["rank_peaks_from_step"]
    predicted = result.best.predicted_peak_bytes
    assert peaks == [predicted, predicted], (predicted, peaks)
    tuned = (tmp_path / "fsdp" / "tuned.yaml").read_text()
    assert "strategy: fsdp" in tuned and f"max_batch_size: {best}" in tuned

    single = tune(gpt_raw(None), out_dir=tmp_path / "single", cache=False)
    assert result.search_trials <= single.search_trials
    assert result.real_trials <= single.real_trials


def test_strategy_list_is_a_search_axis_ranked_by_prediction(tmp_path, one_thread):
    """ddp and fsdp are predicted per rank; ddp (predicted smaller) is pruned, fsdp is pinned
    and verified; results.json, tuned.yaml and the scripts carry fsdp."""
    runner = Landscape()
    seen: list[str] = []

    def run(spec, candidate, **kwargs):
        seen.append(candidate.strategy)
        return runner(spec, candidate, **kwargs)

    result = tune(gpt_raw({"strategy": ["ddp", "fsdp"], "world_size": 2}),
                  out_dir=tmp_path, runner=run, cache=False)
    keys = {s.setting.key: s for s in result.settings}
    assert set(keys) == {"32/fp32/0/ddp", "32/fp32/0/fsdp"}
    assert keys["32/fp32/0/fsdp"].predicted_batch_size > keys["32/fp32/0/ddp"].predicted_batch_size
    assert set(seen) == {"fsdp"}  # ddp pruned by its prediction
    assert result.best.result.candidate.strategy == "fsdp"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["best"]["strategy"] == "fsdp"
    assert {row.get("strategy") for row in data["max_batch_by_setting"]} == {"ddp", "fsdp"}
    tuned = load_tuned(tmp_path / "tuned.yaml")
    assert tuned.strategy == "fsdp"
    assert spec_from_dict(tuned.spec).parallel.strategies == ("fsdp",)
    torchrun = next(p for p in result.files if p.name.startswith("torchrun"))
    assert "AUTOFIT_PARALLEL_STRATEGY=fsdp" in torchrun.read_text() or \
        "AUTOFIT_PARALLEL_STRATEGY='fsdp'" in torchrun.read_text()


def test_trace_cache_keys_the_parallel_plan(tmp_path, one_thread):
    """ddp and fsdp traces are cached apart from each other, from other world sizes and from
    the single-process trace; a single-process key is what it was without a parallel section;
    a cached rank estimate comes back whole."""
    cache = trace_cache.TraceCache(tmp_path)
    cand = Candidate(batch_size=2, input_size=32)
    specs = {
        "plain": spec_from_dict(gpt_raw(None)),
        "none": spec_from_dict(gpt_raw({"strategy": "none", "world_size": 2})),
        "ddp2": spec_from_dict(gpt_raw({"strategy": "ddp", "world_size": 2})),
        "fsdp2": spec_from_dict(gpt_raw({"strategy": "fsdp", "world_size": 2})),
        "fsdp4": spec_from_dict(gpt_raw({"strategy": "fsdp", "world_size": 4})),
        "fsdp2-keep": spec_from_dict(gpt_raw({"strategy": "fsdp", "world_size": 2,
                                              "fsdp": {"reshard_after_forward": False}})),
    }
    keys = {name: cache.key(spec, cand, CPU) for name, spec in specs.items()}
    assert keys["plain"] == keys["none"]
    assert len(set(keys.values())) == len(keys) - 1
    listed = spec_from_dict(gpt_raw({"strategy": ["ddp", "fsdp"], "world_size": 2}))
    of_list = {s: Candidate(batch_size=2, input_size=32, strategy=s) for s in ("ddp", "fsdp")}
    assert cache.key(listed, of_list["ddp"], CPU) != cache.key(listed, of_list["fsdp"], CPU)
    with trace_cache.using(cache):
        first = estimate(listed, of_list["fsdp"], CPU)
        again = estimate(spec_from_dict(gpt_raw({"strategy": ["ddp", "fsdp"], "world_size": 2})),
                         of_list["fsdp"], CPU)  # the same plan, another run: a hit
    assert cache.new == 1 and cache.hits == 1 and again.cached
    assert isinstance(again, RankEstimate) and again.strategy == "fsdp" and again.world_size == 2
    assert again.peak_bytes == first.peak_bytes and again.rank_bytes == first.rank_bytes


def test_tune_says_needs_sharding_when_nothing_fits_one_rank(tmp_path, one_thread):
    """Batch 1 does not fit one unsharded rank but fits fsdp x4: the tune fails with the line,
    and results.json keeps it in its notes."""
    from autofit.parallel import RankPlan
    from autofit.predict.distributed import estimate_rank

    raw = gpt_raw(None)
    raw["model"] = {**GPT, "n_embd": 64, "vocab_size": 512}
    raw["data"] = {**TOKENS, "vocab_size": 512, "seq_len": 8}
    raw["search"]["batch_size"] = {"min": 1, "max": 8}
    one = Candidate(batch_size=1, input_size=8)
    raw["memory"]["budget"] = estimate_rank(spec_from_dict(raw), one, CPU,
                                            RankPlan(strategy="fsdp", world_size=4)).peak_bytes
    with pytest.raises(TuneFailed) as info:
        tune(raw, out_dir=tmp_path, runner=Landscape(), cache=False)
    assert "needs sharding over >=4 ranks" in str(info.value)
    notes = json.loads((tmp_path / "results.json").read_text())["notes"]
    assert any(n.startswith("needs sharding over >=4 ranks") for n in notes)


@pytest.mark.parametrize("strategy,world_size", [("fsdp", 8), ("ddp", 2)])
def test_profile_shows_one_rank(strategy, world_size, one_thread):
    """The fake profile of a ddp/fsdp spec is one rank's: its peak and breakdown are the
    per-rank estimate's, for a world size this machine could not run."""
    from autofit.predict.profile import profile_step

    spec = spec_from_dict(gpt_raw({"strategy": strategy, "world_size": world_size}))
    cand = Candidate(batch_size=2, input_size=32)
    prof = profile_step(spec, cand, CPU)
    est = estimate(spec, cand, CPU)
    assert prof.peak_bytes == est.peak_bytes
    assert prof.breakdown.to_dict() == est.breakdown.to_dict()
    assert prof.per_rank["strategy"] == strategy and prof.per_rank["world_size"] == world_size
    assert prof.per_rank["rank_bytes"] == est.rank_bytes
    assert prof.to_dict()["per_rank"]["peak_bytes"] == est.peak_bytes
    single = profile_step(spec_from_dict(gpt_raw(None)), cand, CPU)
    assert "per_rank" not in single.to_dict()
    assert (prof.peak_bytes < single.peak_bytes) == (strategy == "fsdp")
