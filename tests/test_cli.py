"""The CLI through typer's CliRunner: exit codes, one line per problem, JSON outputs, files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autofit.cli import app

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
runner = CliRunner()

TINY = {
    "name": "tiny",
    "model": {"_target_": "autofit.zoo.mlp", "in_features": 32, "hidden": 32, "depth": 2,
              "out_features": 4},
    "data": {"kind": "tensor", "shape": [32], "num_classes": 4},
    "device": "cpu",
    "memory": {"budget": "1MiB", "margin": 0.1},
    "search": {"batch_size": {"min": 1, "max": 4096}, "steps_per_trial": 1, "verify_steps": 2},
    "targets": [{"name": "V100-16GB", "memory": "16GiB"}],
    "output": {"global_batch_size": 64, "gpus_per_node": 2},
}


def write(tmp_path: Path, raw: dict | str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_validate_every_shipped_config(config: Path):
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_shipped_configs_open_with_their_command():
    for config in CONFIGS:
        first = config.read_text().splitlines()[0]
        assert first.startswith("# autofit ") and config.name in first


def test_five_mistakes_five_lines_exit_2(tmp_path: Path):
    text = """\
name: broken
model: {_target_: autofit.zoo.mlp}
data: {kind: tensor, shape: [8], num_classes: 2}
optimiser: {_target_: torch.optim.SGD}
device: gpu
memory: {budget: 12 parsecs}
search:
  batch_size: {min: 0}
  precision: [fp8]
"""
    result = runner.invoke(app, ["validate", str(write(tmp_path, text))])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 5, result.output
    joined = "\n".join(lines)
    for needle in ("optimiser", "did you mean 'optimizer'", "device", "'gpu'", "memory.budget",
                   "parsecs", "search.batch_size.min", "got 0", "search.precision[0]", "'fp8'"):
        assert needle in joined
    assert "Traceback" not in result.output
    assert ":4:" in joined  # file line of the unknown key


@pytest.mark.parametrize("raw, needle", [
    ({**TINY, "model": {"_target_": "nosuch.module.Model"}}, "no module named 'nosuch'"),
    ({**TINY, "model": {"_target_": "autofit.zoo.nothere"}}, "has no attribute 'nothere'"),
    ({**TINY, "model": {"_target_": "autofit.zoo.resnet", "depth": 7}}, "depth"),
])
def test_model_problems_exit_2_without_traceback(tmp_path: Path, raw: dict, needle: str):
    result = runner.invoke(app, ["validate", str(write(tmp_path, raw))])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_missing_file_exit_2(tmp_path: Path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "file not found" in result.output


def test_estimate_json(tmp_path: Path):
    result = runner.invoke(app, ["estimate", str(write(tmp_path, TINY)), "--batch-size", "8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["peak_bytes"] > 0
    assert set(data["breakdown"]) >= {"params_bytes", "grads_bytes", "optimizer_state_bytes",
                                      "activations_bytes", "temporaries_bytes", "peak_bytes"}
    assert data["max_batch_size"] >= 1
    assert data["breakdown"]["peak_phase"] in ("forward", "backward", "optimizer")


def test_estimate_table_labels_units(tmp_path: Path):
    result = runner.invoke(app, ["estimate", str(write(tmp_path, TINY)), "--per-layer"])
    assert result.exit_code == 0, result.output
    assert "binary" in result.output and "decimal" in result.output
    assert "MiB" in result.output and "MB" in result.output
    assert "predicted max batch" in result.output


def test_estimate_rejects_bad_precision(tmp_path: Path):
    result = runner.invoke(app, ["estimate", str(write(tmp_path, TINY)), "--precision", "fp8"])
    assert result.exit_code == 2
    assert "--precision" in result.output


def test_trial_json(tmp_path: Path):
    result = runner.invoke(app, ["trial", str(write(tmp_path, TINY)), "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["status"] == "fits"
    assert data["steps_run"] >= 3
    assert data["limit_kind"] == "cpu-budget"
    assert data["device"]["torch"]


def test_tune_writes_results_and_refuses_reuse(tmp_path: Path):
    spec = write(tmp_path, TINY)
    out = tmp_path / "out"
    result = runner.invoke(app, ["tune", str(spec), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    best = data["best"]
    assert best["verified"] is True
    assert {"batch_size", "input_size", "precision", "checkpoint_segments", "peak_bytes",
            "step_time_s", "samples_per_s"} <= set(best)
    trials = data["trials"]
    assert all({"config", "status", "predicted_peak_bytes", "measured_peak_bytes", "seconds"} <= set(t)
               for t in trials)
    ran = [(t["config"]["batch_size"], t["status"]) for t in trials]
    assert (best["batch_size"], "fits") in ran and (best["batch_size"] + 1, "oom") in ran
    for name in ("results.json", "tuned.yaml", "study.journal", "submit_slurm.sh", "deepspeed.json"):
        assert (out / name).exists(), name
    tuned = yaml.safe_load((out / "tuned.yaml").read_text())
    assert tuned["search"]["batch_size"] == {"min": best["batch_size"], "max": best["batch_size"]}
    # the tuned spec is itself a valid spec
    assert runner.invoke(app, ["validate", str(out / "tuned.yaml")]).exit_code == 0
    # an existing output dir is not reused without --resume / --force
    again = runner.invoke(app, ["tune", str(spec), "--out", str(out)])
    assert again.exit_code == 2
    assert "--resume" in again.output
    # --resume repeats nothing: every trial comes from the study
    resumed = runner.invoke(app, ["tune", str(spec), "--out", str(out), "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    data2 = json.loads(resumed.stdout)
    assert data2["real_trials"] == 0
    assert data2["best"]["batch_size"] == best["batch_size"]
    # export regenerates the scripts without re-tuning
    (out / "submit_lsf.sh").unlink()
    exported = runner.invoke(app, ["export", str(out / "results.json"), "--format", "lsf"])
    assert exported.exit_code == 0, exported.output
    assert (out / "submit_lsf.sh").exists()


def test_tune_refuses_locked_dir(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".autofit.lock").write_text(f"{os.getppid()}\n")  # a live process holds it
    result = runner.invoke(app, ["tune", str(write(tmp_path, TINY)), "--out", str(out)])
    assert result.exit_code == 2
    assert "in use by another autofit run" in result.output


def test_tune_nothing_fits_message(tmp_path: Path):
    raw = {**TINY, "memory": {"budget": "64KiB", "margin": 0.5}}
    result = runner.invoke(app, ["tune", str(write(tmp_path, raw)), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "nothing fits" in result.output
    assert "checkpoint" in result.output and "precision" in result.output


def test_export_bad_results(tmp_path: Path):
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    result = runner.invoke(app, ["export", str(bad)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_profile_plot_dir_that_is_a_file_is_reported_not_raised(tmp_path: Path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    result = runner.invoke(app, ["profile", str(write(tmp_path, TINY)), "-b", "4", "--no-what-if",
                                 "--plot-dir", str(blocker)])
    assert result.exit_code == 0, result.output
    assert "cannot write plots" in result.output
    assert "Traceback" not in result.output


def test_readme_spec_example_validates(tmp_path: Path):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    result = runner.invoke(app, ["validate", str(write(tmp_path, block))])
    assert result.exit_code == 0, result.output
