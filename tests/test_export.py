"""Tests for autofit.export: batch arithmetic, renderers, golden files, generated scripts.

Golden files live in ``tests/golden/export/<scenario>/``. After an intended change to a
renderer, regenerate them and review the diff::

    AUTOFIT_REGEN_GOLDEN=1 python -m pytest tests/test_export.py

Every generated ``.sh`` is checked with ``bash -n`` (skipped without bash) and with
``shellcheck`` when it is on PATH (skipped otherwise). The scripts are also run with fake
``srun`` / ``scontrol`` / ``blaunch`` / ``torchrun`` executables to check the arguments and
environment the real launcher would get.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from autofit.errors import AutofitError
from autofit.export import (
    AUTOFIT_TUNED_KEY,
    FILE_NAMES,
    FORMATS,
    SCHEMA_VERSION,
    BatchPlan,
    ExportError,
    Provenance,
    TunedConfig,
    load_results,
    load_tuned,
    plan_batch,
    render_deepspeed,
    render_hf,
    render_lightning,
    render_lsf,
    render_slurm,
    render_targets,
    render_torchrun,
    summarize_plan,
    tuned_section,
    tuned_spec,
    write_exports,
    write_results,
)
from autofit.spec import OutputSpec, spec_from_dict

GOLDEN_DIR = Path(__file__).parent / "golden" / "export"
REGEN = os.environ.get("AUTOFIT_REGEN_GOLDEN") == "1"
BASH = shutil.which("bash")
SHELLCHECK = shutil.which("shellcheck")

SPEC: dict[str, Any] = {
    "name": "vit-b imagenet",
    "model": {"_target_": "autofit.zoo.vit", "image_size": "${input_size}", "dim": 768},
    "data": {"kind": "image", "channels": 3, "size": 224, "num_classes": 1000},
    "memory": {"budget": "auto", "margin": 0.1},
    "search": {
        "batch_size": {"min": 1, "max": 4096, "multiple_of": 8},
        "precision": ["fp32", "bf16"],
        "checkpoint_segments": [0, 2],
    },
    "targets": [{"name": "A100-40GB", "memory": "40GB"}, {"name": "V100 16GB", "memory": "16GiB"}],
    "output": {
        "global_batch_size": 1024,
        "nodes": 2,
        "gpus_per_node": 4,
        "slurm": {"partition": "gpu", "time": "04:00:00", "cpus_per_task": 32,
                  "account": "proj42", "mem": "0"},
        "lsf": {"queue": "gpu", "walltime": "4:00", "project": "proj42"},
        "train_command": 'train.py --config tuned.yaml --run-name "vit b"',
    },
}

RESULTS: dict[str, Any] = {
    "autofit_version": "0.1.0",
    "spec": SPEC,
    "spec_path": "/abs/path/exp.yaml",
    "spec_hash": "abc123def456",
    "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85029158912,
               "torch": "2.13.0", "cuda": "12.8"},
    "budget_bytes": 85029158912,
    "margin": 0.1,
    "limit_bytes": 76526243020,
    "objective": "max_batch",
    "strategy": "binary",
    "best": {"batch_size": 24, "input_size": 224, "precision": "bf16", "checkpoint_segments": 2,
             "peak_bytes": 70000000000, "step_time_s": 0.5, "samples_per_s": 48.0,
             "verified": True},
    "max_batch_by_setting": [
        {"input_size": 224, "precision": "bf16", "checkpoint_segments": 2, "batch_size": 24,
         "measured": True},
    ],
    "targets": [
        {"name": "A100-40GB", "memory_bytes": 40000000000, "bf16": True, "batch_size": 12,
         "precision": "bf16", "checkpoint_segments": 2, "input_size": 224,
         "predicted_peak_bytes": 33000000000, "verified": True,
         "note": "verified with the memory fraction capped"},
        {"name": "V100 16GB", "memory_bytes": 17179869184, "bf16": False, "batch_size": 4,
         "precision": "fp16", "checkpoint_segments": 2, "input_size": 224,
         "predicted_peak_bytes": 14000000000, "verified": False,
         "note": "no bf16 on V100: fp16 instead"},
    ],
    "trials": [],
}

SINGLE_NODE = OutputSpec(global_batch_size=100, nodes=1, gpus_per_node=8,
                          slurm={"partition": "debug", "time": "30:00"}, lsf={"queue": "short"},
                          train_command="-m mypkg.train --lr 3e-4")

PROVENANCE = ("abc123def456", "NVIDIA H100 80GB HBM3", "2.13.0", "0.1", "autofit")


def results(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(RESULTS)
    data.update(changes)
    return data


def multi_plan() -> BatchPlan:
    return plan_batch(24, 8, 1024)


# ----------------------------------------------------------------------------- plan_batch


def test_plan_without_global_batch_uses_tuned_micro_batch() -> None:
    plan = plan_batch(24, 8, None)
    assert plan == BatchPlan(micro_batch_size=24, gradient_accumulation_steps=1, world_size=8,
                             global_batch_size=192, requested_global_batch_size=None, exact=True,
                             note="")


def test_plan_exact_picks_largest_fitting_divisor() -> None:
    plan = plan_batch(24, 8, 1024)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (16, 8)
    assert plan.global_batch_size == 1024 and plan.exact and plan.note == ""


def test_plan_prime_global_batch_falls_back_to_micro_one() -> None:
    plan = plan_batch(100, 1, 1021)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (1, 1021)
    assert plan.exact and plan.global_batch_size == 1021


def test_plan_prime_per_gpu_share_within_max_needs_no_accumulation() -> None:
    plan = plan_batch(2000, 1, 1021)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (1021, 1)


def test_plan_max_micro_larger_than_per_gpu_share() -> None:
    plan = plan_batch(1000, 8, 64)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.global_batch_size) == (8, 1, 64)
    assert plan.exact


def test_plan_uses_large_divisor_above_square_root() -> None:
    plan = plan_batch(50, 2, 2 * 97 * 3)  # per GPU 291 = 3 x 97
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (3, 97)
    plan = plan_batch(97, 2, 2 * 97 * 3)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (97, 3)


def test_plan_world_larger_than_global_is_inexact() -> None:
    plan = plan_batch(24, 16, 8)
    assert not plan.exact
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (1, 1)
    assert plan.global_batch_size == 16 and plan.requested_global_batch_size == 8
    assert "larger than the requested global batch 8" in plan.note
    assert "nearest effective global batch is 16" in plan.note
    assert "learning rate" in plan.note.lower() and "16/8" in plan.note


def test_plan_global_not_divisible_by_world() -> None:
    plan = plan_batch(100, 8, 100)
    assert not plan.exact
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.global_batch_size) == (12, 1, 96)
    assert "not divisible by the world size 8" in plan.note
    assert "96/100 = 0.96" in plan.note and "Goyal" in plan.note


def test_plan_inexact_with_small_max_micro_accumulates_to_nearest() -> None:
    plan = plan_batch(5, 8, 100)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (5, 3)
    assert plan.global_batch_size == 120 and not plan.exact
    plan = plan_batch(4, 8, 100)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.global_batch_size) == (4, 3, 96)


def test_plan_exact_with_accumulation_has_no_lr_note() -> None:
    plan = plan_batch(2, 4, 64)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (2, 8)
    assert plan.exact and plan.note == ""


def test_plan_global_equals_world() -> None:
    plan = plan_batch(24, 8, 8)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.exact) == (1, 1, True)


@pytest.mark.parametrize(("args", "bad"), [
    ((0, 8, 64), "max_micro_batch"),
    ((24, 0, 64), "world_size"),
    ((24, 8, 0), "global_batch_size"),
    ((24, -1, None), "world_size"),
    ((24, 8, True), "global_batch_size"),
])
def test_plan_rejects_invalid_values(args: tuple, bad: str) -> None:
    with pytest.raises(ExportError, match=bad) as info:
        plan_batch(*args)
    assert isinstance(info.value, AutofitError) and "\n" not in str(info.value)


def test_summarize_plan_lines() -> None:
    assert summarize_plan(plan_batch(24, 8, 768))[0] == (
        "micro-batch 24 x 4 accumulation x 8 GPUs = global 768")
    assert "matches the requested global batch 768" in summarize_plan(plan_batch(24, 8, 768))
    inexact = summarize_plan(plan_batch(24, 16, 8))
    assert inexact[0] == "micro-batch 1 x 1 accumulation x 16 GPUs = global 16"
    assert any("Learning rate" in line for line in inexact)
    assert "x 1 GPU =" in summarize_plan(plan_batch(4, 1, None))[0]


# ----------------------------------------------------------------------------- golden files


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


SCENARIOS: dict[str, tuple[dict[str, Any], OutputSpec | None, tuple[str, ...] | None]] = {
    "multi_node": (RESULTS, None, None),
    "single_node": (RESULTS, SINGLE_NODE, ("slurm", "lsf", "torchrun", "lightning", "hf")),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_golden_files(scenario: str, tmp_path: Path) -> None:
    data, output, formats = SCENARIOS[scenario]
    write_exports(copy.deepcopy(data), tmp_path, formats=formats, output=output)
    produced = _files(tmp_path)
    golden_root = GOLDEN_DIR / scenario
    if REGEN:
        shutil.rmtree(golden_root, ignore_errors=True)
        for name, content in produced.items():
            (golden_root / name).parent.mkdir(parents=True, exist_ok=True)
            (golden_root / name).write_bytes(content)
    if not golden_root.exists():
        pytest.fail(f"no golden files in {golden_root}; run with AUTOFIT_REGEN_GOLDEN=1")
    expected = _files(golden_root)
    assert sorted(produced) == sorted(expected)
    for name, content in expected.items():
        assert produced[name].decode() == content.decode(), (
            f"{scenario}/{name} differs from the golden file; if intended, regenerate with "
            "AUTOFIT_REGEN_GOLDEN=1")


def test_renderers_match_written_files(tmp_path: Path) -> None:
    output = spec_from_dict(SPEC).output
    plan = multi_plan()
    write_exports(results(), tmp_path)
    expected = {
        "submit_slurm.sh": render_slurm(RESULTS, output, plan),
        "submit_lsf.sh": render_lsf(RESULTS, output, plan),
        "torchrun.sh": render_torchrun(RESULTS, output, plan),
        "lightning.yaml": render_lightning(RESULTS, plan),
        "hf_training_args.json": render_hf(RESULTS, plan),
        "deepspeed.json": render_deepspeed(RESULTS, plan),
        "targets.yaml": render_targets(RESULTS, output),
    }
    for name, text in expected.items():
        assert (tmp_path / name).read_text() == text


# ----------------------------------------------------------------------------- shell scripts


def _scripts(tmp_path: Path) -> list[Path]:
    paths = []
    for scenario, (data, output, formats) in SCENARIOS.items():
        written = write_exports(copy.deepcopy(data), tmp_path / scenario, formats=formats,
                                output=output)
        paths += [p for p in written if p.suffix == ".sh"]
    odd = OutputSpec(nodes=3, gpus_per_node=2, global_batch_size=7,
                     slurm={"job_name": "it's a \"job\"", "partition": "gpu a100", "time": 240},
                     lsf={"job_name": "$(rm -rf /)", "walltime": 90},
                     train_command="train.py --name 'it''s' --tag \"$USER\" --glob '*.pt'")
    paths += [p for p in write_exports(results(), tmp_path / "odd", formats=("slurm", "lsf", "torchrun"),
                                       output=odd)]
    return paths


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_bash_syntax_of_every_script(tmp_path: Path) -> None:
    scripts = _scripts(tmp_path)
    assert len(scripts) == 9
    for script in scripts:
        proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
        assert script.read_text().startswith("#!/bin/bash\n")
        assert os.stat(script).st_mode & 0o777 == 0o755


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed")
def test_shellcheck_every_script(tmp_path: Path) -> None:
    for script in _scripts(tmp_path):
        proc = subprocess.run([SHELLCHECK, "-s", "bash", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}:\n{proc.stdout}{proc.stderr}"


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "torchrun": ('printf "%s\\n" "$@" > "$FAKE_LOG"\n'
                     'env | grep "^AUTOFIT_\\|^MASTER_\\|^SRUN_" | sort > "$FAKE_LOG.env"\n'),
        "srun": 'echo srun >> "$FAKE_LOG.launcher"\nexec "$@"\n',
        "scontrol": 'printf "node-a\\nnode-b\\n"\n',
        "blaunch": 'echo "blaunch $2" >> "$FAKE_LOG.launcher"\nshift 2\nexec "$@"\n',
    }
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    return bin_dir


def _run(script: Path, tmp_path: Path, **env: str) -> tuple[list[str], dict[str, str], str]:
    log = tmp_path / "log"
    for suffix in ("", ".env", ".launcher"):
        Path(f"{log}{suffix}").unlink(missing_ok=True)
    full_env = {"PATH": f"{_fake_bin_dir(tmp_path)}:{os.environ['PATH']}", "FAKE_LOG": str(log),
                **env}
    proc = subprocess.run([BASH, str(script)], env=full_env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().splitlines()
    environ = dict(line.split("=", 1) for line in Path(f"{log}.env").read_text().splitlines())
    launcher = Path(f"{log}.launcher")
    return args, environ, launcher.read_text() if launcher.exists() else ""


def _fake_bin_dir(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    return bin_dir if bin_dir.exists() else _fake_bin(tmp_path)


TUNED_ENV = {"AUTOFIT_MICRO_BATCH_SIZE": "16", "AUTOFIT_GRAD_ACCUM_STEPS": "8",
             "AUTOFIT_GLOBAL_BATCH_SIZE": "1024", "AUTOFIT_PRECISION": "bf16",
             "AUTOFIT_CHECKPOINT_SEGMENTS": "2", "AUTOFIT_INPUT_SIZE": "224",
             "AUTOFIT_SPEC_HASH": "abc123def456", "AUTOFIT_TUNED_YAML": "tuned.yaml"}
TRAIN_ARGS = ["train.py", "--config", "tuned.yaml", "--run-name", "vit b"]


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_slurm_script_runs_torchrun_with_c10d(tmp_path: Path) -> None:
    write_exports(results(), tmp_path / "out", formats=["slurm"])
    args, environ, launcher = _run(tmp_path / "out" / "submit_slurm.sh", tmp_path,
                                   SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2",
                                   SLURM_JOB_ID="4242")
    assert launcher == "srun\n"
    assert args == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=node-a:30742", "--rdzv_id=4242", *TRAIN_ARGS]
    assert {k: environ[k] for k in TUNED_ENV} == TUNED_ENV
    assert environ["MASTER_ADDR"] == "node-a" and environ["SRUN_CPUS_PER_TASK"] == "32"
    text = (tmp_path / "out" / "submit_slurm.sh").read_text()
    for directive in ("--job-name=vit-b-imagenet", "--nodes=2", "--ntasks-per-node=1",
                      "--gres=gpu:4", "--cpus-per-task=32", "--time=04:00:00", "--partition=gpu",
                      "--account=proj42", "--mem=0"):
        assert f"#SBATCH {directive}\n" in text


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_lsf_script_launches_one_torchrun_per_host(tmp_path: Path) -> None:
    write_exports(results(), tmp_path / "out", formats=["lsf"])
    hosts = " ".join(["h1"] * 4 + ["h2"] * 4)
    args, environ, launcher = _run(tmp_path / "out" / "submit_lsf.sh", tmp_path,
                                   LSB_HOSTS=hosts, LSB_JOBID="77")
    assert launcher == "blaunch h1 h2\n"
    assert args == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=h1:29577", "--rdzv_id=77", *TRAIN_ARGS]
    assert {k: environ[k] for k in TUNED_ENV} == TUNED_ENV
    text = (tmp_path / "out" / "submit_lsf.sh").read_text()
    for directive in ("-J vit-b-imagenet", "-q gpu", "-W 4:00", "-P proj42", "-n 8",
                      '-gpu "num=4:mode=exclusive_process"', '-R "span[ptile=4]"'):
        assert f"#BSUB {directive}\n" in text


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_single_node_lsf_and_torchrun_use_standalone(tmp_path: Path) -> None:
    write_exports(results(), tmp_path / "out", formats=["lsf", "torchrun"], output=SINGLE_NODE)
    for name in ("submit_lsf.sh", "torchrun.sh"):
        args, environ, launcher = _run(tmp_path / "out" / name, tmp_path)
        assert launcher == ""
        assert args == ["--standalone", "--nproc_per_node=8", "-m", "mypkg.train",
                        "--lr", "3e-4"]
        assert environ["AUTOFIT_MICRO_BATCH_SIZE"] == "12"
        assert environ["AUTOFIT_GLOBAL_BATCH_SIZE"] == "96"
    text = (tmp_path / "out" / "torchrun.sh").read_text()
    assert "nearest effective global batch is 96" in text and "96/100" in text


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_torchrun_script_multi_node(tmp_path: Path) -> None:
    write_exports(results(), tmp_path / "out", formats=["torchrun"])
    args, _, _ = _run(tmp_path / "out" / "torchrun.sh", tmp_path, MASTER_ADDR="n0", RDZV_ID="r1")
    assert args == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=n0:29500", "--rdzv_id=r1", *TRAIN_ARGS]
    args, _, _ = _run(tmp_path / "out" / "torchrun.sh", tmp_path, NNODES="1")
    assert args[:2] == ["--standalone", "--nproc_per_node=4"]


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_hostile_values_stay_quoted(tmp_path: Path) -> None:
    odd = OutputSpec(nodes=1, gpus_per_node=2, slurm={"job_name": "x; rm -rf /"},
                     train_command="train.py --tag \"$(echo hi)\" --name 'a b'")
    write_exports(results(best={**RESULTS["best"], "precision": "fp16"}), tmp_path / "out",
                  formats=["slurm"], output=odd)
    text = (tmp_path / "out" / "submit_slurm.sh").read_text()
    assert "#SBATCH --job-name=x-rm-rf\n" in text
    args, environ, _ = _run(tmp_path / "out" / "submit_slurm.sh", tmp_path,
                            SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", SLURM_JOB_ID="1")
    assert args[-4:] == ["--tag", "hi", "--name", "a b"]
    assert environ["AUTOFIT_PRECISION"] == "fp16"


def test_slurm_integer_time_is_minutes_with_a_note() -> None:
    output = OutputSpec(slurm={"time": 14400})
    text = render_slurm(RESULTS, output, plan_batch(24, 1, None))
    assert "#SBATCH --time=14400\n" in text
    assert "read by Slurm as minutes (10-00:00:00)" in text


def test_train_command_must_be_valid_shell() -> None:
    with pytest.raises(AutofitError, match="train_command"):
        render_torchrun(RESULTS, OutputSpec(train_command="train.py --name 'oops"),
                        plan_batch(24, 1, None))
    with pytest.raises(AutofitError, match="one line"):
        render_slurm(RESULTS, OutputSpec(train_command="a.py\nrm -rf /"), plan_batch(24, 1, None))


def test_plan_world_must_match_output() -> None:
    with pytest.raises(ExportError, match="plan is for 4 GPUs"):
        render_slurm(RESULTS, OutputSpec(nodes=1, gpus_per_node=8), plan_batch(24, 4, None))


@pytest.mark.parametrize(("output", "bad"), [
    (OutputSpec(nodes=0, gpus_per_node=4), "output.nodes must be an integer >= 1, got 0"),
    (OutputSpec(nodes=2, gpus_per_node=-1), "output.gpus_per_node must be an integer >= 1, got -1"),
    (OutputSpec(global_batch_size=0), "output.global_batch_size must be an integer >= 1"),
])
def test_write_exports_impossible_world_raises_export_error(tmp_path: Path, output: OutputSpec,
                                                            bad: str) -> None:
    with pytest.raises(ExportError) as info:
        write_exports(results(), tmp_path / "out", output=output)
    message = str(info.value)
    assert bad in message and "\n" not in message and info.value.problems == [message]
    assert info.value.exit_code == 2
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- configs


def test_hf_json_fields_load_into_training_arguments() -> None:
    data = json.loads(render_hf(RESULTS, multi_plan()))
    kwargs = {k: v for k, v in data.items() if not k.startswith("_")}
    assert kwargs == {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 8,
                      "bf16": True, "fp16": False, "gradient_checkpointing": True}
    fp32 = results(best={**RESULTS["best"], "precision": "fp32", "checkpoint_segments": 0})
    data = json.loads(render_hf(fp32, plan_batch(24, 1, None)))
    assert (data["bf16"], data["fp16"], data["gradient_checkpointing"]) == (False, False, False)
    assert data["per_device_train_batch_size"] == 24


def test_deepspeed_json_fields() -> None:
    data = json.loads(render_deepspeed(results(best={**RESULTS["best"], "precision": "fp16"}),
                                       multi_plan()))
    assert data["train_micro_batch_size_per_gpu"] == 16
    assert data["gradient_accumulation_steps"] == 8
    assert data["train_batch_size"] == 16 * 8 * 8
    assert data["fp16"] == {"enabled": True} and data["bf16"] == {"enabled": False}
    assert data["_autofit"]["spec_hash"] == "abc123def456"
    assert data["_autofit"]["plan"]["exact"] is True


@pytest.mark.parametrize(("precision", "lightning"), [
    ("bf16", "bf16-mixed"), ("fp16", "16-mixed"), ("fp32", "32-true")])
def test_lightning_overlay(precision: str, lightning: str) -> None:
    text = render_lightning(results(best={**RESULTS["best"], "precision": precision}), multi_plan())
    data = yaml.safe_load(text)
    assert data == {"trainer": {"precision": lightning, "accumulate_grad_batches": 8},
                    "data": {"batch_size": 16}}


def test_targets_yaml_marks_status_and_caveat() -> None:
    text = render_targets(RESULTS)
    assert "capping the memory fraction emulates memory size, not architecture" in text
    assert "no bf16 on V100/T4" in text
    entries = yaml.safe_load(text)["targets"]
    assert [e["status"] for e in entries] == ["verified", "predicted-only"]
    assert entries[0]["memory"] == "37.25 GiB (40.00 GB)"
    assert entries[1]["memory"] == "16.00 GiB (17.18 GB)"
    assert entries[1]["config"] == "configs/v100-16gb.yaml"
    assert {"name", "batch_size", "precision", "checkpoint_segments", "input_size",
            "predicted_peak_bytes", "note"} <= set(entries[0])


def test_per_target_configs_are_valid_specs(tmp_path: Path) -> None:
    write_exports(results(), tmp_path, formats=["targets"])
    a100 = spec_from_dict(yaml.safe_load((tmp_path / "configs" / "a100-40gb.yaml").read_text()))
    v100 = spec_from_dict(yaml.safe_load((tmp_path / "configs" / "v100-16gb.yaml").read_text()))
    assert (a100.search.batch_size.min, a100.search.batch_size.max) == (12, 12)
    assert v100.search.precisions == ("fp16",)
    assert v100.search.checkpoint_segments == (2,)
    assert v100.input_sizes == (224,)


def test_target_without_fitting_batch_gets_no_config(tmp_path: Path) -> None:
    data = results()
    data["targets"][1]["batch_size"] = 0
    written = write_exports(data, tmp_path, formats=["targets"])
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "targets.yaml", "configs/a100-40gb.yaml"]
    entries = yaml.safe_load((tmp_path / "targets.yaml").read_text())["targets"]
    assert entries[1]["config"] is None and "plan" not in entries[1]


def test_tuned_spec_pins_search_and_keeps_other_keys() -> None:
    raw = copy.deepcopy(SPEC)
    pinned = tuned_spec(raw, {"batch_size": 20, "precision": "bf16", "checkpoint_segments": 0,
                              "input_size": 192})
    assert raw == SPEC
    assert pinned["search"]["batch_size"] == {"min": 20, "max": 20}
    assert pinned["search"]["precision"] == ["bf16"]
    assert pinned["search"]["checkpoint_segments"] == [0]
    assert pinned["search"]["input_size"] == [192]
    assert pinned["data"]["size"] == 192
    assert pinned["output"] == SPEC["output"] and pinned["model"] == SPEC["model"]
    assert spec_from_dict(pinned).input_sizes == (192,)


def test_tuned_spec_tokens_and_tensor() -> None:
    tokens = {"name": "gpt", "model": "autofit.zoo.gpt", "loss": "model",
              "data": {"kind": "tokens", "vocab_size": 100, "seq_len": 128}}
    pinned = tuned_spec(tokens, {"batch_size": 8, "precision": "fp16", "input_size": 256})
    assert pinned["data"]["seq_len"] == 256 and pinned["search"]["input_size"] == [256]
    assert "search" not in tokens
    tensor = {"name": "mlp", "model": "autofit.zoo.mlp", "loss": "mse",
              "data": {"kind": "tensor", "shape": [16]}}
    pinned = tuned_spec(tensor, {"batch_size": 8, "precision": "fp32", "input_size": 0})
    assert "input_size" not in pinned["search"]
    assert spec_from_dict(pinned).search.batch_size.max == 8


# ----------------------------------------------------------------------------- write_exports


def test_write_exports_writes_every_file_deterministically(tmp_path: Path) -> None:
    first = write_exports(results(), tmp_path / "a")
    second = write_exports(results(), tmp_path / "b")
    names = [p.relative_to(tmp_path / "a").as_posix() for p in first]
    assert names == [*FILE_NAMES.values(), "configs/a100-40gb.yaml", "configs/v100-16gb.yaml"]
    assert [p.relative_to(tmp_path / "b").as_posix() for p in second] == names
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert not [p for p in (tmp_path / "a").rglob("*.tmp")]
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "deepspeed.json").st_mode) == 0o644


def test_rewrite_replaces_existing_files(tmp_path: Path) -> None:
    write_exports(results(), tmp_path, formats=["hf"])
    changed = results(spec_hash="fffffffffff0")
    write_exports(changed, tmp_path, formats=["hf"])
    assert json.loads((tmp_path / "hf_training_args.json").read_text())["_autofit"]["spec_hash"] == (
        "fffffffffff0")


def test_provenance_in_every_file(tmp_path: Path) -> None:
    for path in write_exports(results(), tmp_path):
        text = path.read_text()
        for item in PROVENANCE:
            assert item in text, f"{path.name} lacks {item!r}"
        if path.suffix == ".json":
            meta = json.loads(text)["_autofit"]
            assert (meta["spec_hash"], meta["gpu"], meta["torch"], meta["margin"],
                    meta["autofit_version"]) == ("abc123def456", "NVIDIA H100 80GB HBM3",
                                                 "2.13.0", 0.1, "0.1.0")


def test_default_formats_follow_output_scripts(tmp_path: Path) -> None:
    data = results()
    data["spec"]["output"]["scripts"] = ["slurm"]
    names = [p.name for p in write_exports(data, tmp_path)]
    assert "submit_slurm.sh" in names
    assert "submit_lsf.sh" not in names and "torchrun.sh" not in names
    assert "deepspeed.json" in names


def test_invalid_stored_spec_falls_back_to_default_output(tmp_path: Path) -> None:
    data = results(spec={"nonsense": True})
    write_exports(data, tmp_path, formats=["deepspeed", "slurm"])
    ds = json.loads((tmp_path / "deepspeed.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (24, 24)
    assert "#SBATCH --nodes=1\n" in (tmp_path / "submit_slurm.sh").read_text()


def test_unknown_format_raises(tmp_path: Path) -> None:
    with pytest.raises(AutofitError) as info:
        write_exports(results(), tmp_path, formats=["slurm", "pbs"])
    message = str(info.value)
    assert "'pbs'" in message and all(fmt in message for fmt in FORMATS)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- load_results


def test_load_results_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert load_results(path) == RESULTS


@pytest.mark.parametrize(("content", "message"), [
    (None, "file not found"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in RESULTS.items() if k != "best"}), "missing key 'best'"),
    (json.dumps({**RESULTS, "best": {"precision": "bf16"}}), "missing key 'best.batch_size'"),
    (json.dumps({**RESULTS, "device": "gpu"}), "'device' must be an object"),
    (json.dumps({**RESULTS, "best": {**RESULTS["best"], "batch_size": 0}}), "best.batch_size"),
    (json.dumps({**RESULTS, "best": {**RESULTS["best"], "precision": "int8"}}), "best.precision"),
    (json.dumps({**RESULTS, "targets": "A100"}), "'targets' must be a list"),
])
def test_load_results_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AutofitError, match=message) as info:
        load_results(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(str(path))


def test_load_results_accepts_version_1_and_2(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**RESULTS, "schema_version": 2}))
    assert load_results(path)["schema_version"] == 2
    path.write_text(json.dumps(RESULTS))  # version 1: no schema_version field
    assert "schema_version" not in load_results(path)


@pytest.mark.parametrize(("version", "message"), [
    (SCHEMA_VERSION + 1, f"schema_version {SCHEMA_VERSION + 1} is newer than this autofit reads"),
    ("2", "schema_version must be an integer >= 1, got '2'"),
    (0, "schema_version must be an integer >= 1, got 0"),
])
def test_load_results_rejects_unknown_schema_version(tmp_path: Path, version: Any,
                                                     message: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**RESULTS, "schema_version": version}))
    with pytest.raises(ExportError, match=message) as info:
        load_results(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


# ----------------------------------------------------------------------------- provenance


CPU_DEVICE = {"kind": "cpu", "name": "x86_64", "total_bytes": 25275539456, "torch": "2.13.0",
              "cuda": None}


def test_cpu_run_is_labelled_cpu(tmp_path: Path) -> None:
    data = results(device=CPU_DEVICE)
    lines = Provenance.from_results(data).lines()
    assert "CPU: x86_64, 23.54 GiB (25.28 GB)" in lines
    assert not any(line.startswith("GPU:") for line in lines)
    for path in write_exports(data, tmp_path, formats=["torchrun", "lightning", "targets"]):
        text = path.read_text()
        assert "# CPU: x86_64" in text and "# GPU:" not in text


@pytest.mark.parametrize(("device", "label"), [
    ({"kind": "cuda", "cuda": "12.8"}, "GPU"),
    ({"cuda": "12.8"}, "GPU"),  # an older results.json without device.kind
    ({"kind": "cpu", "cuda": "12.8"}, "CPU"),  # a CUDA build of torch, run on the CPU
    ({"cuda": None}, "Device"),  # older file, no CUDA: cannot tell
])
def test_device_label(device: dict[str, Any], label: str) -> None:
    data = results(device={"name": "dev", "torch": "2.13.0", **device})
    assert Provenance.from_results(data).lines()[1] == f"{label}: dev"


# ----------------------------------------------------------------------------- tuned.yaml


def _exports(path: Path) -> dict[str, str]:
    return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                for line in path.read_text().splitlines() if line.startswith("export AUTOFIT_"))


def test_write_results_writes_schema_version_and_tuned_yaml(tmp_path: Path) -> None:
    written = write_results(tmp_path, results())
    assert [p.name for p in written] == ["results.json", "tuned.yaml"]
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["schema_version"] == SCHEMA_VERSION == 2
    assert load_results(tmp_path / "results.json") == {"schema_version": 2, **RESULTS}
    text = (tmp_path / "tuned.yaml").read_text()
    assert text.startswith("# Tuned by autofit 0.1.0 on NVIDIA H100 80GB HBM3 (torch 2.13.0), "
                           "spec hash abc123def456, margin 0.1.\n# best: batch 24, input size "
                           "224, bf16, checkpoint segments 2; peak 70000000000 bytes; "
                           "verified: True\n")
    raw = yaml.safe_load(text)
    assert raw[AUTOFIT_TUNED_KEY] == {
        "max_batch_size": 24, "micro_batch_size": 16, "gradient_accumulation_steps": 8,
        "global_batch_size": 1024, "world_size": 8, "precision": "bf16",
        "checkpoint_segments": 2, "input_size": 224, "verified": True,
        "spec_hash": "abc123def456", "step": "autofit", "strategy": "none"}
    spec = {k: v for k, v in raw.items() if k != AUTOFIT_TUNED_KEY}
    assert spec == tuned_spec(SPEC, RESULTS["best"])
    assert spec_from_dict(spec).search.batch_size.max == 24
    assert stat.S_IMODE(os.stat(tmp_path / "tuned.yaml").st_mode) == 0o644


def test_write_results_without_best_writes_only_results_json(tmp_path: Path) -> None:
    written = write_results(tmp_path, results(best=None, error="interrupted"))
    assert [p.name for p in written] == ["results.json"]
    assert not (tmp_path / "tuned.yaml").exists()


@pytest.mark.parametrize("output", [None, SINGLE_NODE])
def test_scripts_and_tuned_yaml_agree(tmp_path: Path, output: OutputSpec | None) -> None:
    data = results()
    if output is not None:
        data["spec"]["output"] = {"global_batch_size": 100, "nodes": 1, "gpus_per_node": 8}
    write_results(tmp_path, data)
    write_exports(data, tmp_path, formats=["slurm", "lsf", "torchrun"])
    tuned = load_tuned(tmp_path / "tuned.yaml")
    expected = {"AUTOFIT_MICRO_BATCH_SIZE": str(tuned.micro_batch_size),
                "AUTOFIT_GRAD_ACCUM_STEPS": str(tuned.gradient_accumulation_steps),
                "AUTOFIT_GLOBAL_BATCH_SIZE": str(tuned.global_batch_size),
                "AUTOFIT_PRECISION": tuned.precision,
                "AUTOFIT_CHECKPOINT_SEGMENTS": str(tuned.checkpoint_segments),
                "AUTOFIT_INPUT_SIZE": str(tuned.input_size),
                "AUTOFIT_SPEC_HASH": tuned.spec_hash, "AUTOFIT_TUNED_YAML": "tuned.yaml"}
    for name in ("submit_slurm.sh", "submit_lsf.sh", "torchrun.sh"):
        assert _exports(tmp_path / name) == expected, name
    if output is not None:
        assert (tuned.micro_batch_size, tuned.gradient_accumulation_steps) == (12, 1)


def test_load_tuned_round_trip(tmp_path: Path) -> None:
    write_results(tmp_path, results())
    tuned = load_tuned(str(tmp_path / "tuned.yaml"))
    assert isinstance(tuned, TunedConfig)
    assert tuned_section(RESULTS, multi_plan()) == {
        k: getattr(tuned, k) for k in tuned_section(RESULTS, multi_plan())}
    assert AUTOFIT_TUNED_KEY not in tuned.spec and tuned.spec["name"] == "vit-b imagenet"
    assert (tuned.autocast_dtype, tuned.uses_grad_scaler) == ("bfloat16", False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tuned.micro_batch_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(("precision", "dtype", "scaler"), [
    ("fp32", None, False), ("fp16", "float16", True), ("bf16", "bfloat16", False)])
def test_tuned_config_precision_helpers(tmp_path: Path, precision: str, dtype: str | None,
                                        scaler: bool) -> None:
    write_results(tmp_path, results(best={**RESULTS["best"], "precision": precision}))
    tuned = load_tuned(tmp_path / "tuned.yaml")
    assert (tuned.precision, tuned.autocast_dtype, tuned.uses_grad_scaler) == (
        precision, dtype, scaler)


def test_tuned_yaml_fed_back_as_spec_gets_one_section(tmp_path: Path) -> None:
    write_results(tmp_path, results())
    raw = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    assert AUTOFIT_TUNED_KEY not in tuned_spec(raw, RESULTS["best"])


GOOD_SECTION = {"max_batch_size": 6, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                "global_batch_size": 8, "world_size": 1, "precision": "fp32",
                "checkpoint_segments": 0, "input_size": 0, "verified": True, "spec_hash": "ab12"}


@pytest.mark.parametrize(("content", "messages"), [
    (None, ["file not found"]),
    ("name: x\n  bad: [\n", [":2: invalid YAML"]),
    ("- 1\n- 2\n", ["expected a YAML mapping, got list"]),
    ("name: x\n", ["missing the 'autofit_tuned' section (a tuned.yaml from an older autofit: "
                   "re-run `autofit tune`"]),
    ("autofit_tuned: 3\n", ["'autofit_tuned' must be a mapping, got int"]),
    (yaml.safe_dump({AUTOFIT_TUNED_KEY: {**GOOD_SECTION, "micro_batch_size": "4",
                                         "precision": "int8", "verified": "yes"}}),
     ["autofit_tuned.micro_batch_size: must be an integer >= 1, got '4'",
      "autofit_tuned.precision: must be one of fp32, fp16, bf16, got 'int8'",
      "autofit_tuned.verified: must be true or false, got 'yes'"]),
    (yaml.safe_dump({AUTOFIT_TUNED_KEY: {k: v for k, v in GOOD_SECTION.items()
                                         if k not in ("world_size", "spec_hash")}}),
     ["autofit_tuned.world_size: missing", "autofit_tuned.spec_hash: missing"]),
    (yaml.safe_dump({AUTOFIT_TUNED_KEY: {**GOOD_SECTION, "global_batch_size": 12,
                                         "micro_batch_size": 7, "gradient_accumulation_steps": 2}}),
     ["global_batch_size 12 is not micro_batch_size x gradient_accumulation_steps x world_size "
      "= 7 x 2 x 1 = 14", "micro_batch_size 7 is larger than max_batch_size 6"]),
    (yaml.safe_dump({AUTOFIT_TUNED_KEY: {**GOOD_SECTION, "checkpoint_segments": -1,
                                         "input_size": True}}),
     ["checkpoint_segments: must be an integer >= 0, got -1",
      "input_size: must be an integer >= 0, got True"]),
])
def test_load_tuned_errors(tmp_path: Path, content: str | None, messages: list[str]) -> None:
    path = tmp_path / "tuned.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AutofitError) as info:
        load_tuned(path)
    problems = info.value.problems
    assert len(problems) == len(messages), problems
    for message, problem in zip(messages, problems, strict=True):
        assert message in problem
    assert all(p.startswith(str(path)) and "\n" not in p for p in problems)
    assert str(info.value) == "\n".join(problems)


def test_load_tuned_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="is a directory, expected a tuned.yaml file"):
        load_tuned(tmp_path)


def test_load_tuned_accepts_a_good_section(tmp_path: Path) -> None:
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump({AUTOFIT_TUNED_KEY: GOOD_SECTION, "name": "mlp"}))
    tuned = load_tuned(path)
    assert (tuned.max_batch_size, tuned.micro_batch_size, tuned.gradient_accumulation_steps) == (
        6, 4, 2)
    assert tuned.spec == {"name": "mlp"}
