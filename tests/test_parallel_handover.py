"""Issue 15, step 4: the tuned strategy handed over to training (tuned.yaml, scripts, overlays)."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from autofit.export import (
    AUTOFIT_TUNED_KEY,
    ExportError,
    TunedConfig,
    load_tuned,
    write_exports,
    write_results,
)
from autofit.export.results_io import results_plan
from autofit.export.tuned import parallel_of, tuned_section
from autofit.parallel import env_plan

SPEC: dict[str, Any] = {
    "name": "handover",
    "model": {"_target_": "autofit.zoo.vit", "image_size": "${input_size}", "dim": 64},
    "data": {"kind": "image", "channels": 3, "size": 32, "num_classes": 10},
    "search": {"batch_size": {"min": 1, "max": 64}, "precision": ["bf16"],
               "checkpoint_segments": [0]},
    "output": {"global_batch_size": 256, "nodes": 2, "gpus_per_node": 4,
               "train_command": "train.py --config tuned.yaml"},
}

RESULTS: dict[str, Any] = {
    "autofit_version": "0.1.0",
    "spec": SPEC,
    "spec_hash": "feedface0001",
    "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85029158912,
               "torch": "2.13.0", "cuda": "12.8"},
    "budget_bytes": 85029158912,
    "margin": 0.1,
    "objective": "max_batch",
    "best": {"batch_size": 16, "input_size": 32, "precision": "bf16", "checkpoint_segments": 0,
             "peak_bytes": 1000, "verified": True},
    "targets": [],
    "trials": [],
}

SCRIPTS = ("submit_slurm.sh", "submit_lsf.sh", "torchrun.sh")


def results(parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(RESULTS)
    if parallel is not None:
        data["spec"]["parallel"] = parallel
    return data


def _exports(path: Path) -> dict[str, str]:
    return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                for line in path.read_text().splitlines() if line.startswith("export AUTOFIT_"))


def _header(path: Path) -> str:
    """The script up to ``set -euo pipefail``: directives and the ``#`` header."""
    text = path.read_text()
    return text[:text.index("set -euo pipefail")]


# ----------------------------------------------------------------------------- autofit_tuned


@pytest.mark.parametrize(("parallel", "strategy"), [
    (None, "none"),
    ({"strategy": "ddp"}, "ddp"),
    ({"strategy": ["fsdp", "ddp"]}, "fsdp"),  # the first of a list, as the estimate uses
])
def test_tuned_section_and_yaml_carry_strategy(tmp_path: Path, parallel: dict[str, Any] | None,
                                               strategy: str) -> None:
    data = results(parallel)
    section = tuned_section(data, results_plan(data))
    assert section["strategy"] == strategy
    assert section["world_size"] == 8
    write_results(tmp_path, data)
    raw = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    assert raw[AUTOFIT_TUNED_KEY]["strategy"] == strategy
    assert load_tuned(tmp_path / "tuned.yaml").strategy == strategy


def test_tuned_yaml_without_strategy_reads_as_none(tmp_path: Path) -> None:
    write_results(tmp_path, results({"strategy": "fsdp"}))
    raw = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    del raw[AUTOFIT_TUNED_KEY]["strategy"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    assert load_tuned(tmp_path / "old.yaml").strategy == "none"
    assert TunedConfig.__dataclass_fields__["strategy"].default == "none"


def test_bad_strategy_in_tuned_yaml_is_one_problem_line(tmp_path: Path) -> None:
    write_results(tmp_path, results({"strategy": "ddp"}))
    raw = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    raw[AUTOFIT_TUNED_KEY]["strategy"] = "zero3"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ExportError) as info:
        load_tuned(tmp_path / "bad.yaml")
    assert info.value.problems == [
        f"{tmp_path / 'bad.yaml'}: autofit_tuned.strategy: must be one of none, ddp, fsdp, "
        "got 'zero3'"]


def test_parallel_of_uses_the_spec_loader() -> None:
    par = parallel_of(results({"strategy": "fsdp", "world_size": 2,
                               "fsdp": {"reshard_after_forward": False}}))
    assert (par.strategy, par.world_size, par.reshard_after_forward) == ("fsdp", 2, False)
    with pytest.raises(ExportError) as info:
        parallel_of(results({"strategy": "fdsp"}))
    assert "parallel.strategy" in str(info.value) and "fdsp" in str(info.value)


# ----------------------------------------------------------------------------- scripts


def test_scripts_export_strategy_for_env_plan(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write_exports(results({"strategy": "fsdp"}), tmp_path, formats=("slurm", "lsf", "torchrun"))
    for name in SCRIPTS:
        env = _exports(tmp_path / name)
        assert env["AUTOFIT_PARALLEL_STRATEGY"] == "fsdp", name
        assert "# Parallel: fsdp over 8 ranks (memory tuned per rank);" in _header(
            tmp_path / name), name
        assert "WARNING" not in _header(tmp_path / name)
    # what the training script reads: the export, plus torchrun's WORLD_SIZE
    monkeypatch.setenv("AUTOFIT_PARALLEL_STRATEGY", _exports(tmp_path / "torchrun.sh")[
        "AUTOFIT_PARALLEL_STRATEGY"])
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert env_plan() == ("fsdp", 8)


def test_single_process_scripts_have_no_parallel_lines(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    write_exports(results(), tmp_path, formats=("slurm", "lsf", "torchrun"))
    for name in SCRIPTS:
        text = (tmp_path / name).read_text()
        assert "AUTOFIT_PARALLEL_STRATEGY" not in text and "Parallel:" not in text, name
    monkeypatch.delenv("AUTOFIT_PARALLEL_STRATEGY", raising=False)
    assert env_plan() is None


def test_script_warns_when_tuned_world_size_differs(tmp_path: Path) -> None:
    """5 ranks cannot be laid out on 2 nodes x 4 GPUs (both set): launched as written, with a
    warning (a layout that can be derived is tested in test_launch_layout.py)."""
    write_exports(results({"strategy": "ddp", "world_size": 5}), tmp_path, formats=("torchrun",))
    header = _header(tmp_path / "torchrun.sh")
    assert "# Parallel: ddp over 8 ranks" in header
    assert "parallel.world_size 5 differs from the 8 ranks launched here" in header


# ----------------------------------------------------------------------------- overlays


def _overlays(tmp_path: Path, parallel: dict[str, Any] | None) -> tuple[dict, dict, dict]:
    write_exports(results(parallel), tmp_path, formats=("lightning", "hf", "deepspeed"))
    return (yaml.safe_load((tmp_path / "lightning.yaml").read_text()),
            json.loads((tmp_path / "hf_training_args.json").read_text()),
            json.loads((tmp_path / "deepspeed.json").read_text()))


def test_overlays_single_process_unchanged(tmp_path: Path) -> None:
    lightning, hf, ds = _overlays(tmp_path, None)
    assert "strategy" not in lightning["trainer"]
    assert not {"fsdp", "fsdp_config", "ddp_find_unused_parameters"} & set(hf)
    assert "zero_optimization" not in ds and "zero_note" not in ds["_autofit"]


def test_overlays_fsdp(tmp_path: Path) -> None:
    lightning, hf, ds = _overlays(tmp_path, {"strategy": "fsdp"})
    assert lightning["trainer"]["strategy"] == "fsdp"
    assert "FSDP1" in (tmp_path / "lightning.yaml").read_text()
    assert hf["fsdp"] == "full_shard" and "fsdp_config" not in hf  # reshard not set in spec
    assert "ddp_find_unused_parameters" not in hf
    assert ds["zero_optimization"] == {"stage": 3}
    assert "fsdp over 8 ranks" in ds["_autofit"]["zero_note"]


def test_overlays_fsdp_reshard_set(tmp_path: Path) -> None:
    _, hf, _ = _overlays(tmp_path, {"strategy": "fsdp", "fsdp": {"reshard_after_forward": False}})
    assert hf["fsdp_config"] == {"reshard_after_forward": False}


def test_overlays_ddp(tmp_path: Path) -> None:
    lightning, hf, ds = _overlays(tmp_path, {"strategy": "ddp"})
    assert lightning["trainer"]["strategy"] == "ddp"
    assert hf["ddp_find_unused_parameters"] is False and "fsdp" not in hf
    assert ds["zero_optimization"] == {"stage": 0}
    assert "ZeRO stage 0" in ds["_autofit"]["zero_note"]


def test_plot_finds_the_winners_curve_in_a_strategy_list():
    """results.json of a strategy list keys its curves by setting and strategy: the plot
    draws the winner's (fsdp), with that setting's trials only."""
    from autofit.plot import BatchCurvePlot

    line = {"intercept_bytes": 100.0, "slope_bytes_per_sample": 10.0, "points": [[1, 110]]}
    other = {"intercept_bytes": 200.0, "slope_bytes_per_sample": 20.0, "points": [[1, 220]]}
    config = {"batch_size": 4, "input_size": 32, "precision": "fp32", "checkpoint_segments": 0}
    results = {
        "name": "list", "curves": {"32/fp32/0/none": other, "32/fp32/0/fsdp": line},
        "best": {**config, "strategy": "fsdp", "peak_bytes": 140},
        "trials": [{"config": {**config, "strategy": s}, "status": "fits"}
                   for s in ("none", "fsdp")],
    }
    plot = BatchCurvePlot.from_results(results)
    assert plot.setting_key == "32/fp32/0/fsdp" and plot.intercept_bytes == 100.0
    assert [t["config"]["strategy"] for t in plot.trials] == ["fsdp"]
    single = {**results, "curves": {"32/fp32/0": line}, "best": {**config, "peak_bytes": 140},
              "trials": [{"config": config, "status": "fits"}]}
    assert BatchCurvePlot.from_results(single).setting_key == "32/fp32/0"
