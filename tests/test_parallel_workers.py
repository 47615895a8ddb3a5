"""Workers on a ``parallel.strategy`` list (issue 15): the work queue holds one item per
(setting, strategy), and the study's assembly picks the single-process search's winner."""

from __future__ import annotations

import os

import optuna
import pytest
from landscape import Landscape

from autofit.predict.cache import TraceCache, using
from autofit.search.tuner import run_search
from autofit.search.workers import WORK_ATTR, duplicates, open_storage, run_worker, study_name
from autofit.spec import spec_from_dict

os.environ.setdefault("OMP_NUM_THREADS", "1")

GPT = {"_target_": "autofit.zoo.gpt", "vocab_size": 128, "block_size": 32, "n_layer": 2,
       "n_head": 2, "n_embd": 32}


class Recording(Landscape):
    """The landscape, recording each trial's strategy too (its ``calls`` do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[str, int, int]] = []

    def __call__(self, spec, candidate, **kwargs):
        self.runs.append((candidate.strategy, candidate.batch_size, kwargs.get("steps", 0)))
        return super().__call__(spec, candidate, **kwargs)


@pytest.mark.parametrize("objective", ["max_batch", "max_throughput"])
def test_worker_queue_and_winner_with_a_strategy_list(objective, tmp_path, one_thread):
    raw = {"name": f"ranks-{objective}", "model": GPT,
           "data": {"kind": "tokens", "vocab_size": 128, "seq_len": 32}, "device": "cpu",
           "memory": {"budget": 1_200_000, "margin": 0.0},
           "parallel": {"strategy": ["none", "ddp", "fsdp"], "world_size": 2},
           "search": {"objective": objective, "batch_size": {"min": 1, "max": 64},
                      "checkpoint_segments": [0, 2], "steps_per_trial": 1}}
    if objective == "max_throughput":  # fewer settings: it times each once
        raw["search"]["checkpoint_segments"] = [2]
    spec = spec_from_dict(raw)
    alone, shared = Recording(), Recording()
    url = f"journal:{tmp_path / 's.journal'}"
    # one trace cache for both: the worker predicts what the single search predicted
    with using(TraceCache(tmp_path / "traces")):
        expected = run_search(spec, runner=alone)
        result = run_worker(spec, url, runner=shared, poll_s=0.1, worker_id="w")

    study = optuna.load_study(study_name=study_name(spec), storage=open_storage(url))
    work = [t.user_attrs[WORK_ATTR] for t in study.trials if WORK_ATTR in t.user_attrs]
    keys = [w["setting"] for w in work if w["kind"] == "setting"]
    if objective == "max_batch":  # every (setting, strategy) is an item of its own
        assert sorted(keys) == sorted(f"32/fp32/{c}/{s}" for c in (0, 2)
                                      for s in ("none", "ddp", "fsdp"))
        # none and fsdp tie at ckpt 2 (batch 7, the landscape's speed is the batch's): the
        # single search visits fsdp first (quick ranking), the replay none (exact ranking)
    else:  # throughput prunes by prediction within a strategy only: still one per pair
        assert len(keys) == len(set(keys)) and {k.rsplit("/", 1)[1] for k in keys} <= {
            "none", "ddp", "fsdp"}
    assert [w["kind"] for w in work].count("finish") == 1
    assert duplicates(study) == 0

    assert result.best.result.candidate == expected.best.result.candidate
    assert result.best.result.candidate.strategy == expected.best.result.candidate.strategy
    assert result.best.purpose.value == "verify"
    if objective == "max_batch":
        assert result.best.result.candidate.strategy == "fsdp"  # shards: the most per rank
    ran = {r for r in shared.runs}
    assert {s for s, _, _ in ran} >= {expected.best.result.candidate.strategy}
    assert sorted(shared.runs) == sorted(alone.runs)  # the same trials, strategy and all


def test_worker_short_of_gpus_runs_the_ranks_available(tmp_path, monkeypatch, one_thread):
    """A worker on a machine with fewer GPUs than ranks (injected: 2 for fsdp x4) measures
    at 2 ranks, and its results.json says world size 4 is predicted-only with the same
    ``ranks`` entry as the single-process tune; so does an assembly of the finished study."""
    import json

    import autofit.search.tuner as tuner
    from autofit.cluster import write_files
    from autofit.trials import ranks

    real = ranks.spec_shortfall

    def short(spec, device):
        return real(spec, "cuda", device_count=2)

    monkeypatch.setattr(ranks, "spec_shortfall", short)
    monkeypatch.setattr(tuner, "spec_shortfall", short)
    raw = {"name": "ranks-short", "model": GPT,
           "data": {"kind": "tokens", "vocab_size": 128, "seq_len": 32}, "device": "cpu",
           "memory": {"budget": 1_200_000, "margin": 0.0},
           "parallel": {"strategy": "fsdp", "world_size": 4},
           "search": {"batch_size": {"min": 1, "max": 64}, "steps_per_trial": 1}}
    worlds: list[int] = []
    landscape = Landscape()

    def run(spec, candidate, **kwargs):
        worlds.append(spec.world_size)
        return landscape(spec, candidate, **kwargs)

    url = f"journal:{tmp_path / 's.journal'}"
    result = run_worker(spec_from_dict(raw), url, runner=run, poll_s=0.1, worker_id="w")
    assert worlds and set(worlds) == {2}
    assert any(n.startswith("verified on 2 ranks; world size 4 is predicted-only")
               for n in result.notes)

    alone = run_search(spec_from_dict(raw), runner=Landscape())
    assert alone.ranks["world_size"] == 4 and alone.ranks["verified_world_size"] == 2
    assert alone.ranks["predicted_batch_size"] >= alone.best.result.candidate.batch_size
    assert result.best.result.candidate == alone.best.result.candidate
    write_files(result, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["ranks"] == alone.ranks
    assert data["ranks"]["note"] in data["notes"]

    worlds.clear()
    again = run_worker(spec_from_dict(raw), url, runner=run, assemble_only=True, worker_id="a")
    assert worlds == [] and again.ranks == alone.ranks
