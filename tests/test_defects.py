"""One test per defect fixed in b21a918; each fails on the pre-fix tree (2ea0e19).

The modules moved in that commit, so the old code cannot run these tests as they are; each
test says which old behaviour it would have caught.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from landscape import RAW, Landscape, make_raw

import autofit
from autofit.candidate import Candidate
from autofit.choices import LimitKind, Purpose, Strategy
from autofit.memory import MemoryBreakdown
from autofit.spec import spec_from_dict
from autofit.trials import TrialResult, TrialStatus

pytestmark = pytest.mark.usefixtures("one_thread")

def _study_trials(out_dir: Path) -> list:
    """Every optuna trial in the journal a tune wrote into ``out_dir``."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(out_dir / "study.journal")))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _sampler_proposed(trials: list) -> list:
    """Trials the TPE sampler proposed (the ledger enqueues every point it runs itself)."""
    return [t for t in trials if "fixed_params" not in t.system_attrs]


# 1 ----------------------------------------------------------------------------------------

STEP_MODULE = '''
import torch

calls = 0


def step(model, batch_size, input_size, device):
    global calls
    calls += 1
    if calls == 3:  # the first timed step, after two warm-up steps
        raise torch.OutOfMemoryError("injected")
    x = torch.randn(batch_size, 64, device=device)
    return model(x).pow(2).mean()
'''


def test_oom_in_an_untracked_timed_step_stays_an_oom(tmp_path: Path, monkeypatch):
    """Old (worker.py): on CUDA the tracker was left by hand (``tracker.__exit__``) inside
    ``with tracker:``; an OOM in a timed step then left the ``with``, which popped the
    dispatch mode a second time, so the trial reported IndexError "pop from empty list"
    (an error that stops the search) instead of an OOM."""
    from autofit.trials.child import run_in_child

    (tmp_path / "autofit_defect_step.py").write_text(STEP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {
        "name": "user-step",
        "model": copy.deepcopy(RAW["model"]),
        "step": "autofit_defect_step.step",
        "device": "cpu",
        "memory": {"budget": "64MiB", "margin": 0.10},
    }
    spec_from_dict(raw, check_imports=True)  # the spec itself is valid
    request = {
        "spec": raw, "source": None,
        "candidate": Candidate(batch_size=4, input_size=0).to_dict(),
        "device": "cpu", "limit_bytes": 256 * 2**20, "cpu_limit": "budget",
        "warmup_steps": 2, "steps": 3, "untracked_timed_steps": True,
    }
    result = run_in_child(request)
    assert result["status"] == "oom", result
    assert "pop from empty" not in result["message"]
    assert "injected" in result["message"]
    assert result["steps_run"] == 3


# 2 ----------------------------------------------------------------------------------------

def test_search_strategy_is_what_ran(tmp_path: Path):
    """Old (tune.py): max_batch never consulted the sampler while results said "optuna"
    (``auto`` with two settings, or an explicit ``optuna``), and max_throughput always let
    the sampler propose ("explore" trials) even with ``strategy: binary``."""
    two = ["fp32", "bf16"]

    optuna_dir = tmp_path / "max-batch-optuna"
    result = autofit.tune(make_raw(precision=two, strategy="optuna"), out_dir=optuna_dir,
                          runner=Landscape())
    assert result.strategy == "optuna"
    assert json.loads((optuna_dir / "results.json").read_text())["strategy"] == "optuna"
    assert _sampler_proposed(_study_trials(optuna_dir)), "optuna reported but never asked"

    auto_dir = tmp_path / "max-batch-auto"
    result = autofit.tune(make_raw(precision=two), out_dir=auto_dir, runner=Landscape())
    assert result.strategy == "binary"
    assert json.loads((auto_dir / "results.json").read_text())["strategy"] == "binary"
    assert not _sampler_proposed(_study_trials(auto_dir))

    binary_dir = tmp_path / "throughput-binary"
    result = autofit.tune(make_raw(precision=two, objective="max_throughput", strategy="binary"),
                          out_dir=binary_dir, runner=Landscape())
    assert result.strategy == "binary"
    assert all(t.purpose != Purpose.EXPLORE for t in result.trials)
    data = json.loads((binary_dir / "results.json").read_text())
    assert data["strategy"] == "binary"
    assert all(t["purpose"] != "explore" for t in data["trials"])
    assert not _sampler_proposed(_study_trials(binary_dir))

    result = autofit.tune(make_raw(precision=two, objective="max_throughput"),
                          out_dir=tmp_path / "throughput-auto", runner=Landscape())
    assert result.strategy == "optuna"


# 3 ----------------------------------------------------------------------------------------

def test_tpe_learns_from_recorded_trials():
    """Old (tune.py): trials were recorded with params input_size/precision/checkpoint_segments
    but the sampler was asked for one categorical "setting", a parameter no recorded trial
    had: TPE proposed from no history (random), however clearly the records said bf16."""
    import optuna

    from autofit.search.study import Ledger, open_study, propose_setting

    raw = make_raw(precision=["fp32", "bf16"], input_size=[8, 16], objective="max_throughput",
                   batch_size={"min": 1, "max": 64})
    raw["model"] = {"_target_": "autofit.zoo.gpt", "vocab_size": 64, "block_size": 16,
                    "n_layer": 1, "n_head": 2, "n_embd": 16}
    raw["data"] = {"kind": "tokens", "vocab_size": 64, "seq_len": 16}
    spec = spec_from_dict(raw)
    limit = 2**30

    def runner(spec_, candidate, *, limit_bytes, steps, device) -> TrialResult:
        if candidate.precision == "fp32":
            return TrialResult(candidate=candidate, status=TrialStatus.OOM, message="oom",
                               memory=MemoryBreakdown(peak_bytes=2 * limit_bytes),
                               limit_bytes=limit_bytes, limit_kind=LimitKind.CPU_BUDGET)
        return TrialResult(candidate=candidate, status=TrialStatus.FITS,
                           memory=MemoryBreakdown(peak_bytes=limit_bytes // 2),
                           limit_bytes=limit_bytes, step_time_s=0.01,
                           samples_per_s=1000.0 * candidate.batch_size,
                           units_per_s=1000.0 * candidate.batch_size * candidate.input_size,
                           limit_kind=LimitKind.CPU_BUDGET)

    study = open_study(spec, None, None, False)
    ledger = Ledger(spec, limit, "cpu", study, runner, emit=lambda e: None, max_trials=0)
    for batch in (4, 8, 16):
        for size in (8, 16):
            for precision in ("fp32", "bf16"):
                if precision == "fp32" and batch == 16:
                    continue
                ledger.run(Candidate(batch_size=batch, input_size=size, precision=precision),
                           Purpose.PREDICTED, None)
    recorded = study.get_trials(deepcopy=False)
    assert len(recorded) == 10
    for trial in recorded:  # the sampler's space is the records' space
        assert {"precision", "input_size", "checkpoint_segments"} <= set(trial.params)

    proposed = []
    for _ in range(20):
        asked, setting = propose_setting(study, spec)
        proposed.append(setting.precision.value)
        study.tell(asked, state=optuna.trial.TrialState.PRUNED)
    assert proposed.count("bf16") >= 15, proposed


# 4 ----------------------------------------------------------------------------------------

def test_target_never_verified_is_failed_and_gets_no_config(tmp_path: Path):
    """Old (tune.py ``_targets``): when every capped run ran out of memory the entry kept the
    predicted batch (never run) with verified False, so targets.yaml called it
    "predicted-only" and configs/<target>.yaml pinned that batch; the step-down
    (``batch - max(1, batch // 20)``) ignored multiple_of and could re-run the same batch."""
    from autofit.export import write_exports
    from autofit.predict.device_model import CUDA_DEFAULT
    from autofit.search.plan import Plan
    from autofit.search.results import TrialRecord, TuneResult
    from autofit.search.targets import configure_targets

    raw = make_raw(batch_size={"min": 8, "max": 256, "multiple_of": 8}, precision=["bf16"])
    raw["targets"] = [{"name": "A100-40GB", "memory": "40GiB"}]
    spec = spec_from_dict(raw)
    plan = Plan("cuda:0", {"name": "Fake H100", "total_bytes": 80 * 2**30}, CUDA_DEFAULT,
                80 * 2**30, int(72 * 2**30))
    batches: list[int] = []

    def always_oom(spec_, candidate, *, limit_bytes, steps, device) -> TrialResult:
        batches.append(candidate.batch_size)
        return TrialResult(candidate=candidate, status=TrialStatus.OOM, message="oom",
                           memory=MemoryBreakdown(peak_bytes=limit_bytes + 1),
                           limit_bytes=limit_bytes, limit_kind=LimitKind.CUDA_FRACTION)

    best = TrialRecord(0, Purpose.VERIFY,
                       TrialResult(candidate=Candidate(batch_size=8, input_size=0, precision="bf16"),
                                   status=TrialStatus.FITS,
                                   memory=MemoryBreakdown(peak_bytes=1)), None, 3)
    (entry,) = configure_targets(spec, best, plan, always_oom)
    assert batches, "the target was never verified"
    assert entry["failed"] is True
    assert entry["batch_size"] == 0
    assert entry["verified"] is False
    assert len(batches) == len(set(batches)), batches  # never the same batch twice
    assert all(b % 8 == 0 for b in batches), batches

    result = TuneResult(spec=spec, device=plan.device_info, budget_bytes=plan.budget_bytes,
                        limit_bytes=plan.limit_bytes, strategy=Strategy.BINARY, best=best,
                        trials=[best], settings=[], targets=[entry])
    data = json.loads(json.dumps(result.to_dict(), default=str))
    written = write_exports(data, tmp_path, ["targets"])
    assert written == [tmp_path / "targets.yaml"]
    assert not (tmp_path / "configs").exists()
    (listed,) = yaml.safe_load((tmp_path / "targets.yaml").read_text())["targets"]
    assert listed["config"] is None
    assert listed["batch_size"] == 0
    # a failed target is neither verified nor "predicted-only" (at b21a918 itself
    # autofit/export/targets.py still wrote "predicted-only" for it)
    assert listed["status"] == "failed"


# 5 ----------------------------------------------------------------------------------------

def test_storage_url_without_resume_refuses_a_study_with_finished_trials(tmp_path: Path):
    """Old (tune.py ``open_study``): ``load_if_exists=resume or storage is not None``: with
    --storage the second tune silently continued the first one's study without --resume."""
    pytest.importorskip("sqlalchemy")
    storage = "sqlite:///" + str(tmp_path / "s.db")
    first = autofit.tune(make_raw(), out_dir=tmp_path / "a", storage=storage, runner=Landscape())
    assert first.best is not None

    land = Landscape()
    with pytest.raises(autofit.AutofitError, match="--resume"):
        autofit.tune(make_raw(), out_dir=tmp_path / "b", storage=storage, runner=land)
    assert land.calls == []

    again = Landscape()
    resumed = autofit.tune(make_raw(), out_dir=tmp_path / "c", storage=storage, resume=True,
                           runner=again)
    assert again.calls == []  # every trial came from the study
    assert resumed.trials and all(t.resumed for t in resumed.trials)
    assert resumed.best.result.candidate == first.best.result.candidate


# 6 ----------------------------------------------------------------------------------------

def test_resume_refuses_an_output_dir_made_by_a_different_spec(tmp_path: Path):
    """Old (tune.py ``open_study``): --resume created this spec's study beside the other
    spec's in the same journal, ran a fresh search and overwrote its results."""
    autofit.tune(make_raw(), out_dir=tmp_path, runner=Landscape())
    before = (tmp_path / "results.json").read_text()
    other = make_raw()
    other["model"]["hidden"] = 32
    land = Landscape()
    with pytest.raises(autofit.AutofitError, match="different spec"):
        autofit.tune(other, out_dir=tmp_path, resume=True, runner=land)
    assert land.calls == []
    assert (tmp_path / "results.json").read_text() == before


# 7 ----------------------------------------------------------------------------------------

def test_profile_writes_plots_under_output_dir_by_default(tmp_path: Path, monkeypatch):
    """Old (cli_profile.py): the PNGs went to the current directory."""
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    raw = make_raw()
    raw["output"] = {"dir": "out"}
    result = autofit.profile(raw, batch_size=4, what_if=False)
    assert not list(tmp_path.glob("*.png"))
    directory = tmp_path / "out" / "profile"
    assert set(result.plots) == {"memory_timeline.png", "peak_vs_batch.png"}, result.plots
    for name, note in result.plots.items():
        assert note == f"wrote {directory / name}"
        assert (directory / name).is_file()


# 8 ----------------------------------------------------------------------------------------

def test_throughput_verifies_when_verify_steps_equal_steps_per_trial(tmp_path: Path):
    """Old (tune.py ``Ledger.run``): trials were cached by (candidate, steps) only, so with
    verify_steps == steps_per_trial the verification "ran" from the search trial's cache:
    no verification trial, best.purpose "predicted", results.json best.verified False."""
    land = Landscape()
    result = autofit.tune(make_raw(objective="max_throughput", steps_per_trial=2,
                                   verify_steps=2), out_dir=tmp_path, runner=land)
    best = result.best
    assert best.purpose == Purpose.VERIFY
    c = best.result.candidate
    at_best = [call for call in land.calls if call[:4] == (c.batch_size, c.input_size,
                                                           c.precision, c.checkpoint_segments)]
    assert len(at_best) == 2  # searched, then verified: the verification really ran
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["best"]["verified"] is True
