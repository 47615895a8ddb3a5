"""The trace cache keys what the CPU limit changes in an estimate (issue 14).

Under ``cpu_limit: rlimit`` the limit is the CPU allocator, so an uncalibrated estimate also
names the ops whose scratch the trace cannot see (oneDNN convolution); under the default
budget limit it does not. A cached estimate of one limit must not answer the other.
"""

from __future__ import annotations

from autofit.candidate import Candidate
from autofit.predict import cache as trace_cache
from autofit.predict.device_model import CPU
from autofit.predict.trace import estimate
from autofit.spec import spec_from_dict

RAW = {"name": "conv-limits",
       "model": {"_target_": "autofit.zoo.resnet", "depth": 18, "width": 4, "num_classes": 3},
       "data": {"kind": "image", "channels": 3, "size": 16, "num_classes": 3}, "device": "cpu",
       "memory": {"budget": "1GiB"}}


def _conv_lines(est) -> list[str]:
    return [line for line in est.misreporting if line.startswith("aten.convolution")]


def test_budget_and_rlimit_estimates_are_cached_apart(tmp_path, one_thread) -> None:
    budget = spec_from_dict(RAW)
    rlimit = spec_from_dict({**RAW, "memory": {"budget": "1GiB", "cpu_limit": "rlimit"}})
    cand = Candidate(batch_size=2, input_size=16)
    cpu = CPU
    cache = trace_cache.TraceCache(tmp_path / "c")
    with trace_cache.using(cache):
        first = estimate(budget, cand, cpu)
        other = estimate(rlimit, cand, cpu)  # a miss: its own trace, with its own lines
        assert (cache.hits, cache.new) == (0, 2)
        assert not _conv_lines(first) and _conv_lines(other)
        again, again_r = estimate(budget, cand, cpu), estimate(rlimit, cand, cpu)
        assert (cache.hits, cache.new) == (2, 2)
        assert again.cached and again_r.cached
        assert again.misreporting == first.misreporting
        assert again_r.misreporting == other.misreporting
    assert other.peak_bytes == first.peak_bytes  # the trace itself is the same
    # the budget limit's keys are those of a spec that does not name cpu_limit
    assert cache.key(budget, cand, cpu) == cache.key(
        spec_from_dict({**RAW, "memory": {"budget": "1GiB", "cpu_limit": "budget"}}), cand, cpu)
