"""Launch scripts of a ddp/fsdp tune start ``parallel.world_size`` ranks (issue 15).

The memory was tuned per rank at ``parallel.world_size`` N, so the torchrun, Slurm and LSF
scripts launch N ranks: when ``output.nodes x output.gpus_per_node`` is not N, the layout is
derived from N (``launchers.launch_layout``), the header says how, and tuned.yaml's world
size and batch plan follow. The rendered scripts are checked against golden files
(``tests/golden/launch_layout/``; regenerate with ``AUTOFIT_REGEN_GOLDEN=1``), with
``bash -n``, and run with a fake ``torchrun`` that records its arguments.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_export import _run

from autofit.export import AUTOFIT_TUNED_KEY, write_exports, write_results
from autofit.export.cluster_tune import task_gpus
from autofit.export.launchers import launch_layout
from autofit.export.results_io import output_spec_of, results_plan
from autofit.spec import spec_from_dict

GOLDEN = Path(__file__).parent / "golden" / "launch_layout"
REGEN = os.environ.get("AUTOFIT_REGEN_GOLDEN") == "1"
BASH = shutil.which("bash")

SPEC: dict[str, Any] = {
    "name": "fsdp-gpt",
    "model": {"_target_": "autofit.zoo.gpt", "vocab_size": 128, "block_size": 32, "n_layer": 2,
              "n_head": 2, "n_embd": 32},
    "data": {"kind": "tokens", "vocab_size": 128, "seq_len": 32},
    "search": {"batch_size": {"min": 1, "max": 64}},
    "parallel": {"strategy": "fsdp", "world_size": 8},
    "targets": [{"name": "A100-40GB", "memory": "40GB", "partition": "a100"}],
    "output": {"global_batch_size": 256, "train_command": "train.py --config tuned.yaml"},
}

RESULTS: dict[str, Any] = {
    "autofit_version": "0.1.0",
    "spec": SPEC,
    "spec_path": "/abs/path/exp.yaml",
    "spec_hash": "feedface0002",
    "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85029158912,
               "torch": "2.13.0", "cuda": "12.8"},
    "budget_bytes": 85029158912,
    "margin": 0.1,
    "objective": "max_batch",
    "best": {"batch_size": 8, "input_size": 32, "precision": "fp32", "checkpoint_segments": 0,
             "peak_bytes": 1000, "verified": True},
    "targets": [{"name": "A100-40GB", "memory_bytes": 40000000000, "bf16": True,
                 "batch_size": 4, "precision": "bf16", "checkpoint_segments": 0,
                 "input_size": 32, "predicted_peak_bytes": 1000, "verified": False}],
    "trials": [],
}

SCRIPTS = ("submit_slurm.sh", "submit_lsf.sh", "torchrun.sh")


def results(parallel: dict[str, Any] | None = None, output: dict[str, Any] | None = None,
            **best: Any) -> dict[str, Any]:
    data = copy.deepcopy(RESULTS)
    if parallel is not None:
        data["spec"]["parallel"] = parallel
    if output is not None:
        data["spec"]["output"] = {**data["spec"]["output"], **output}
    data["best"].update(best)
    return data


@pytest.mark.parametrize(("parallel", "output", "layout", "kept"), [
    ({"strategy": "fsdp", "world_size": 8}, {}, (1, 8), "output sets neither"),
    ({"strategy": "ddp", "world_size": 8}, {"gpus_per_node": 4}, (2, 4),
     "output.gpus_per_node kept"),
    ({"strategy": "fsdp", "world_size": 8}, {"nodes": 1, "gpus_per_node": 4}, (2, 4),
     "output.gpus_per_node kept"),
    ({"strategy": "fsdp", "world_size": 2}, {"nodes": 2, "gpus_per_node": 4}, (1, 2),
     "using 2 of its 4 GPUs"),
    ({"strategy": "fsdp", "world_size": 6}, {"nodes": 2}, (2, 3), "output.nodes kept"),
    # as written: consistent, no world size set, single process, or no whole-node layout
    ({"strategy": "fsdp", "world_size": 8}, {"nodes": 2, "gpus_per_node": 4}, (2, 4), ""),
    ({"strategy": "fsdp"}, {"nodes": 2, "gpus_per_node": 2}, (2, 2), ""),
    ({"strategy": "none", "world_size": 8}, {}, (1, 1), ""),
    ({"strategy": "fsdp", "world_size": 5}, {"nodes": 2, "gpus_per_node": 4}, (2, 4), ""),
])
def test_layout_is_derived_from_the_world_size(parallel, output, layout, kept) -> None:
    data = results(parallel, output)
    nodes, gpus, why = launch_layout(data, spec_from_dict(data["spec"]).output)
    out = output_spec_of(data)  # what the plan and the scripts use
    assert (nodes, gpus) == layout == (out.nodes, out.gpus_per_node)
    assert (kept in why) if kept else why == ""
    if kept:
        assert f"parallel.world_size {parallel['world_size']} is launched" in why
        assert nodes * gpus == parallel["world_size"] == results_plan(data).world_size


def test_a_strategy_list_lays_out_the_winner() -> None:
    listed = {"strategy": ["none", "fsdp"], "world_size": 4}
    won = results(listed, strategy="fsdp")
    assert launch_layout(won, spec_from_dict(won["spec"]).output)[:2] == (1, 4)
    none_won = results(listed, strategy="none")
    assert (output_spec_of(none_won).nodes, output_spec_of(none_won).gpus_per_node) == (1, 1)


def _files(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(root.iterdir()) if p.is_file()}


SCENARIOS: dict[str, dict[str, Any]] = {
    "one_node": {},  # world size 8, output sets neither: one node of 8 GPUs
    "gpus_kept": {"nodes": 1, "gpus_per_node": 4},  # 8 ranks: 2 nodes of 4
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_golden_scripts(scenario: str, tmp_path: Path) -> None:
    write_exports(results(output=SCENARIOS[scenario]), tmp_path,
                  formats=("slurm", "lsf", "torchrun", "slurm-tune", "lsf-tune"))
    produced = _files(tmp_path)
    root = GOLDEN / scenario
    if REGEN:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for name, text in produced.items():
            (root / name).write_text(text)
    assert produced == _files(root), f"regenerate with AUTOFIT_REGEN_GOLDEN=1 and review {root}"
    if BASH is not None:
        for name in produced:
            proc = subprocess.run([BASH, "-n", str(tmp_path / name)], capture_output=True,
                                  text=True)
            assert proc.returncode == 0, f"{name}: {proc.stderr}"


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_scripts_launch_world_size_ranks_on_two_nodes(tmp_path: Path) -> None:
    """fsdp x8 with output.gpus_per_node 4 (nodes 1 as written): 2 nodes x 4 ranks in every
    script, tuned.yaml's world size 8, the header says how the layout was derived."""
    data = results(output={"nodes": 1, "gpus_per_node": 4})
    out = tmp_path / "out"
    write_exports(data, out, formats=("slurm", "lsf", "torchrun"))
    write_results(out, data)
    tuned = yaml.safe_load((out / "tuned.yaml").read_text())[AUTOFIT_TUNED_KEY]
    assert tuned["world_size"] == 8 and tuned["strategy"] == "fsdp"
    assert tuned["micro_batch_size"] * tuned["gradient_accumulation_steps"] * 8 == 256
    for name in SCRIPTS:
        text = (out / name).read_text()
        assert "# Parallel: fsdp over 8 ranks" in text
        assert ("# Layout: output.nodes x output.gpus_per_node is 1 x 4 = 4; "
                "parallel.world_size 8 is launched, on 2 node(s) of 4 GPU(s)") in text
        assert "WARNING" not in text

    slurm = (out / "submit_slurm.sh").read_text()
    assert "#SBATCH --nodes=2\n" in slurm and "#SBATCH --gres=gpu:4\n" in slurm
    args, environ, _ = _run(out / "submit_slurm.sh", tmp_path, SLURM_JOB_NODELIST="node-[a-b]",
                            SLURM_NNODES="2", SLURM_JOB_ID="7")
    assert args[:2] == ["--nnodes=2", "--nproc_per_node=4"]
    assert environ["AUTOFIT_PARALLEL_STRATEGY"] == "fsdp"

    lsf = (out / "submit_lsf.sh").read_text()
    assert "#BSUB -n 8\n" in lsf and '#BSUB -R "span[ptile=4]"\n' in lsf
    args, _, launcher = _run(out / "submit_lsf.sh", tmp_path,
                             LSB_HOSTS=" ".join(["h1"] * 4 + ["h2"] * 4), LSB_JOBID="7")
    assert launcher == "blaunch h1 h2\n" and args[:2] == ["--nnodes=2", "--nproc_per_node=4"]

    args, _, _ = _run(out / "torchrun.sh", tmp_path, MASTER_ADDR="n0")  # NNODES defaults to 2
    assert args[:2] == ["--nnodes=2", "--nproc_per_node=4"]


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_scripts_launch_world_size_ranks_on_one_node(tmp_path: Path) -> None:
    """fsdp x8 and no layout in output (1 x 1 by default): one node of 8 GPUs."""
    out = tmp_path / "out"
    write_exports(results(), out, formats=("slurm", "lsf", "torchrun"))
    assert "#SBATCH --nodes=1\n" in (out / "submit_slurm.sh").read_text()
    assert "#SBATCH --gres=gpu:8\n" in (out / "submit_slurm.sh").read_text()
    assert "#BSUB -n 8\n" in (out / "submit_lsf.sh").read_text()
    for name in ("submit_lsf.sh", "torchrun.sh"):
        args, environ, _ = _run(out / name, tmp_path)
        assert args[:2] == ["--standalone", "--nproc_per_node=8"], name
        assert environ["AUTOFIT_PARALLEL_STRATEGY"] == "fsdp"


@pytest.mark.parametrize(("parallel", "output", "gpus", "predicted_only"), [
    ({"strategy": "fsdp", "world_size": 4}, {}, 4, False),
    ({"strategy": ["none", "ddp"], "world_size": 2}, {}, 2, False),
    ({"strategy": "fsdp", "world_size": 16}, {"gpus_per_node": 8}, 8, True),
    ({"strategy": "none"}, {"nodes": 2, "gpus_per_node": 4}, 1, False),
])
def test_tune_arrays_ask_for_a_gpu_per_rank(parallel, output, gpus, predicted_only,
                                            tmp_path: Path) -> None:
    """The measuring arrays run rank trials on one node: one GPU per rank, up to a node."""
    data = results(parallel, output)
    got, why = task_gpus(data)
    assert got == gpus
    assert ("predicted-only at 16" in why) == predicted_only
    write_exports(data, tmp_path, formats=("slurm-tune", "lsf-tune"), storage="journal:s.log")
    slurm = (tmp_path / "tune_slurm.sh").read_text()
    lsf = (tmp_path / "tune_lsf.sh").read_text()
    assert f"#SBATCH --gres=gpu:{gpus}\n" in slurm
    assert f"#SBATCH --cpus-per-task={8 * gpus}\n" in slurm
    assert f'#BSUB -gpu "num={gpus}:mode=exclusive_process"\n' in lsf and f"#BSUB -n {gpus}\n" in lsf
    assert (f"# Each task asks for {gpus} GPU(s)" in slurm) == (gpus > 1)


def test_tune_summary_and_files_use_the_launch_layout(tmp_path: Path, one_thread) -> None:
    """`tune` of fsdp x4 with no layout in output: its plan line, tuned.yaml and torchrun.sh
    all run 4 ranks (1 node of 4 GPUs), not output's default 1 x 1."""
    from landscape import Landscape
    from rich.console import Console

    import autofit
    from autofit.cli.report import print_tune_summary

    raw = {"name": "fsdp-summary", "model": SPEC["model"], "data": SPEC["data"], "device": "cpu",
           "memory": {"budget": 1_200_000, "margin": 0.0},
           "parallel": {"strategy": "fsdp", "world_size": 4},
           "search": {"batch_size": {"min": 1, "max": 64}, "steps_per_trial": 1},
           "output": {"global_batch_size": 64}}
    result = autofit.tune(raw, out_dir=tmp_path / "out", runner=Landscape(), cache=False)
    console = Console(record=True, width=200)
    print_tune_summary(console, result)
    text = " ".join(console.export_text().split())
    micro = result.best.result.candidate.batch_size
    assert "x 4 GPUs = global" in text and "x 1 GPU =" not in text, text
    tuned = yaml.safe_load((tmp_path / "out" / "tuned.yaml").read_text())[AUTOFIT_TUNED_KEY]
    assert tuned["world_size"] == 4 and tuned["max_batch_size"] == micro
    assert "--nproc_per_node=4" in (tmp_path / "out" / "torchrun.sh").read_text()
