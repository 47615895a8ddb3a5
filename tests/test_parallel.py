"""Data parallelism (issue 15): the parallel spec section, per-rank prediction on a fake
process group (FSDP2) and by the bucket model (DDP), checked against real 2-rank gloo runs,
and 2-rank trials whose ranks fail one at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from autofit.candidate import Candidate
from autofit.errors import SpecError
from autofit.parallel import RankPlan, ddp_bucket_bytes, deepspeed_zero_bytes
from autofit.predict.device_model import CPU
from autofit.predict.distributed import estimate_rank
from autofit.spec import spec_from_dict
from autofit.trials.ranks import run_rank_trial
from autofit.trials.result import TrialStatus

os.environ.setdefault("OMP_NUM_THREADS", "1")

GPT = {"_target_": "autofit.zoo.gpt", "vocab_size": 128, "block_size": 32, "n_layer": 2,
       "n_head": 2, "n_embd": 32}
TOKENS = {"kind": "tokens", "vocab_size": 128, "seq_len": 32}


def gpt_spec(parallel: dict, **extra) -> object:
    return spec_from_dict({"model": GPT, "data": TOKENS, "parallel": parallel,
                           "search": {"steps_per_trial": 1}, **extra})


def tiny_spec(model: str, strategy: str = "ddp") -> object:
    return spec_from_dict({"model": {"_target_": model}, "data": {"kind": "tensor", "shape": [16]},
                           "loss": "mse", "parallel": {"strategy": strategy, "world_size": 2},
                           "search": {"steps_per_trial": 1}})


# --------------------------------------------------------------------------- spec


def test_parallel_defaults_and_world_size_from_output():
    spec = spec_from_dict({"model": GPT, "data": TOKENS,
                           "output": {"nodes": 2, "gpus_per_node": 4}})
    assert spec.parallel.strategy == "none"
    assert spec.world_size == 8
    spec = gpt_spec({"strategy": ["ddp", "fsdp"], "world_size": 3,
                     "fsdp": {"reshard_after_forward": False,
                              "mixed_precision": {"param_dtype": "bfloat16"}},
                     "ddp": {"gradient_as_bucket_view": True}})
    par = spec.parallel
    assert par.strategies == ("ddp", "fsdp") and spec.world_size == 3
    assert par.param_dtype == "bf16" and not par.reshard_after_forward
    assert par.gradient_as_bucket_view


def test_parallel_errors_are_one_line_each():
    with pytest.raises(SpecError) as info:
        gpt_spec({"strategy": "fsdq", "world_size": 0,
                  "fsdp": {"reshard_after_forward": "yes",
                           "mixed_precision": {"reduce_dtype": "int8"}},
                  "ddp": {"bucket": 1}})
    text = str(info.value)
    for expected in ("parallel.strategy: must be one of none, ddp, fsdp, got 'fsdq'; did you mean 'fsdp'?",
                     "parallel.world_size: must be >= 1, got 0",
                     "parallel.fsdp.reshard_after_forward: must be true or false",
                     "parallel.fsdp.mixed_precision.reduce_dtype: must be one of fp32, bf16, fp16",
                     "parallel.ddp.bucket: unknown key"):
        assert expected in text
    assert len(info.value.problems if hasattr(info.value, "problems") else text.splitlines()) >= 5


# --------------------------------------------------------------------------- prediction


def test_fsdp_shards_with_world_size(one_thread):
    """Sharded parameter bytes per rank fall as 1/N; the per-rank peak falls with N."""
    cand = Candidate(batch_size=2, input_size=32)
    peaks, sharded = {}, {}
    for n in (2, 4):
        est = estimate_rank(gpt_spec({"strategy": "fsdp", "world_size": n}), cand, CPU)
        peaks[n], sharded[n] = est.peak_bytes, est.rank_bytes["sharded_params"]
        assert est.world_size == n and est.strategy == "fsdp"
    assert abs(sharded[4] - sharded[2] / 2) <= 1024  # padding to a multiple of N only
    assert peaks[2] > peaks[4]


def test_ddp_bucket_model(one_thread):
    """DDP = the single-process trace + 1x the parameter bytes, alive throughout; with bucket
    views the gradients live in the buckets (no more than the plain DDP peak)."""
    cand = Candidate(batch_size=2, input_size=32)
    single = estimate_rank(gpt_spec({"strategy": "none"}), cand, CPU,
                           RankPlan(strategy="none", world_size=1))
    ddp = estimate_rank(gpt_spec({"strategy": "ddp", "world_size": 2}), cand, CPU)
    view = estimate_rank(gpt_spec({"strategy": "ddp", "world_size": 2,
                                   "ddp": {"gradient_as_bucket_view": True}}), cand, CPU)
    model = torch.nn.Linear(3, 5)
    assert ddp_bucket_bytes(model) == (3 * 5 + 5) * 4
    buckets = ddp.rank_bytes["ddp_buckets"]
    assert buckets == single.param_count * 4
    assert ddp.peak_bytes == single.breakdown.peak_bytes + buckets
    assert single.breakdown.peak_bytes <= view.peak_bytes <= ddp.peak_bytes


@pytest.mark.parametrize("strategy,precision,segments", [("fsdp", "fp32", 0), ("fsdp", "bf16", 2),
                                                         ("ddp", "fp32", 2)])
def test_prediction_matches_real_two_rank_gloo(one_thread, strategy, precision, segments):
    """Fake-PG / bucket-model prediction within 3% of a real 2-rank gloo run (per rank,
    from the second step on), for every rank."""
    spec = gpt_spec({"strategy": strategy, "world_size": 2})
    cand = Candidate(batch_size=4, input_size=32, precision=precision,
                     checkpoint_segments=segments)
    predicted = estimate_rank(spec, cand, CPU).peak_bytes
    result = run_rank_trial(spec, cand, timeout_s=120)
    assert result.status is TrialStatus.FITS, result.message
    measured = result.extra["rank_peaks_from_step"]
    assert len(measured) == 2
    # every rank: collectives are settled (gloo's worker thread lets go of an all-gather output
    # before the step goes on), so no rank holds a collective buffer past the step's reference
    for peak in measured:
        assert abs(predicted / peak - 1) < 0.03, (predicted, measured)
    if strategy == "fsdp":
        assert [c["unsettled"] for c in result.extra["rank_collectives"]] == [0, 0]
        assert all(c["calls"] > 0 for c in result.extra["rank_collectives"])
    assert result.extra["rank_status"] == ["fits", "fits"]


SETTLE_RANK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from autofit.parallel import settled_collectives, _use_counts
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    held = 0
    with settled_collectives() as stats:
        for i in range(40):
            inp, out = torch.randn(4096), torch.empty(8192)
            before = _use_counts([out, inp])
            if i % 2:
                work = dist.all_gather_single(out, inp, async_op=True)
                assert isinstance(work, dist.Work)
                work.wait()
                del work
            else:
                assert dist.all_gather_single(out, inp) is None
            held += _use_counts([out, inp]) != before
            assert torch.equal(out[rank * 4096:(rank + 1) * 4096], inp)
    # gloo's reduce-scatter stages through a flat buffer its worker allocates and the caller's
    # wait() splits: with a tracker, the call returns once that buffer is freed too
    from autofit.memory import MemoryTracker
    tracker, staged, left = MemoryTracker(), 0, 0
    with settled_collectives(tracker=tracker) as rs_stats, tracker:
        for i in range(20):
            inp, out = torch.full((8192,), float(rank + 1)), torch.empty(4096)
            mark = len(tracker.blocks)
            dist.reduce_scatter_single(out, inp)
            staged += len(tracker.blocks) > mark
            left += sum(b.free_seq is None for b in tracker.blocks[mark:])
            assert torch.equal(out, torch.full((4096,), 3.0))
    assert dist.all_gather_single.__name__ == "all_gather_single"  # restored
    assert staged > 0, "no staging buffer seen: gloo changed, revisit settled_collectives"
    print("RESULT", held + left, stats.get("calls", 0) + rs_stats.get("calls", 0),
          stats.get("unsettled", 0) + rs_stats.get("unsettled", 0), flush=True)
    dist.destroy_process_group()
""")


def test_settled_collectives_leave_no_tensor_held_by_gloo(tmp_path):
    """Two real gloo ranks, 40 all-gathers each (sync and async) and 20 reduce-scatters under a
    tracker: when the call (or the work's wait) returns, gloo's worker holds no reference to the
    output any more, its staging buffer is freed, and the data is right. Unsettled, about one
    call in ten returns with the output held (4-5 of 40 seen)."""
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
    procs = [subprocess.Popen([sys.executable, "-c", SETTLE_RANK, str(rank), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
             for rank in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for proc, text in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, text
        held, calls, unsettled = map(int, text.split("RESULT")[1].split())
        assert (held, calls, unsettled) == (0, 60, 0), text


# --------------------------------------------------------------------------- trials


def test_oom_on_one_rank_is_oom():
    result = run_rank_trial(tiny_spec("rank_faults.HugeOnRank1"), Candidate(batch_size=2, input_size=0),
                            limit_bytes=16 * 2**20, timeout_s=60)
    assert result.status is TrialStatus.OOM, result.message
    assert result.message.startswith("rank 1:")


def test_dead_rank_is_crashed_and_kills_the_group():
    result = run_rank_trial(tiny_spec("rank_faults.DiesOnRank1"), Candidate(batch_size=2, input_size=0),
                            timeout_s=60)
    assert result.status is TrialStatus.CRASHED
    assert "rank 1 of 2 exited with code 3" in result.message
    assert result.wall_time_s < 50


def test_hung_rank_is_timeout():
    result = run_rank_trial(tiny_spec("rank_faults.HangsOnRank1", "fsdp"),
                            Candidate(batch_size=2, input_size=0), timeout_s=8)
    assert result.status is TrialStatus.TIMEOUT
    assert "killed" in result.message


def test_deepspeed_formula():
    assert deepspeed_zero_bytes(10**9, 8, 3) == 18 * 10**9 // 8
    assert deepspeed_zero_bytes(10**9, 8, 2) == 2 * 10**9 + 16 * 10**9 // 8


def test_needs_sharding_when_batch_one_does_not_fit_unsharded(one_thread):
    """A limit between the fsdp x4 and the unsharded batch-1 peaks: sharding is needed, and
    the smallest world size that fits is reported."""
    from autofit.predict.distributed import sharding_line

    spec = spec_from_dict({"model": {**GPT, "n_embd": 64, "vocab_size": 512},
                           "data": {**TOKENS, "vocab_size": 512, "seq_len": 8}})
    one = Candidate(batch_size=1, input_size=8)
    peaks = {n: estimate_rank(spec, one, CPU, RankPlan(strategy="fsdp" if n > 1 else "none",
                                                        world_size=n)).peak_bytes
             for n in (1, 4)}
    assert peaks[1] > peaks[4]
    limit = peaks[4]  # fsdp x2 holds more per rank than x4 (test_fsdp_shards_with_world_size)
    line = sharding_line(spec, one, CPU, limit)
    assert line is not None and line.startswith("needs sharding over >=4 ranks")
    assert sharding_line(spec, one, CPU, peaks[1]) is None
