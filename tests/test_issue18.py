"""What a new user hits (issue 18): one test per item, each failing before its fix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from landscape import Landscape, make_raw, make_spec

import autofit
from autofit.candidate import Candidate
from autofit.choices import LimitKind
from autofit.memory import MemoryBreakdown
from autofit.search.tuner import run_search
from autofit.spec import ExperimentSpec, spec_from_dict
from autofit.trials import TrialResult, TrialStatus

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallDevice(Landscape):
    """A machine that holds ``capacity`` bytes, less than the planned limit: the real
    allocator fails there (``limit_kind`` rlimit), reporting the live bytes it held."""

    def __init__(self, capacity: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capacity = capacity

    def __call__(self, spec: ExperimentSpec, candidate: Candidate, *, limit_bytes: int,
                 steps: int, device: str) -> TrialResult:
        peak = self.peak(spec, candidate)
        if peak <= self.capacity:
            return super().__call__(spec, candidate, limit_bytes=limit_bytes, steps=steps,
                                    device=device)
        self.calls.append((candidate.batch_size, candidate.input_size, candidate.precision,
                           candidate.checkpoint_segments, steps))
        return TrialResult(candidate=candidate, status=TrialStatus.OOM,
                           message="out of memory in forward: DefaultCPUAllocator: can't "
                                   "allocate memory",
                           memory=MemoryBreakdown(peak_bytes=self.capacity - 4096),
                           limit_bytes=limit_bytes, limit_kind=LimitKind.RLIMIT, steps_run=1)


# 1 ----------------------------------------------------------------------------------------

def test_budget_larger_than_the_device_is_warned_at_plan_time():
    from autofit.search.plan import plan_limits

    spec = spec_from_dict(make_raw() | {"memory": {"budget": "64TiB", "margin": 0.1}})
    plan = plan_limits(spec)
    assert any("larger than this CPU" in note for note in plan.notes), plan.notes
    small = plan_limits(make_spec())
    assert small.notes == []


def test_estimate_prints_the_budget_warning(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    import yaml

    from autofit.cli.app import app

    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(make_raw(batch_size={"min": 1, "max": 64})
                                   | {"memory": {"budget": "64TiB", "margin": 0.1}}))
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["estimate", str(path)])
    assert res.exit_code == 0, res.output
    assert "larger than this CPU" in " ".join(res.output.split())


def test_oom_far_below_the_prediction_jumps_to_the_measured_capacity():
    """Before: each OOM stepped down ~3% (ratio of the limit to a peak under it is 1), so a
    device holding a third of the budget took dozens of OOM trials."""
    spec = make_spec(batch_size={"min": 1, "max": 100000})
    probe = Landscape()
    limit = int(spec.memory.budget_bytes * (1 - spec.memory.margin))
    # the device holds what batch 40 needs, far below what the planned limit allows
    capacity = probe.peak(spec, Candidate(batch_size=40, input_size=0)) + 100
    assert capacity < 0.5 * limit
    land = SmallDevice(capacity)
    result = run_search(spec, runner=land)
    best = result.best.result.candidate.batch_size
    assert land.peak(spec, Candidate(batch_size=best, input_size=0)) <= capacity
    assert land.peak(spec, Candidate(batch_size=best + 1, input_size=0)) > capacity
    search = [c for c in land.calls if c[4] != spec.search.verify_steps]
    assert len(search) <= 12, search  # 125 before: 3% down per OOM from 2280
    assert any("far below its predicted peak" in note for note in result.notes), result.notes


def test_oom_of_the_planned_budget_still_steps_down_by_the_miss():
    """An OOM of the planned limit (cpu-budget) near the limit is no evidence of a smaller
    device: the pinner does not jump (the prediction was just a little low)."""
    land = Landscape(factor=1.05)
    result = run_search(make_spec(batch_size={"min": 1, "max": 100000}), runner=land)
    assert not any("far below" in note for note in result.notes)
    assert result.best is not None


# 2 ----------------------------------------------------------------------------------------

def _gpt_input_raw(sizes: list[int]) -> dict[str, Any]:
    raw = make_raw(objective="max_input_size", input_size=sizes,
                   batch_size={"min": 8, "max": 64})
    raw["model"] = {"_target_": "autofit.zoo.gpt", "vocab_size": 64, "block_size": 128,
                    "n_layer": 2, "n_head": 2, "n_embd": 32}
    raw["data"] = {"kind": "tokens", "vocab_size": 64, "seq_len": 16}
    return raw


def test_max_input_size_starts_at_the_largest_size_predicted_to_fit():
    raw = _gpt_input_raw([16, 32, 64, 128])
    land = Landscape()
    spec = spec_from_dict(raw)
    c32 = land.peak(spec, Candidate(batch_size=8, input_size=32))
    c64 = land.peak(spec, Candidate(batch_size=8, input_size=64))
    raw["memory"] = {"budget": int((c32 + c64) / 2 / 0.9), "margin": 0.1}
    result = run_search(spec_from_dict(raw), runner=land)
    assert result.best.result.candidate.input_size == 32
    assert land.calls[0][1] == 32, land.calls  # 128 and 64 predicted not to fit: never run
    assert all(call[1] <= 32 for call in land.calls)
    assert not any("room to spare" in note for note in result.notes)


def test_largest_listed_size_with_room_to_spare_is_reported():
    raw = _gpt_input_raw([16, 32])
    land = Landscape()
    spec = spec_from_dict(raw)
    c32 = land.peak(spec, Candidate(batch_size=8, input_size=32))
    raw["memory"] = {"budget": int(2 * c32 / 0.9), "margin": 0.1}  # 32 uses ~50% of the limit
    result = run_search(spec_from_dict(raw), runner=land)
    assert result.best.result.candidate.input_size == 32
    notes = [n for n in result.notes if "largest listed size fits with room to spare" in n]
    assert notes and "50% of the limit" in notes[0], result.notes


# 3 ----------------------------------------------------------------------------------------

class StagedNet(torch.nn.Module):
    """Stages as ``nn.Sequential`` (timm / torchvision ResNet style), no ModuleList."""

    def __init__(self, width: int = 64, per_stage: int = 3) -> None:
        super().__init__()
        nn = torch.nn

        def stage() -> nn.Sequential:
            return nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.GELU())
                                   for _ in range(per_stage)))

        self.stem = nn.Linear(32, width)
        self.layer1, self.layer2, self.layer3 = stage(), stage(), stage()
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(x)


def _staged_raw(blocks: Any) -> dict[str, Any]:
    raw = make_raw()
    raw["model"] = {"_target_": "test_issue18.StagedNet"}
    if blocks is not None:
        raw["model"]["blocks"] = blocks
    raw["data"] = {"kind": "tensor", "shape": [32], "num_classes": 10}
    raw["memory"] = {"budget": "64MiB", "margin": 0.1}
    return raw


def test_checkpointing_accepts_sequential_stages():
    from autofit.build import CheckpointedSegment
    from autofit.step import TrainingJob

    spec = spec_from_dict(_staged_raw(["layer1", "layer2", "layer3"]))
    assert spec.model.blocks == ("layer1", "layer2", "layer3")
    job = TrainingJob(spec, Candidate(batch_size=2, input_size=0, checkpoint_segments=2),
                      torch.device("cpu"))
    # 9 blocks in 2 runs of 5: layer1 + 2 of layer2, then 1 of layer2 + layer3
    assert [len(u.blocks) for u in job.model.layer1] == [3]
    assert [len(u.blocks) for u in job.model.layer2] == [2, 1]
    assert [len(u.blocks) for u in job.model.layer3] == [3]
    assert all(isinstance(u, CheckpointedSegment) for u in job.model.layer2)
    assert isinstance(job.model.layer2, torch.nn.Sequential)
    loss = job.run_step()
    assert torch.isfinite(loss)
    plain = autofit.estimate(_staged_raw(["layer1", "layer2", "layer3"]), batch_size=256,
                             max_batch=False)
    ckpt = autofit.estimate(_staged_raw(["layer1", "layer2", "layer3"]), batch_size=256,
                            segments=3, max_batch=False)
    assert ckpt.estimate.peak_bytes < 0.8 * plain.estimate.peak_bytes
    one = autofit.estimate(_staged_raw("layer2"), batch_size=256, segments=3, max_batch=False)
    assert one.estimate.peak_bytes < plain.estimate.peak_bytes


def test_blocks_errors_name_the_stage():
    from autofit.errors import BuildError, SpecError

    with pytest.raises(SpecError, match=r"model\.blocks: must be an attribute path .* or a list"):
        spec_from_dict(_staged_raw([1, 2]))
    with pytest.raises(SpecError, match="names a stage twice"):
        spec_from_dict(_staged_raw(["layer1", "layer1"]))
    with pytest.raises(BuildError, match="'head' is a Linear, not an nn.ModuleList or nn.Sequential"):
        autofit.estimate(_staged_raw(["layer1", "head"]), segments=2, max_batch=False)
    with pytest.raises(BuildError, match=r"exceeds the 6 blocks in 'layer1, layer2'"):
        autofit.estimate(_staged_raw(["layer1", "layer2"]), segments=7, max_batch=False)
    with pytest.raises(BuildError, match=r"e\.g\. model\.blocks: \[layer1, layer2, layer3\]"):
        autofit.estimate(_staged_raw(None), segments=2, max_batch=False)


# 6, 7, 8 ----------------------------------------------------------------------------------

def _export_results(**changes: Any) -> dict[str, Any]:
    from test_export import results

    return results(**changes)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_rendezvous_port_comes_from_the_job_or_the_environment(tmp_path: Path):
    from test_export import _run

    from autofit.export import write_exports

    write_exports(_export_results(), tmp_path / "out", formats=["slurm", "lsf"])
    slurm, lsf = tmp_path / "out" / "submit_slurm.sh", tmp_path / "out" / "submit_lsf.sh"
    assert "29500" not in slurm.read_text().split("--rdzv_endpoint=")[1].splitlines()[0]
    ports = {}
    for job in ("4242", "4243"):
        args, environ, _ = _run(slurm, tmp_path, SLURM_JOB_NODELIST="node-[a-b]",
                                SLURM_NNODES="2", SLURM_JOB_ID=job)
        assert f"--rdzv_endpoint=node-a:{environ['MASTER_PORT']}" in args
        ports[job] = environ["MASTER_PORT"]
    assert ports["4242"] != ports["4243"]  # two jobs on one node do not collide
    args, environ, _ = _run(slurm, tmp_path, SLURM_JOB_NODELIST="n1", SLURM_NNODES="1",
                            SLURM_JOB_ID="5", MASTER_PORT="31234")
    assert "--rdzv_endpoint=node-a:31234" in args and environ["MASTER_PORT"] == "31234"
    hosts = " ".join(["h1"] * 4 + ["h2"] * 4)
    args, environ, _ = _run(lsf, tmp_path, LSB_HOSTS=hosts, LSB_JOBID="78")
    assert f"--rdzv_endpoint=h1:{environ['MASTER_PORT']}" in args
    assert environ["MASTER_PORT"] != "29500"


def test_slurm_asks_for_cpus_per_task_by_default():
    from autofit.export import plan_batch, render_slurm
    from autofit.spec import OutputSpec

    text = render_slurm(_export_results(), OutputSpec(nodes=1, gpus_per_node=4),
                        plan_batch(24, 4, None))
    assert "#SBATCH --cpus-per-task=32\n" in text  # 8 per GPU rank x 4 ranks
    assert "export SRUN_CPUS_PER_TASK=32\n" in text
    own = render_slurm(_export_results(), OutputSpec(nodes=1, gpus_per_node=4,
                                                     slurm={"cpus_per_task": 12}),
                       plan_batch(24, 4, None))
    assert "#SBATCH --cpus-per-task=12\n" in own and "8 per GPU rank" not in own


def test_train_command_placeholder_unless_the_user_gave_one():
    from autofit.export import plan_batch, render_lsf, render_slurm, render_torchrun
    from autofit.spec import OutputSpec

    data = _export_results()
    spec = dict(data["spec"])
    spec["output"] = {k: v for k, v in spec["output"].items() if k != "train_command"}
    data["spec"] = spec
    output = OutputSpec(nodes=1, gpus_per_node=4)
    for render in (render_slurm, render_lsf, render_torchrun):
        text = render(data, output, plan_batch(24, 4, None))
        assert "train.py --config tuned.yaml" not in text
        assert "    YOUR_TRAIN_SCRIPT.py --config tuned.yaml\n" in text
        assert "# No output.train_command in the spec: replace YOUR_TRAIN_SCRIPT.py" in text
    given = OutputSpec(nodes=1, gpus_per_node=4, train_command="train.py --config tuned.yaml")
    data["spec"]["output"]["train_command"] = "train.py --config tuned.yaml"
    text = render_slurm(data, given, plan_batch(24, 4, None))
    assert "    train.py --config tuned.yaml\n" in text and "YOUR_TRAIN_SCRIPT" not in text


def test_cpu_tuned_result_is_a_dry_run_in_scripts_and_on_the_terminal(tmp_path: Path):
    import json

    from typer.testing import CliRunner

    from autofit.cli.app import app
    from autofit.export import write_exports

    cpu = _export_results(device={"kind": "cpu", "name": "x86_64", "total_bytes": 2**34,
                                  "torch": "2.13.0", "cuda": None})
    for path in write_exports(cpu, tmp_path / "cpu", formats=["slurm", "lsf", "torchrun"]):
        header = path.read_text().split("set -euo pipefail")[0]
        assert "# DRY RUN: this result was tuned on a CPU" in header, path.name
    for path in write_exports(_export_results(), tmp_path / "gpu",
                              formats=["slurm", "lsf", "torchrun"]):
        assert "DRY RUN" not in path.read_text()
    (tmp_path / "results.json").write_text(json.dumps(cpu))
    res = CliRunner().invoke(app, ["export", str(tmp_path / "results.json"), "-f", "slurm",
                                   "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert "dry run for a GPU job" in " ".join(res.output.split())


def test_tune_on_cpu_says_dry_run_and_placeholder_on_the_terminal(tmp_path: Path):
    from rich.console import Console

    from autofit.cli.report import print_tune_summary

    result = autofit.tune(make_raw(), out_dir=tmp_path / "out", runner=Landscape())
    console = Console(record=True, width=200)
    print_tune_summary(console, result)
    text = " ".join(console.export_text().split())
    assert "tuned on a CPU against its memory budget: the GPU scripts are a dry run" in text
    assert "no output.train_command in the spec" in text
    script = (tmp_path / "out" / "submit_slurm.sh").read_text()
    assert "# DRY RUN:" in script and "YOUR_TRAIN_SCRIPT.py" in script


# 9 ----------------------------------------------------------------------------------------

BAD_MODEL = '''
import torch.nn as nn


class Bad(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.body(x))
'''


def test_shape_error_under_fake_tensors_is_one_line_with_module_op_and_shapes(tmp_path: Path):
    import subprocess
    import sys

    import yaml

    (tmp_path / "issue18_bad_model.py").write_text(BAD_MODEL)
    raw = make_raw()
    raw["model"] = {"_target_": "issue18_bad_model.Bad"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    for command in ("validate", "estimate"):
        proc = subprocess.run([sys.executable, "-m", "autofit.cli", command, "bad.yaml"],
                              cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr  # before: ~20 lines of FakeTensor traceback first
        assert "Traceback" not in proc.stderr
        assert "in module 'head' (Linear)" in lines[0]
        assert "op aten.mm on [1, 32] x [16, 8]" in lines[0]


# 13 ---------------------------------------------------------------------------------------

def test_cuda_batch_curve_is_fitted_over_a_wide_span():
    """Before: the printed line was the secant between two adjacent batches, whose reserved
    peaks differ by 0 or one 2 MiB segment: "peak = -176.97 GiB + 2.00 MiB x batch"."""
    raw = make_raw(batch_size={"min": 1, "max": 100000})
    raw["model"] = {"_target_": "autofit.zoo.mlp", "in_features": 256, "hidden": 512,
                    "depth": 4, "out_features": 10}
    raw["data"] = {"kind": "tensor", "shape": [256], "num_classes": 10}
    raw["memory"] = {"budget": "2GiB", "margin": 0.1}
    result = autofit.estimate(raw, device="cuda")
    curve = result.max_batch.curve
    assert curve.intercept_bytes > 0
    assert curve.slope_bytes_per_sample < 2**20  # ~20 KiB per sample, not a whole segment
    near = [(b, p) for b, p in curve.points if b >= result.max_batch.batch_size / 4]
    assert len(near) >= 2
    for b, p in near:
        assert abs(curve.peak_at(b) - p) <= 2 * 2**20  # within a segment of rounding each way


# 11 ---------------------------------------------------------------------------------------

def test_class_path_typo_gets_did_you_mean_and_the_spec_line(tmp_path: Path):
    pytest.importorskip("transformers")
    from autofit.errors import SpecError

    path = tmp_path / "gpt.yaml"
    path.write_text("name: gpt\nmodel:\n  class_path: transformers.GPT2LMHeadModle\n"
                    "data: {kind: tokens, vocab_size: 512, seq_len: 32}\nloss: model\n")
    with pytest.raises(SpecError) as info:
        autofit.estimate(path)
    assert info.value.problems == [
        f"{path}:3: model.class_path: cannot import 'transformers.GPT2LMHeadModle': module "
        "'transformers' has no attribute 'GPT2LMHeadModle'; did you mean "
        "'transformers.GPT2LMHeadModel'?"]


# 12 ---------------------------------------------------------------------------------------

def test_ctrl_c_during_the_plot_says_results_are_written(tmp_path: Path, monkeypatch):
    import signal

    import yaml
    from typer.testing import CliRunner

    import autofit.api
    import autofit.trials.runner
    from autofit.cli.app import app
    from autofit.errors import TuneInterrupted

    def interrupted(data: dict[str, Any], path: Path) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(autofit.api, "_plot", interrupted)
    with pytest.raises(TuneInterrupted) as info:
        autofit.tune(make_raw(), out_dir=tmp_path / "api", runner=Landscape())
    assert info.value.partial.best is not None
    assert (tmp_path / "api" / "results.json").exists() and (tmp_path / "api" / "tuned.yaml").exists()

    monkeypatch.setattr(autofit.trials.runner, "run_trial", Landscape())
    spec = tmp_path / "exp.yaml"
    spec.write_text(yaml.safe_dump(make_raw()))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        res = CliRunner().invoke(app, ["tune", str(spec), "--out", str(tmp_path / "cli")])
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert res.exit_code == 130, res.output
    text = " ".join(res.output.split())
    assert "interrupted while plotting: the results are already written" in text
    assert "Traceback" not in res.output
    assert (tmp_path / "cli" / "results.json").exists()
