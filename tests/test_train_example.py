"""Tests for examples/train.py: it runs on CPU from a tuned.yaml that ``write_results`` wrote.

The example is run as a user would, in a subprocess (``python examples/train.py --config
tuned.yaml``), and once more through the generated ``torchrun.sh`` with a fake ``torchrun``
that drops its options and runs the train command with this Python.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autofit.export import load_tuned, write_exports, write_results

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train.py"
BASH = shutil.which("bash")
TRAIN_COMMAND = "examples/train.py --config tuned.yaml --steps 1"

SPEC: dict[str, Any] = {
    "name": "tiny mlp",
    "model": {"_target_": "autofit.zoo.mlp", "in_features": 8, "hidden": 16, "depth": 2,
              "out_features": 4},
    "data": {"kind": "tensor", "shape": [8], "num_classes": 4},
    "device": "cpu",
    "search": {"batch_size": {"min": 1, "max": 64}, "precision": ["fp32", "fp16"],
               "checkpoint_segments": [0, 2]},
    "output": {"global_batch_size": 8, "nodes": 1, "gpus_per_node": 1,
               "train_command": TRAIN_COMMAND},
}

RESULTS: dict[str, Any] = {
    "autofit_version": "0.1.0",
    "spec": SPEC,
    "spec_path": None,
    "spec_hash": "0123456789ab",
    "device": {"kind": "cpu", "name": "x86_64", "total_bytes": 8 * 2**30, "torch": "2.13.0",
               "cuda": None},
    "budget_bytes": 2**30,
    "margin": 0.1,
    "limit_bytes": 966367641,
    "best": {"batch_size": 6, "input_size": 0, "precision": "fp32", "checkpoint_segments": 2,
             "peak_bytes": 123456, "verified": True},
    "targets": [],
    "trials": [],
}


def _results(precision: str) -> dict[str, Any]:
    data = copy.deepcopy(RESULTS)
    data["best"]["precision"] = precision
    return data


def _env() -> dict[str, str]:
    # CPU only, one thread each: the suite runs on small machines
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_example_trains_with_the_tuned_plan(tmp_path: Path, precision: str) -> None:
    write_results(tmp_path, _results(precision))
    tuned = load_tuned(tmp_path / "tuned.yaml")
    # the tuned batch 6 does not divide the global batch 8: micro-batch 4, 2 accumulation
    assert (tuned.max_batch_size, tuned.micro_batch_size, tuned.gradient_accumulation_steps) == (
        6, 4, 2)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--config", str(tmp_path / "tuned.yaml"), "--steps", "2"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"micro-batch 4, gradient accumulation 2, {precision}, checkpoint segments 2" in lines[0]
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 1/2", "step 2/2"]
    assert all("(micro-batch 4 x 2 accumulation x 1 process(es) = 8 samples)" in line
               for line in steps)
    assert "warning" not in proc.stderr


def test_example_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "tuned.yaml").write_text("name: x\n")
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--config", "tuned.yaml"],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=180)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: tuned.yaml: missing the 'autofit_tuned' section")
    assert len(proc.stderr.splitlines()) == 1


def test_torchrun_script_runs_the_example(tmp_path: Path) -> None:
    write_results(tmp_path, RESULTS)
    write_exports(RESULTS, tmp_path, formats=["torchrun"])
    script = tmp_path / "torchrun.sh"
    text = script.read_text()
    assert f"        {TRAIN_COMMAND}\n" in text
    assert "export AUTOFIT_MICRO_BATCH_SIZE=4\n" in text
    assert "export AUTOFIT_GRAD_ACCUM_STEPS=2\n" in text
    assert "export AUTOFIT_TUNED_YAML=tuned.yaml\n" in text
    if BASH is None:
        pytest.skip("bash not installed: cannot run torchrun.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "torchrun"  # drop torchrun's --options, run the train command
    fake.write_text('#!/bin/bash\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                    'exec "$FAKE_PYTHON" "$@"\n')
    fake.chmod(0o755)
    (tmp_path / "examples").symlink_to(EXAMPLE.parent, target_is_directory=True)
    env = {**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_PYTHON": sys.executable}
    proc = subprocess.run([BASH, str(script)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "tuned.yaml: micro-batch 4, gradient accumulation 2, fp32" in proc.stdout
    assert "step 1/1: loss" in proc.stdout
