"""Verification of a multi-rank winner under the CPU budget (issue 15).

A single-process search trial that ran enough steps past step 2 is reused as the
verification: the budget's peak repeats from step 2. A multi-rank trial's peak repeats only
when its collectives cannot move it: every rank ran its collectives settled (FSDP2 on CPU,
``rank_collectives``) and none stayed held. Otherwise (DDP's all-reduces run inside its
reducer; a collective still held; no record) the winner runs its own verification, over
``verify_steps`` in full, and the notes (results.json) say why.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from landscape import Landscape

from autofit.candidate import Candidate
from autofit.choices import LimitKind, Purpose
from autofit.search.results import TrialRecord
from autofit.search.searches import Search, rank_timing, verify_best
from autofit.spec import spec_from_dict
from autofit.trials.result import TrialResult

GPT = {"_target_": "autofit.zoo.gpt", "vocab_size": 128, "block_size": 32, "n_layer": 2,
       "n_head": 2, "n_embd": 32}
TOKENS = {"kind": "tokens", "vocab_size": 128, "seq_len": 32}
SETTLED = {"calls": 12, "waited": 3, "unsettled": 0}


def raw(parallel: dict[str, Any] | None, **search: Any) -> dict[str, Any]:
    out = {"name": "rank-verify", "model": GPT, "data": TOKENS, "device": "cpu",
           "memory": {"budget": 1_200_000, "margin": 0.0},
           "search": {"batch_size": {"min": 1, "max": 64}, "steps_per_trial": 1,
                      "verify_steps": 3, **search}}
    if parallel is not None:
        out["parallel"] = parallel
    return out


def trial(extra: dict[str, Any], steps_run: int = 3) -> TrialRecord:
    result = TrialResult(candidate=Candidate(batch_size=4, input_size=32), status="fits",
                         limit_kind=LimitKind.CPU_BUDGET, steps_run=steps_run, extra=extra)
    return TrialRecord(number=3, purpose=Purpose.REFINE, result=result,
                       predicted_peak_bytes=1, steps=1)


class Ledger:  # a verification that runs records itself here
    max_trials = 0

    def __init__(self) -> None:
        self.ran: list[tuple[int, int]] = []

    def run(self, candidate, purpose, predicted_peak, steps=None, asked=None):
        self.ran.append((candidate.batch_size, steps))
        return TrialRecord(number=9, purpose=purpose, predicted_peak_bytes=predicted_peak,
                           steps=steps, result=TrialResult(candidate=candidate, status="fits",
                                                           steps_run=2 + steps))


def verify(spec, best: TrialRecord) -> tuple[TrialRecord | None, Ledger, list[str]]:
    ledger = Ledger()
    search = Search(spec, None, {}, {}, ledger, lambda event: None, "binary")  # type: ignore[arg-type]
    return verify_best(search, best), ledger, search.notes


DDP = {"strategy": "ddp", "world_size": 2}
FSDP = {"strategy": "fsdp", "world_size": 2}


@pytest.mark.parametrize(("parallel", "extra", "why"), [
    # DDP: its all-reduces run inside the reducer, no settle record
    (DDP, {"world_size": 2, "strategy": "ddp", "rank_peaks": [10, 11]}, "DDP's all-reduces"),
    # a collective still held after the wait on rank 1
    (FSDP, {"world_size": 2, "rank_collectives": [SETTLED, {**SETTLED, "unsettled": 1}]},
     "1 of its collectives were still held"),
    # one rank ran no collective through the settle; a record for one rank only
    (FSDP, {"world_size": 2, "rank_collectives": [SETTLED, {**SETTLED, "calls": 0}]},
     "did not all run settled"),
    (FSDP, {"world_size": 2, "rank_collectives": [SETTLED]}, "did not all run settled"),
    # no extra at all (a runner that records none): the spec says 2 ranks
    (DDP, {}, "did not all run settled"),
])
def test_rank_trials_with_timing_dependent_peaks_run_their_own_verification(
        parallel, extra, why) -> None:
    spec = spec_from_dict(raw(parallel, verify_steps=10))
    best = trial(extra, steps_run=20)  # far more steps past step 2 than the verification
    ranks, varies = rank_timing(spec, best.result)
    assert ranks == 2 and why in varies
    got, ledger, notes = verify(spec, best)
    assert ledger.ran == [(4, 10)]  # verify_steps in full, not the single budget step
    assert got is not None and got.number == 9 and not got.reused
    assert any(n.startswith("verification: 10 timed steps on 2 ranks in a run of its own")
               and why in n for n in notes), notes


def test_settled_rank_trial_and_single_process_are_reused() -> None:
    """Every rank's collectives settled (FSDP2 on CPU): the peak repeats from step 2 as a
    single process's does, so the search trial is the verification, and the note says so."""
    spec = spec_from_dict(raw(FSDP, verify_steps=10))
    best = trial({"world_size": 2, "rank_collectives": [SETTLED, SETTLED]})
    got, ledger, notes = verify(spec, best)
    assert ledger.ran == [] and got is not None and got.reused and got.purpose == Purpose.VERIFY
    assert any("on 2 ranks, every collective settled," in n and "reused as the verification" in n
               for n in notes), notes
    for parallel, extra in ((None, {}), ({"strategy": "fsdp", "world_size": 1},
                                         {"world_size": 1})):
        got, ledger, notes = verify(spec_from_dict(raw(parallel, verify_steps=10)), trial(extra))
        assert ledger.ran == [] and got is not None and got.reused
        assert not any("ranks" in n for n in notes)
    # too few steps past step 2: a settled rank trial runs, with the budget's single step
    got, ledger, _ = verify(spec, dataclasses.replace(best, result=dataclasses.replace(
        best.result, steps_run=2)))
    assert ledger.ran == [(4, 1)] and got is not None and not got.reused


def test_ddp_tune_verifies_in_a_run_of_its_own_and_says_so(tmp_path, one_thread) -> None:
    """A ddp x2 tune (the landscape as its ranks, no settle record): the winner runs its own
    verification over verify_steps; results.json's notes say why. The same spec on one
    process reuses its search trial."""
    import autofit

    ddp = autofit.tune(raw(DDP), out_dir=tmp_path / "ddp", runner=Landscape(), cache=False)
    assert ddp.best.purpose == Purpose.VERIFY and not ddp.best.reused
    verifies = [t for t in ddp.trials if t.purpose == Purpose.VERIFY]
    assert len(verifies) == 1 and verifies[0].steps == 3
    data = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert any(n.startswith("verification: 3 timed steps on 2 ranks in a run of its own")
               for n in data["notes"]), data["notes"]
    assert not any("reused as the verification" in n for n in data["notes"])

    single = autofit.tune(raw(None), out_dir=tmp_path / "one", runner=Landscape(), cache=False)
    assert single.best.reused
    assert any("reused as the verification" in n for n in single.notes)
    assert single.real_trials == single.search_trials  # no run of its own
    assert ddp.real_trials == ddp.search_trials + 1  # the verification's own run
