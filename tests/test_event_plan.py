"""Issue 17: a single-setting tune on CPU predicts from two traces paired event by event
(``batch_curve._plan_by_events``); its first real trials confirm the boundary, and a trial
that contradicts the plan has it pinned by traces (``searches._confirm_by_traces``)."""

from __future__ import annotations

import dataclasses

import pytest
from landscape import Landscape, make_raw, make_spec
from test_profile import GPT_RAW
from test_tune import true_max

from autofit.candidate import Candidate, Setting
from autofit.choices import Precision
from autofit.predict import batch_curve
from autofit.predict.batch_curve import predict_max_batch
from autofit.predict.device_model import CPU, CUDA_DEFAULT
from autofit.predict.estimates import MemoryEstimate
from autofit.predict.trace import estimate
from autofit.search.events import Note
from autofit.search.plan import plan_limits
from autofit.search.tuner import run_search as tune
from autofit.search.tuner import trials_confirm
from autofit.spec import spec_from_dict

GPT = GPT_RAW  # the profile tests' small decoder


@pytest.mark.parametrize("raw, limit_mib", [(None, 3), (None, 1), (GPT, 8), (GPT, 24)])
def test_two_paired_traces_give_the_traced_boundary(raw, limit_mib):
    """The event lines' answer is the boundary the confirming traces find (the tiny MLP's
    backward peak moves between moments at small batches: one line per stretch needs 7-8
    traces there, the event lines 2), and the peak read off them is the traced one."""
    spec = make_spec() if raw is None else spec_from_dict(raw)
    base = Candidate(batch_size=1, input_size=spec.default_input_size)
    limit = limit_mib * 2**20
    planned = predict_max_batch(spec, base, CPU, limit, confirm=False)
    pinned = predict_max_batch(spec, base, CPU, limit)
    b = planned.batch_size
    assert not planned.confirmed and planned.traces == 2
    assert pinned.confirmed and pinned.traces >= 3
    assert b == pinned.batch_size > 2
    assert estimate(spec, base.with_batch(b), CPU).peak_bytes <= limit
    assert estimate(spec, base.with_batch(b + 1), CPU).peak_bytes > limit
    assert planned.estimate.peak_bytes == estimate(spec, base.with_batch(b), CPU).peak_bytes
    # the curve handed to the pinner is the line of the event peaking at the answer
    assert planned.curve.peak_at(b) == pytest.approx(planned.estimate.peak_bytes, abs=1)
    assert planned.curve.peak_at(b + 1) > limit


def test_traces_that_do_not_pair_are_pinned_as_before(monkeypatch):
    spec = make_spec()
    base = Candidate(batch_size=1, input_size=0)
    limit = 3 * 2**20
    monkeypatch.setattr(batch_curve, "_event_plan", lambda ea, eb: None)
    result = predict_max_batch(spec, base, CPU, limit, confirm=False)
    assert result.confirmed and result.traces >= 3
    assert result.batch_size == predict_max_batch(spec, base, CPU, limit).batch_size


def test_events_pair_only_with_the_same_stretches_and_counts():
    ops = {"1:forward": "aa", "1:backward": "bb"}

    def est(lives: dict[str, list[int]], digests: dict[str, str] = ops) -> MemoryEstimate:
        return MemoryEstimate(candidate=Candidate(batch_size=1, input_size=0), breakdown=None,  # type: ignore[arg-type]
                              device_kind="cpu", allocated_bytes=0, reserved_bytes=0,
                              trace_time_s=0.0, param_count=0, stretch_lives=lives,
                              stretch_ops={k: v for k, v in digests.items() if k in lives})

    a = est({"1:forward": [10, 30, 20], "1:backward": [40]})
    assert batch_curve._event_plan(a, est({"1:forward": [12, 50, 25], "1:backward": [44]})) == {
        "1:forward": [(10, 12), (20, 25), (30, 50)], "1:backward": [(40, 44)]}
    assert batch_curve._event_plan(a, est({"1:forward": [12, 50], "1:backward": [44]})) is None
    assert batch_curve._event_plan(a, est({"1:forward": [12, 50, 25]})) is None
    assert batch_curve._event_plan(a, est({})) is None
    # as many allocations, but other ops made them (a kernel chosen by size): no pairing
    other = {"1:forward": "ax", "1:backward": "bb"}
    assert batch_curve._event_plan(a, est({"1:forward": [12, 50, 25], "1:backward": [44]},
                                          other)) is None


def test_batch_one_does_not_pair_on_a_vit_but_batch_two_does():
    """Why the plan starts at batch 2: at batch 1 a ViT's backward makes one allocation fewer
    (a size-1 dim makes a layout contiguous: no copy), so its events cannot pair."""
    spec = spec_from_dict({**GPT, "name": "events-vit",
                           "model": {"_target_": "autofit.zoo.vit", "image_size": 16,
                                     "patch_size": 4, "dim": 32, "depth": 1, "heads": 2,
                                     "num_classes": 10},
                           "data": {"kind": "image", "channels": 3, "size": 16,
                                    "num_classes": 10}})
    one, two, nine = (estimate(spec, Candidate(batch_size=b, input_size=16), CPU)
                      for b in (1, 2, 9))
    assert batch_curve._event_plan(one, nine) is None
    assert batch_curve._event_plan(two, nine) is not None


def test_event_lives_survive_the_trace_cache():
    spec = make_spec()
    e = estimate(spec, Candidate(batch_size=3, input_size=0), CPU)
    assert e.stretch_lives and all(max(v) == e.segment_peaks[k]
                                   for k, v in e.stretch_lives.items())
    back = MemoryEstimate.from_dict(e.to_dict(full=True))
    assert back.stretch_lives == e.stretch_lives and back.stretch_ops == e.stretch_ops
    assert e.stretch_ops.keys() == e.stretch_lives.keys()
    assert "stretch_lives" not in e.to_dict()  # results.json and reports stay as they were


def test_a_single_setting_cpu_tune_predicts_from_two_traces():
    spec = make_spec()
    land = Landscape()
    said: list[str] = []
    result = tune(spec, runner=land,
                  on_event=lambda e: said.append(e.message) if isinstance(e, Note) else None)
    b = result.best.result.candidate.batch_size
    assert [c[0] for c in land.calls] == [b, b + 1]
    predicted = [m for m in said if m.startswith("predicted max batch")]
    assert len(predicted) == 1 and "(2 traces" in predicted[0]
    assert "paired event by event" in predicted[0]
    assert not any("ran out of memory although" in m for m in said + result.notes)


def test_a_trial_that_contradicts_the_plan_has_it_pinned_by_traces(monkeypatch):
    """An event plan 20% too high (as a model whose memory is not affine in batch would give:
    a batch x batch similarity matrix): the trial there runs out of memory, the plan is
    pinned by traces, and the next trial is the traced boundary: 3 trials, not a descent."""
    planned = batch_curve._plan_by_events

    def too_high(*args, **kwargs):
        found = planned(*args, **kwargs)
        return None if found is None else (int(found[0] * 1.2), found[1])

    monkeypatch.setattr(batch_curve, "_plan_by_events", too_high)
    spec = make_spec()
    land = Landscape()
    result = tune(spec, runner=land)
    found = result.best.result.candidate.batch_size
    assert found == true_max(spec, land, result.limit_bytes)
    assert [c[0] for c in land.calls] == [int(found * 1.2), found, found + 1]
    assert any("ran out of memory although two traces paired" in n for n in result.notes)


def test_trials_that_need_more_than_traced_still_pin_the_true_max():
    """Trials 6% over the trace everywhere (not a plan error): the plan pinned by traces
    says the same batch, so the search goes on from the trial as before."""
    spec = make_spec()
    land = Landscape(factor=1.06)
    result = tune(spec, runner=land)
    found = result.best.result.candidate.batch_size
    assert found == true_max(spec, land, result.limit_bytes)
    ran = {c[0] for c in land.calls}
    assert found in ran and found + 1 in ran
    assert len(land.calls) <= 8


def test_several_settings_ranks_or_cuda_keep_the_confirming_trace():
    spec = make_spec()
    plan = plan_limits(spec, None)
    setting = Setting(0, Precision.FP32, 0)
    assert trials_confirm(spec, plan, [setting])
    assert not trials_confirm(spec, plan, [setting, Setting(0, Precision.BF16, 0)])
    assert not trials_confirm(spec, dataclasses.replace(plan, device_model=CUDA_DEFAULT),
                              [setting])
    assert not trials_confirm(make_spec(objective="max_throughput"), plan, [setting])
    ddp = make_raw()
    ddp["parallel"] = {"strategy": "ddp", "world_size": 2}
    assert not trials_confirm(spec_from_dict(ddp), plan, [setting])
