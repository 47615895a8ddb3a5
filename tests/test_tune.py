"""tune(): injected OOM landscapes, exact trial sequences, objectives, resume, failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from landscape import Landscape, make_spec

from autofit.candidate import Candidate
from autofit.choices import LimitKind
from autofit.errors import SearchError, TrialError, TuneFailed, TuneInterrupted
from autofit.memory import MemoryBreakdown
from autofit.search.pinner import BatchPinner
from autofit.search.searches import CPU_BUDGET_VERIFY_STEPS
from autofit.search.tuner import run_search as tune
from autofit.spec import spec_from_dict
from autofit.trials import TrialResult, TrialStatus

MiB = 2**20

# The Landscape runner reports the CPU budget, under which the verification runs
# CPU_BUDGET_VERIFY_STEPS timed steps (``verification_steps``); the spec's verify_steps is 3.
# A search trial at the winner runs 2 warm-up + 1 timed step, as many past step 2 as that
# verification would: it is reused as the verification (``reusable_verification``).
VERIFY = CPU_BUDGET_VERIFY_STEPS


class CudaLandscape(Landscape):
    """The same landscape reported as a CUDA-capped run: the verification runs for real."""

    def __call__(self, spec, candidate, *, limit_bytes, steps, device):
        result = super().__call__(spec, candidate, limit_bytes=limit_bytes, steps=steps,
                                  device=device)
        result.limit_kind = LimitKind.CUDA_FRACTION
        return result


def true_max(spec, landscape: Landscape, limit: int, setting=(0, "fp32", 0)) -> int:
    """Exhaustive answer by bisection on the (monotonic) landscape."""
    size, precision, segments = setting

    def fits(b: int) -> bool:
        c = Candidate(batch_size=b, input_size=size, precision=precision, checkpoint_segments=segments)
        return landscape.peak(spec, c) <= limit

    lo, hi = 0, spec.search.batch_size.max + 1  # fits(lo) (0 = none), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def test_exact_prediction_pins_in_two_trials_plus_verify():
    spec = make_spec()
    land = Landscape()
    result = tune(spec, runner=land)
    b = result.best.result.candidate.batch_size
    # the first trial is the predicted max, the second the step above; under the CPU budget
    # the first one is the verification (it ran step 2 and one more)
    assert land.calls == [(b, 0, "fp32", 0, 1), (b + 1, 0, "fp32", 0, 1)]
    assert b == true_max(spec, land, result.limit_bytes)
    assert result.best.purpose == "verify" and result.best.reused
    assert result.best.number == result.trials[0].number
    assert [t.result.status for t in result.trials] == [TrialStatus.FITS, TrialStatus.OOM]
    assert result.search_trials == result.real_trials == 2
    assert result.to_dict()["best"]["verified"] is True
    assert result.to_dict()["best"]["verification"] == "search trial reused"
    assert any("reused as the verification" in note for note in result.notes)
    # reported as a CUDA-capped run, the same landscape gets its own verification trial
    cuda = CudaLandscape()
    result = tune(spec, runner=cuda)
    assert cuda.calls == land.calls + [(b, 0, "fp32", 0, spec.search.verify_steps)]
    assert result.best.purpose == "verify" and not result.best.reused
    assert result.to_dict()["best"]["verification"] == "own trial"
    assert not any("reused as the verification" in note for note in result.notes)


@pytest.mark.parametrize("factor", [1.06, 0.93])
def test_mispredicted_landscape_still_finds_true_max(factor):
    spec = make_spec()
    land = Landscape(factor=factor)
    result = tune(spec, runner=land)
    found = result.best.result.candidate.batch_size
    assert found == true_max(spec, land, result.limit_bytes)
    # pinned: found ran and fit, found+1 ran and did not fit
    ran = {(c[0], c[4]) for c in land.calls}
    assert (found, 1) in ran and (found + 1, 1) in ran
    assert len(land.calls) <= 8
    # never returns a batch that was not run: its verification is that very trial
    assert result.best.reused and result.best.result.candidate.batch_size == found
    assert result.best.number in {t.number for t in result.trials if t.purpose != "verify"}


def test_spec_max_caps_the_search():
    spec = make_spec(batch_size={"min": 1, "max": 5})
    land = Landscape()
    result = tune(spec, runner=land)
    assert result.best.result.candidate.batch_size == 5
    assert land.calls == [(5, 0, "fp32", 0, 1)]  # verified by that trial (CPU budget)


def test_multiple_of_respected():
    spec = make_spec(batch_size={"min": 8, "max": 4096, "multiple_of": 8})
    land = Landscape()
    result = tune(spec, runner=land)
    assert all(call[0] % 8 == 0 for call in land.calls)
    found = result.best.result.candidate.batch_size
    assert land.peak(spec, result.best.result.candidate) <= result.limit_bytes
    assert land.peak(spec, result.best.result.candidate.with_batch(found + 8)) > result.limit_bytes


def test_nothing_fits_names_the_knobs():
    spec = make_spec(batch_size={"min": 1, "max": 64})
    spec = spec_from_dict({**spec.raw, "memory": {"budget": "1MiB", "margin": 0.9}})
    land = Landscape()
    with pytest.raises(TuneFailed) as info:
        tune(spec, runner=land)
    assert isinstance(info.value.cause, SearchError)
    assert info.value.partial is not None and info.value.partial.best is None
    assert len(info.value.partial.trials) == len(land.calls)  # what ran is kept
    message = str(info.value)
    assert "nothing fits" in message
    assert "checkpoint" in message and "precision" in message and "budget" in message


def test_fits_only_at_batch_one():
    spec = make_spec(batch_size={"min": 1, "max": 64})
    land = Landscape()
    one = land.peak(spec, Candidate(batch_size=1, input_size=0))
    two = land.peak(spec, Candidate(batch_size=2, input_size=0))
    budget = int((one + two) / 2 / 0.9)
    spec = spec_from_dict({**spec.raw, "memory": {"budget": budget, "margin": 0.1}})
    result = tune(spec, runner=land)
    assert result.best.result.candidate.batch_size == 1
    assert (2, 0, "fp32", 0, 1) in land.calls


def test_user_error_stops_search_with_real_message():
    spec = make_spec()
    probe = Landscape()
    tune(spec, runner=probe)
    predicted = probe.calls[0][0]
    land = Landscape(fail_at=predicted)
    with pytest.raises(TuneFailed, match="mat1 and mat2") as info:
        tune(spec, runner=land)
    assert isinstance(info.value.cause, TrialError)
    assert [r.result.status.value for r in info.value.partial.trials] == ["error"]
    assert len(land.calls) == 1


def test_verification_failure_steps_down():
    spec = make_spec()

    class FlakyAtLong(CudaLandscape):  # on CUDA the verification runs (verify_steps)
        def __call__(self, spec, candidate, *, limit_bytes, steps, device):
            result = super().__call__(spec, candidate, limit_bytes=limit_bytes, steps=steps, device=device)
            if steps == spec.search.verify_steps and not getattr(self, "failed", False):
                self.failed = True
                return TrialResult(candidate=candidate, status=TrialStatus.OOM, message="late oom",
                                   limit_bytes=limit_bytes)
            return result

    land = FlakyAtLong()
    result = tune(spec, runner=land)
    first = land.calls[0][0]
    assert result.best.result.candidate.batch_size == first - 1
    assert any("stepping down" in note for note in result.notes)


def test_three_axis_search_uses_fewer_trials_than_combinations():
    spec = make_spec(input_size=None) if False else make_spec(
        precision=["fp32", "bf16", "fp16"], checkpoint_segments=[0, 1, 2])
    raw = dict(spec.raw)
    raw["model"] = {"_target_": "autofit.zoo.gpt", "vocab_size": 64, "block_size": 32, "n_layer": 2,
                    "n_head": 2, "n_embd": 32}
    raw["data"] = {"kind": "tokens", "vocab_size": 64, "seq_len": 32}
    raw["search"] = {**raw["search"], "input_size": [8, 16, 32]}
    raw["memory"] = {"budget": "16MiB", "margin": 0.1}
    spec = spec_from_dict(raw)
    land = Landscape()
    result = tune(spec, runner=land)
    assert len(land.calls) < 27
    # the winner is the setting with the largest true max batch
    best = result.best.result.candidate
    assert best.input_size == 8
    assert land.peak(spec, best) <= result.limit_bytes
    assert land.peak(spec, best.with_batch(best.batch_size + 1)) > result.limit_bytes
    front = result.pareto()
    assert set(front) == {"fp32", "bf16", "fp16"}


def test_max_input_size_objective_picks_largest_fitting_size():
    raw = dict(make_spec().raw)
    raw["model"] = {"_target_": "autofit.zoo.gpt", "vocab_size": 64, "block_size": 64, "n_layer": 2,
                    "n_head": 2, "n_embd": 32}
    raw["data"] = {"kind": "tokens", "vocab_size": 64, "seq_len": 16}
    raw["search"] = {**raw["search"], "objective": "max_input_size", "input_size": [16, 32, 64],
                     "batch_size": {"min": 8, "max": 64}}
    land = Landscape()
    spec = spec_from_dict(raw)
    c32 = land.peak(spec, Candidate(batch_size=8, input_size=32))
    c64 = land.peak(spec, Candidate(batch_size=8, input_size=64))
    budget = int((c32 + c64) / 2 / 0.9)  # 32 fits at batch 8, 64 does not
    raw["memory"] = {"budget": budget, "margin": 0.1}
    spec = spec_from_dict(raw)
    result = tune(spec, runner=land)
    assert result.best.result.candidate.input_size == 32
    assert result.best.result.candidate.batch_size == 8


def test_max_throughput_objective_picks_fastest_measured():
    raw = dict(make_spec().raw)
    raw["search"] = {**raw["search"], "objective": "max_throughput", "precision": ["fp32", "bf16"]}
    spec = spec_from_dict(raw)
    # bf16 made artificially 3x faster: it must win although its batch is not larger
    land = Landscape(speed=lambda c: (300.0 if c.precision == "bf16" else 100.0))
    result = tune(spec, runner=land)
    assert result.best.result.candidate.precision == "bf16"
    assert result.best.result.fits


def test_resume_repeats_no_trial(tmp_path: Path):
    spec = make_spec()
    first = Landscape(interrupt_after=1)
    with pytest.raises(TuneInterrupted) as info:
        tune(spec, out_dir=tmp_path, runner=first)
    assert len(first.calls) == 1
    assert info.value.exit_code == 130 and info.value.partial is not None
    second = Landscape()
    result = tune(spec, out_dir=tmp_path, resume=True, runner=second)
    assert first.calls[0] not in second.calls
    assert [r.resumed for r in result.trials][0] is True
    assert len(second.calls) == 1  # the step above only: the resumed trial verifies
    assert result.best.reused and result.best.resumed
    assert (tmp_path / "study.journal").exists()


def test_pinner_bisects_without_prediction():
    spec = make_spec(batch_size={"min": 1, "max": 100})
    pinner = BatchPinner(spec, (0, "fp32", 0), None, 1000)
    seen = []
    while pinner.next is not None:
        b = pinner.next
        seen.append(b)
        fits = b <= 37
        result = TrialResult(candidate=pinner.candidate(b),
                             status=TrialStatus.FITS if fits else TrialStatus.OOM,
                             memory=MemoryBreakdown(peak_bytes=b * 10))
        pinner.observe(b, result)
        assert len(seen) < 20
    assert pinner.best_fit == 37 and pinner.first_fail == 38


def test_targets_on_cuda_are_verified_by_capped_trials():
    from autofit.predict.device_model import CUDA_DEFAULT
    from autofit.search.plan import Plan
    from autofit.search.results import TrialRecord
    from autofit.search.targets import configure_targets as _targets

    raw = dict(make_spec().raw)
    raw["targets"] = [{"name": "A100-40GB", "memory": "40GiB"},
                      {"name": "V100-16GB", "memory": "16GiB", "bf16": False},
                      {"name": "Big-200GB", "memory": "200GB"}]
    raw["search"] = {**raw["search"], "batch_size": {"min": 1, "max": 256}, "precision": ["bf16"]}
    spec = spec_from_dict(raw)
    plan = Plan("cuda:0", {"name": "Fake H100", "total_bytes": 80 * 2**30}, CUDA_DEFAULT,
                80 * 2**30, int(72 * 2**30))
    calls = []

    def runner(spec_, candidate, *, limit_bytes, steps, device):
        calls.append((candidate.batch_size, candidate.precision, limit_bytes, device))
        return TrialResult(candidate=candidate, status=TrialStatus.FITS,
                           memory=MemoryBreakdown(peak_bytes=1, reserved_bytes=2), limit_bytes=limit_bytes)

    best = TrialRecord(0, "verify", TrialResult(candidate=Candidate(batch_size=8, input_size=0, precision="bf16"),
                                                status=TrialStatus.FITS), None, 3)
    targets = _targets(spec, best, plan, runner)
    by_name = {t["name"]: t for t in targets}
    assert by_name["A100-40GB"]["verified"] and by_name["V100-16GB"]["verified"]
    assert not by_name["Big-200GB"]["verified"]  # larger than the card: prediction only
    assert by_name["V100-16GB"]["precision"] == "fp16"  # no bf16 on V100
    assert [c[3] for c in calls] == ["cuda:0", "cuda:0"]
    assert calls[1][2] < calls[0][2] < 40 * 2**30  # capped to each target's usable bytes
