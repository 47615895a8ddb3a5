"""autofit's Python API: tune / estimate / trial / export / load_tuned, events, errors, README."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from landscape import Landscape, make_raw, make_spec

import autofit
from autofit.candidate import Candidate
from autofit.trials import TrialResult, TrialStatus

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parent.parent / "README.md"

def _exported(script: Path) -> dict[str, str]:
    """``export NAME=VALUE`` lines of a generated shell script."""
    out = {}
    for line in script.read_text().splitlines():
        m = re.match(r"\s*export\s+(AUTOFIT_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
    return out


def test_tune_from_dict_writes_files_and_emits_paired_events(tmp_path: Path):
    events: list[autofit.TuneEvent] = []
    land = Landscape()
    result = autofit.tune(make_raw(), out_dir=tmp_path, runner=land, on_event=events.append)

    assert isinstance(result, autofit.TuneResult)
    assert result.out_dir == tmp_path
    for name in ("results.json", "tuned.yaml", "torchrun.sh"):
        assert (tmp_path / name).is_file(), name
        assert tmp_path / name in result.files
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema_version"] == 2
    assert data["best"]["batch_size"] == result.best.result.candidate.batch_size

    # events: only TrialStarted / TrialFinished / Note; every real trial is a
    # TrialStarted immediately followed by the TrialFinished of the same candidate
    assert all(isinstance(e, autofit.TrialStarted | autofit.TrialFinished | autofit.Note)
               for e in events)
    assert any(isinstance(e, autofit.Note) for e in events)
    trial_events = [e for e in events if not isinstance(e, autofit.Note)]
    assert len(trial_events) == 2 * len(land.calls) == 2 * len(result.trials)
    for started, finished in zip(trial_events[::2], trial_events[1::2], strict=True):
        assert isinstance(started, autofit.TrialStarted)
        assert isinstance(finished, autofit.TrialFinished)
        assert finished.record.result.candidate == started.candidate
        assert finished.record.purpose == started.purpose
    assert [e.record for e in trial_events[1::2]] == result.trials

    tuned = autofit.load_tuned(tmp_path / "tuned.yaml")
    assert 1 <= tuned.micro_batch_size <= result.best.result.candidate.batch_size
    assert tuned.max_batch_size == result.best.result.candidate.batch_size
    env = _exported(tmp_path / "torchrun.sh")
    assert int(env["AUTOFIT_MICRO_BATCH_SIZE"]) == tuned.micro_batch_size


def test_tune_failure_raises_with_partial_and_keeps_results(tmp_path: Path):
    def broken(spec, candidate, *, limit_bytes, steps, device) -> TrialResult:
        return TrialResult(candidate=candidate, status=TrialStatus.ERROR,
                           message="RuntimeError in forward: boom")

    with pytest.raises(autofit.TuneFailed, match="boom") as info:
        autofit.tune(make_raw(), out_dir=tmp_path, runner=broken)
    exc = info.value
    assert isinstance(exc, autofit.AutofitError)
    assert isinstance(exc.cause, autofit.TrialError)
    assert exc.partial is not None and exc.partial.best is None
    assert [t.result.status for t in exc.partial.trials] == [TrialStatus.ERROR]
    assert exc.partial.out_dir == tmp_path
    data = json.loads((tmp_path / "results.json").read_text())
    assert "boom" in data["error"]
    assert [t["status"] for t in data["trials"]] == ["error"]
    assert "boom" in data["trials"][0]["message"]
    assert data["best"] is None


def test_estimate_path_and_spec_agree_and_bad_knob_is_spec_error(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(make_raw()))
    from_path = autofit.estimate(path, batch_size=4)
    from_spec = autofit.estimate(autofit.load_spec(path), batch_size=4)
    from_dict = autofit.estimate(make_raw(), batch_size=4)
    assert isinstance(from_path, autofit.EstimateResult)
    assert from_path.estimate.peak_bytes > 0
    assert from_path.estimate.peak_bytes == from_spec.estimate.peak_bytes == from_dict.estimate.peak_bytes
    assert from_path.max_batch is not None and from_path.max_batch.batch_size >= 1
    assert from_path.max_batch.batch_size == from_spec.max_batch.batch_size
    with pytest.raises(autofit.SpecError, match="fp8"):
        autofit.estimate(path, batch_size=4, precision="fp8")


def test_export_regenerates_files_from_results_json(tmp_path: Path):
    tuned_dir = tmp_path / "tune"
    autofit.tune(make_raw(), out_dir=tuned_dir, runner=Landscape())
    original = (tuned_dir / "torchrun.sh").read_text()
    (tuned_dir / "torchrun.sh").unlink()

    written = autofit.export(tuned_dir / "results.json", ["torchrun"])
    assert written == [tuned_dir / "torchrun.sh"]
    assert (tuned_dir / "torchrun.sh").read_text() == original  # no timestamps: same bytes

    other = tmp_path / "other"
    written = autofit.export(tuned_dir / "results.json", ["torchrun", "hf"], other)
    assert [p.name for p in written] == ["torchrun.sh", "hf_training_args.json"]
    assert (other / "torchrun.sh").read_text() == original
    with pytest.raises(autofit.AutofitError, match="unknown export format"):
        autofit.export(tuned_dir / "results.json", ["nope"], other)


def test_runner_result_with_string_limit_kind_is_accepted(tmp_path: Path):
    land = Landscape()

    def runner(spec, candidate, **kwargs) -> TrialResult:
        result = land(spec, candidate, **kwargs)
        result.limit_kind = "cpu-budget"  # as a str, which TrialResult.to_dict accepts
        return result

    assert runner(make_spec(), Candidate(batch_size=1, input_size=0), limit_bytes=2**30,
                  steps=1, device="cpu").to_dict()["limit_kind"] == "cpu-budget"
    result = autofit.tune(make_raw(), out_dir=tmp_path, runner=runner)
    assert (tmp_path / "results.json").is_file() and result.best is not None


def test_one_real_trial_on_cpu_fits():
    result = autofit.trial(make_raw(), batch_size=2, steps=1)
    assert isinstance(result, autofit.TrialResult)
    assert result.status is TrialStatus.FITS, result.message
    assert result.peak_bytes and result.peak_bytes > 0


def _readme_python_example() -> str | None:
    text = README.read_text()
    section = re.search(r"^## Use from Python[ \t]*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        return None
    block = re.search(r"^```python[ \t]*\n(.*?)^```", section.group(1), re.M | re.S)
    return block.group(1) if block else None


def test_readme_use_from_python_example_runs(tmp_path: Path, monkeypatch):
    code = _readme_python_example()
    if code is None:
        pytest.fail("README has no 'Use from Python' example (a ```python block under "
                    "'## Use from Python')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README) + ":Use from Python", "exec"), namespace)
