"""Findings of the new-user review s4: each test failed before its fix."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from autofit.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

TINY = {
    "name": "tiny",
    "model": {"_target_": "autofit.zoo.mlp", "in_features": 32, "hidden": 32, "depth": 2,
              "out_features": 4},
    "data": {"kind": "tensor", "shape": [32], "num_classes": 4},
    "device": "cpu",
    "memory": {"budget": "1MiB", "margin": 0.1},
    "search": {"batch_size": {"min": 1, "max": 4096}, "steps_per_trial": 1, "verify_steps": 2},
}


def write(tmp_path: Path, raw: dict | str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


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
    from autofit.cli.report import print_trial, trial_line
    from autofit.candidate import Candidate
    from autofit.choices import Purpose
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
