"""Findings of the new-user review s4: each test failed before its fix."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_cli import TINY as CLI_TINY
from test_cli import write
from typer.testing import CliRunner

from autofit.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

TINY = {k: v for k, v in CLI_TINY.items() if k not in ("targets", "output")}


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, highlight=False, soft_wrap=True, width=200), buf


# 1. text in square brackets survives Rich markup


def test_error_line_keeps_bracketed_text_of_a_user_exception(tmp_path: Path, monkeypatch):
    (tmp_path / "s4models.py").write_text(
        "from torch import nn\n"
        "class CtorMsg(nn.Module):\n"
        "    def __init__(self):\n"
        "        raise ValueError('input must be [batch, channels], see [docs]')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["validate", str(write(tmp_path, {**TINY, "model": {
        "_target_": "s4models.CtorMsg"}}))])
    assert result.exit_code == 2, result.output
    assert "input must be [batch, channels], see [docs]" in result.output


def test_nothing_fits_hint_keeps_its_precision_list(tmp_path: Path):
    raw = {**TINY, "memory": {"budget": "64KiB", "margin": 0.5}}
    result = runner.invoke(app, ["tune", str(write(tmp_path, raw)), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "search.precision: [bf16]" in result.output


def test_trial_line_notes_and_warnings_keep_bracketed_text():
    from autofit.candidate import Candidate
    from autofit.choices import Purpose
    from autofit.cli.report import print_trial, trial_line
    from autofit.search.results import TrialRecord
    from autofit.trials import TrialResult, TrialStatus

    cand = Candidate(batch_size=4, input_size=32, precision="fp32", checkpoint_segments=0)
    res = TrialResult(candidate=cand, status=TrialStatus.ERROR, message="bad [shape] here",
                      warning="see [docs]")
    record = TrialRecord(number=1, purpose=Purpose.REFINE, result=res, predicted_peak_bytes=None,
                         steps=2)
    console, buf = _console()
    console.print(trial_line(record))
    print_trial(console, res)
    text = buf.getvalue()
    assert text.count("bad [shape] here") == 2
    assert text.count("see [docs]") == 2


# 2. a batch stopped by search.batch_size.max is said to be the cap, not the memory maximum

CAPPED = {**TINY, "name": "capped", "memory": {"budget": "64MiB", "margin": 0.1},
          "search": {"batch_size": {"min": 1, "max": 64}, "steps_per_trial": 1,
                     "verify_steps": 2},
          "targets": [{"name": "A100-40GB", "memory": "40GiB"}]}
CAP_NOTE = "batch 64 is search.batch_size.max, not a memory limit"


def test_estimate_says_the_max_batch_is_the_search_cap(tmp_path: Path):
    spec = write(tmp_path, {**CAPPED, "output": {"dir": str(tmp_path / "o")}})
    for _ in range(2):  # the second answer comes from the trace cache's answer record
        result = runner.invoke(app, ["estimate", str(spec)])
        assert result.exit_code == 0, result.output
        assert "predicted max batch 64" in result.output
        assert CAP_NOTE in result.output
    data = json.loads(runner.invoke(app, ["estimate", str(spec), "--json"]).output)
    assert any(CAP_NOTE in n for n in data["notes"])


def test_estimate_under_the_cap_says_nothing_of_it(tmp_path: Path):
    raw = {**CAPPED, "memory": {"budget": "1MiB", "margin": 0.1},
           "search": {**CAPPED["search"], "batch_size": {"min": 1, "max": 4096}},
           "output": {"dir": str(tmp_path / "o")}}
    result = runner.invoke(app, ["estimate", str(write(tmp_path, raw))])
    assert result.exit_code == 0, result.output
    assert "predicted max batch 4096" not in result.output
    assert "search.batch_size.max" not in result.output


def test_tune_says_the_winner_and_targets_are_the_search_cap(tmp_path: Path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["tune", str(write(tmp_path, CAPPED)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["best"]["batch_size"] == 64  # the answer itself is unchanged
    assert any(CAP_NOTE in n for n in data["notes"]), data["notes"]
    assert CAP_NOTE in result.output
    (target,) = data["targets"]
    assert target["batch_size"] == 64 and "search.batch_size.max" in target["note"]
    assert "A100-40GB" in result.output and "capped by search.batch_size.max" in result.output
    assert "search.batch_size.max" in (out / "targets.yaml").read_text()


# 3. `tune --workers`: every trial this command's workers measured is counted as run now


def _keep_environment(monkeypatch, tmp_path: Path) -> None:
    """Neither the shared trace cache dir nor the thread count set: tune_workers sets them for
    the workers it starts and must leave the caller's environment as it was."""
    from autofit.predict.cache import ENV_DIR

    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_tune_workers_counts_the_other_workers_trials_as_run_now(tmp_path: Path, monkeypatch):
    """Worker w1 (here run to the end before w0 starts, with the fake landscape) measures
    every setting and finishes the study; w0 only assembles. Nothing was resumed: the
    output dir was new, so every trial is this command's."""
    import landscape

    from autofit import cluster
    from autofit.spec import load_spec

    _keep_environment(monkeypatch, tmp_path)
    real_run_worker = cluster.run_worker
    monkeypatch.setattr(cluster, "run_worker", lambda *a, **kw: real_run_worker(
        *a, **{**kw, "runner": landscape.Landscape()}))

    def start_w1(source, url, devices, lease_s, host):
        real_run_worker(load_spec(source), url, worker_id=f"{host}/w1",
                        runner=landscape.Landscape())
        return []

    monkeypatch.setattr(cluster, "_start", start_w1)
    raw = landscape.make_raw(precision=["fp32"], checkpoint_segments=[0, 1])
    raw["name"] = "workers-count"
    spec = write(tmp_path, raw)
    result = cluster.tune_workers(spec, workers=2, out_dir=tmp_path / "o")
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["trials"] and not any(t["resumed"] for t in data["trials"])
    assert data["real_trials"] == len(data["trials"]) == result.real_trials
    assert any(n.startswith("trace cache:") for n in data["notes"]), data["notes"]
    from autofit.predict.cache import ENV_DIR

    assert ENV_DIR not in os.environ and "OMP_NUM_THREADS" not in os.environ  # restored


def test_tune_workers_resume_still_counts_earlier_trials_as_resumed(tmp_path: Path, monkeypatch):
    import landscape

    from autofit import cluster

    _keep_environment(monkeypatch, tmp_path)
    real_run_worker = cluster.run_worker
    monkeypatch.setattr(cluster, "run_worker", lambda *a, **kw: real_run_worker(
        *a, **{**kw, "runner": landscape.Landscape()}))
    monkeypatch.setattr(cluster, "_start", lambda *a: [])
    raw = landscape.make_raw(precision=["fp32"], checkpoint_segments=[0])
    raw["name"] = "workers-resume"
    spec = write(tmp_path, raw)
    first = cluster.tune_workers(spec, workers=1, out_dir=tmp_path / "o")
    assert first.real_trials == len(first.trials) > 0
    again = cluster.tune_workers(spec, workers=1, out_dir=tmp_path / "o")
    assert again.real_trials == 0 and all(t.resumed for t in again.trials)


# 4. an unknown device is refused, never run as the CPU


@pytest.mark.parametrize("command", [["estimate"], ["profile", "--no-what-if", "--no-plot"]])
def test_cli_refuses_an_unknown_device(tmp_path: Path, command: list[str]):
    spec = write(tmp_path, {**TINY, "output": {"dir": str(tmp_path / "o")}})
    if command == ["estimate"]:  # an answer record of the same question must not bypass it
        assert runner.invoke(app, ["estimate", str(spec)]).exit_code == 0
    result = runner.invoke(app, [*command, str(spec), "--device", "tpu"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == ["error: --device: must be auto, cpu, cuda or cuda:N, got 'tpu'"], lines


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "CPU", ""])
def test_api_refuses_an_unknown_device(tmp_path: Path, device: str):
    import autofit
    from autofit.errors import SpecError

    raw = {**TINY, "output": {"dir": str(tmp_path / "o")}}
    for call in (autofit.estimate, autofit.profile):
        with pytest.raises(SpecError, match="must be auto, cpu, cuda or cuda:N"):
            call(raw, device=device)
    with pytest.raises(SpecError, match="must be auto, cpu, cuda or cuda:N"):
        autofit.tune(raw, out_dir=tmp_path / "t", device=device)
    assert not (tmp_path / "t").exists()


def test_known_devices_still_pass_the_check():
    from autofit.device import check_device

    for device in (None, "auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        check_device(device)


# 5. trial --steps and --timeout are range-checked


@pytest.mark.parametrize("flags, line", [
    (["--steps", "0"], "error: --steps: must be >= 1, got 0"),
    (["--steps", "-2"], "error: --steps: must be >= 1, got -2"),
    (["--timeout", "0"], "error: --timeout: must be > 0, got 0"),
    (["--timeout", "-5"], "error: --timeout: must be > 0, got -5"),
])
def test_trial_refuses_out_of_range_steps_and_timeout(tmp_path: Path, flags: list[str], line: str):
    result = runner.invoke(app, ["trial", str(write(tmp_path, TINY)), "-b", "1", *flags])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [line]


def test_trial_api_reports_both_range_problems_at_once(tmp_path: Path):
    import autofit
    from autofit.errors import SpecError

    with pytest.raises(SpecError) as info:
        autofit.trial(TINY, steps=0, timeout_s=-1)
    assert len(info.value.problems) == 2


# 6. the reader that generated files name is importable as named


def _named_readers(text: str) -> set[str]:
    import re

    return set(re.findall(r"\bautofit(?:\.\w+)*\.load_tuned\b", text))


def _resolve_as_written(dotted: str):
    """``a.b.c`` as a reader would follow it after ``import autofit``: attribute by attribute."""
    import importlib

    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj


def test_generated_files_name_a_load_tuned_path_that_works(tmp_path: Path):
    from test_export import RESULTS

    import autofit
    from autofit.export import write_exports
    from autofit.export.results_io import tuned_yaml_text

    texts = [tuned_yaml_text(RESULTS)]
    texts += [p.read_text() for p in write_exports(RESULTS, tmp_path) if p.suffix == ".sh"]
    named = set().union(*map(_named_readers, texts))
    assert named, "the generated files name no reader"
    for dotted in named:
        assert _resolve_as_written(dotted) is autofit.load_tuned, dotted
    example = (ROOT / "examples" / "train.py").read_text()
    for dotted in _named_readers(example):
        assert _resolve_as_written(dotted) is autofit.load_tuned, dotted


# 7. an estimate read from the trace cache does not claim it was traced now


def test_estimate_says_a_cached_trace_came_from_the_cache(tmp_path: Path):
    spec = write(tmp_path, {**TINY, "output": {"dir": str(tmp_path / "o")}})
    first = runner.invoke(app, ["estimate", str(spec)])
    assert first.exit_code == 0, first.output
    assert "traced in" in first.output.splitlines()[0]
    again = runner.invoke(app, ["estimate", str(spec)])
    assert again.exit_code == 0, again.output
    head = again.output.splitlines()[0]
    assert "traced in" not in head and "read from the trace cache" in head, head


# 8. the shipped configs' headers say what the configs search

_COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_COUNTED = {"resolutions": "input_size", "sequence lengths": "input_size",
            "precisions": "precision", "checkpointing settings": "checkpoint_segments"}


def test_shipped_config_headers_count_what_the_config_lists():
    import re

    checked = 0
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        text = config.read_text()
        header = " ".join(line.lstrip("# ") for line in text.splitlines()
                          if line.startswith("#"))
        search = yaml.safe_load(text).get("search", {})
        for word, noun in re.findall(r"\b(one|two|three|four|five)\s+(" +
                                     "|".join(_COUNTED) + r")\b", header):
            listed = search.get(_COUNTED[noun])
            listed = listed if isinstance(listed, list) else [listed]
            assert len(listed) == _COUNTS[word], (config.name, word, noun, listed)
            checked += 1
    assert checked >= 1



# 9. rough edges


@pytest.mark.parametrize("content", [None, "name: [unclosed\n", "", "- a\n- b\n"],
                         ids=["missing", "malformed", "empty", "list"])
def test_validate_of_an_unreadable_file_has_no_import_path_note(tmp_path: Path, content):
    path = tmp_path / "exp.yaml"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "import paths" not in result.output


def test_validate_of_a_bad_structure_keeps_the_import_path_note(tmp_path: Path):
    result = runner.invoke(app, ["validate", str(write(tmp_path, {**TINY, "device": "gpu"}))])
    assert result.exit_code == 2, result.output
    assert "note: import paths" in result.output


@pytest.mark.parametrize("extra", [[], ["--workers", "1"]])
def test_tune_refuses_resume_with_force(tmp_path: Path, extra: list[str]):
    out = tmp_path / "o"
    result = runner.invoke(app, ["tune", str(write(tmp_path, TINY)), "--out", str(out),
                                 "--resume", "--force", *extra])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --resume and --force contradict each other (continue the study, or start "
        "over): pass one"]
    assert not out.exists()


def test_tune_api_refuses_resume_with_force(tmp_path: Path):
    import autofit
    from autofit.errors import SpecError

    with pytest.raises(SpecError, match="contradict"):
        autofit.tune(TINY, out_dir=tmp_path / "o", resume=True, force=True)


def test_readme_spec_block_lists_every_search_key():
    import inspect
    import re

    from autofit import spec as spec_module

    source = inspect.getsource(spec_module._load_search)
    allowed = re.search(r"allowed = \(([^)]*)\)", source).group(1)
    keys = re.findall(r'"(\w+)"', allowed)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    search = yaml.safe_load(block)["search"]
    assert set(keys) <= set(search), set(keys) - set(search)
    # the (>= 2) is warmup_steps' minimum, not steps_per_trial's (which is 1)
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("steps_per_trial:"))
    assert ">= 2" not in line


NOFIT = {**TINY, "model": {"_target_": "autofit.zoo.mlp", "in_features": 32, "hidden": 256,
                           "depth": 4, "out_features": 4},
         "memory": {"budget": "64KiB", "margin": 0.5}}


def test_estimate_with_nothing_fitting_says_so_and_exits_2_as_tune_does(tmp_path: Path):
    spec = write(tmp_path, {**NOFIT, "output": {"dir": str(tmp_path / "o")}})
    result = runner.invoke(app, ["estimate", str(spec)])
    assert result.exit_code == 2, result.output
    assert "predicted max batch 0" not in result.output
    assert "batch curve" not in result.output  # one trace, no line through it
    assert ("error: nothing fits: batch=1 fp32 is predicted to peak at 3.66 MiB (3.84 MB), over the "
            "limit 32.00 KiB") in result.output
    assert "Traceback" not in result.output
    as_json = runner.invoke(app, ["estimate", str(spec), "--json"])
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout)["max_batch_size"] == 0
    tuned = runner.invoke(app, ["tune", str(spec), "--out", str(tmp_path / "t")])
    assert tuned.exit_code == 2 and "error: nothing fits" in tuned.output


def test_one_real_trial_is_said_in_the_singular(tmp_path: Path):
    raw = {**TINY, "search": {**TINY["search"], "batch_size": {"min": 1, "max": 1}}}
    result = runner.invoke(app, ["tune", str(write(tmp_path, raw)), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "1 real trial run now (1 to search" in result.output, result.output[-600:]


def test_trial_line_cuts_a_long_message_at_a_word_not_inside_one():
    from autofit.candidate import Candidate
    from autofit.choices import Purpose
    from autofit.cli.report import trial_line
    from autofit.search.results import TrialRecord
    from autofit.trials import TrialResult, TrialStatus

    message = ("out of memory: peak 241,591,911 bytes > limit 241,591,910 (allocation of "
               "12,582,912 bytes in aten.mm during backward of module blocks.3.mlp.fc2)")
    res = TrialResult(candidate=Candidate(batch_size=4, input_size=32), status=TrialStatus.OOM,
                      message=message)
    line = trial_line(TrialRecord(number=1, purpose=Purpose.REFINE, result=res,
                                  predicted_peak_bytes=None, steps=2))
    console, buf = _console()
    console.print(line)
    shown = buf.getvalue().split("oom", 1)[1].split("s  ", 1)[1].strip()
    assert shown.endswith("…") and message.startswith(shown[:-1].rstrip())
    assert message[len(shown[:-1].rstrip())] == " ", shown  # cut between words


def test_resume_with_nothing_to_resume_says_it_started_fresh(tmp_path: Path):
    out = tmp_path / "never_made"
    result = runner.invoke(app, ["tune", str(write(tmp_path, TINY)), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    note = "--resume: the study holds no finished trial; started fresh"
    assert note in result.output
    assert note in json.loads((out / "results.json").read_text())["notes"]


def test_results_from_a_journal_that_does_not_exist_leaves_no_file(tmp_path: Path):
    journal = tmp_path / "nowhere" / "none.journal"
    result = runner.invoke(app, ["results", str(write(tmp_path, TINY)), "--storage",
                                 f"journal:{journal}", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "holds no study" in result.output and "(studies: none)" in result.output
    assert not journal.exists() and not journal.parent.exists()
