"""Targets measured on their own GPU type: ``worker --target``, ``export -f slurm-tune / lsf-tune``.

A target's worker searches the spec under the target's memory in the target's own study; the
spec's study then reports that target as measured (with the device that measured it) in
targets.yaml. The array scripts are checked against golden files, with ``bash -n``, and run
with fake ``sbatch`` / ``bsub`` / ``autofit`` executables (outside a job: one submission per
task on its partition; inside: the worker command of that task).

Regenerate the golden files after an intended change::

    AUTOFIT_REGEN_GOLDEN=1 python -m pytest tests/test_cluster_tune.py
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import landscape  # noqa: E402
from test_export import RESULTS  # noqa: E402
from test_workers import postgres  # noqa: E402, F401 - the throwaway PostgreSQL fixture

GOLDEN = HERE / "golden" / "cluster_tune"
REGEN = os.environ.get("AUTOFIT_REGEN_GOLDEN") == "1"
BASH = shutil.which("bash")
URL = "postgresql+psycopg://autofit:s3cret@db.example:5432/autofit"


def tune_results() -> dict[str, Any]:
    data = copy.deepcopy(RESULTS)
    data["spec"]["targets"][0]["partition"] = "a100"
    return data


def cpu_raw(name: str) -> dict[str, Any]:
    """The tiny CPU spec with a 2 MiB CPU "target" (the spec's own budget is 4 MiB)."""
    raw = landscape.make_raw(precision=["fp32"], checkpoint_segments=[0, 1])
    raw["name"] = name
    raw["targets"] = [{"name": "cpu-small", "memory": "2MiB"},
                      {"name": "A100 80GB", "memory": "80GB"}]
    return raw


# -- the measured target ------------------------------------------------------------------

@pytest.fixture(params=["journal", "postgres"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "journal":
        return f"journal:{tmp_path / 'study.journal'}"
    return request.getfixturevalue("postgres")


def test_target_worker_measures_under_the_targets_memory(storage: str, one_thread: None) -> None:
    """The spec's study, then ``--target cpu-small``: the assembled targets hold the target's
    own search (under 2 MiB less the margin), marked measured with this CPU's name; the
    other target stays predicted-only. Each study refuses nothing of the other."""
    from autofit.export import render_targets
    from autofit.search.workers import run_worker, study_name
    from autofit.spec import spec_from_dict

    spec = spec_from_dict(cpu_raw(f"target-measured-{os.getpid()}-{time.time_ns() % 10**6}"))
    url = storage
    main = run_worker(spec, url, runner=landscape.Landscape(), poll_s=0.1)
    assert [t.get("measured") for t in main.targets] == [None, None]

    measured = run_worker(spec, url, runner=landscape.Landscape(), poll_s=0.1, target="cpu-small")
    limit = int(2 * 1024**2 * 0.9)
    assert measured.limit_bytes == limit and measured.targets == []
    best = measured.best.result
    assert best.fits and best.peak_bytes <= limit
    assert best.candidate.batch_size < main.best.result.candidate.batch_size

    again = run_worker(spec, url, assemble_only=True)
    small, big = again.targets
    assert small["measured"] and small["batch_size"] == best.candidate.batch_size
    assert small["measured_on"].startswith("CPU ") and small["limit_bytes"] == limit
    assert small["measured_peak_bytes"] == best.peak_bytes
    assert not big.get("measured") and big["batch_size"] > 0
    text = render_targets({"targets": again.targets, "spec": cpu_raw(spec.name)})
    rows = yaml.safe_load(text)["targets"]
    assert [r["status"] for r in rows] == ["measured", "predicted-only"]
    assert rows[0]["measured_on"] == small["measured_on"]
    assert "@cpu-small" in study_name(spec, "cpu-small")


def test_target_still_measuring_says_so(tmp_path: Path, one_thread: None) -> None:
    """A target whose study still has work keeps its predicted row, with a note saying so."""
    from autofit.candidate import Setting
    from autofit.choices import Precision
    from autofit.search.workers import WorkQueue, open_worker_study, run_worker, study_name
    from autofit.spec import spec_from_dict

    spec = spec_from_dict(cpu_raw("target-pending"))
    url = f"journal:{tmp_path / 'study.journal'}"
    run_worker(spec, url, runner=landscape.Landscape(), poll_s=0.1)
    study, _ = open_worker_study(spec, url, create=True, say=lambda m: None,
                                 name=study_name(spec, "cpu-small"))
    WorkQueue(study, "x").enqueue([Setting(0, Precision.FP32, 0)])
    small = run_worker(spec, url, assemble_only=True).targets[0]
    assert not small.get("measured")
    assert "being measured on its own GPU type" in small["note"] and "1 setting(s) left" in small["note"]


def test_unknown_target_is_one_line(tmp_path: Path) -> None:
    from autofit.errors import AutofitError
    from autofit.search.workers import run_worker
    from autofit.spec import spec_from_dict

    spec = spec_from_dict(cpu_raw("unknown-target"))
    with pytest.raises(AutofitError, match=r"^--target 'H100': the spec has no such target "
                                           r"\(targets: cpu-small, A100 80GB\)$"):
        run_worker(spec, f"journal:{tmp_path / 's.journal'}", target="H100")


def test_workers_refuse_a_plain_tune_study_at_once(tmp_path: Path, one_thread: None) -> None:
    """A plain ``autofit tune`` journal in the same output dir: one clear line at once, not a
    wait of ``--lease`` seconds for a queue nobody will write."""
    from autofit.errors import AutofitError
    from autofit.search.tuner import run_search
    from autofit.search.workers import run_worker
    from autofit.spec import spec_from_dict

    spec = spec_from_dict(landscape.make_raw(precision=["fp32"], checkpoint_segments=[0]))
    run_search(spec, out_dir=tmp_path, runner=landscape.Landscape())
    started = time.perf_counter()
    with pytest.raises(AutofitError, match="plain `autofit tune` .no work queue.: workers "
                                           "cannot join it; start over with"):
        run_worker(spec, f"journal:{tmp_path / 'study.journal'}", runner=landscape.Landscape(),
                   lease_s=60)
    assert time.perf_counter() - started < 30


def test_cli_target_measured_in_targets_yaml(tmp_path: Path) -> None:
    """The README's path with real CPU trials: the spec's study (``tune --workers 1``), a
    ``worker --target`` taking the storage from AUTOFIT_STORAGE, then ``results``: targets.yaml
    says the target was measured, and on which device."""
    raw = cpu_raw("cli-target")
    raw["search"]["checkpoint_segments"] = [0]
    spec = tmp_path / "exp.yaml"
    spec.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    url = f"journal:{out / 'study.journal'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOFIT_STORAGE": url}
    cli = [sys.executable, "-m", "autofit.cli"]

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=240,
                              env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    run("tune", str(spec), "--workers", "1", "--out", str(out))
    before = yaml.safe_load((out / "targets.yaml").read_text())["targets"]
    assert before[0]["status"] != "measured"
    worker = run("worker", str(spec), "--target", "cpu-small")
    assert "measured on CPU" in worker.stdout
    run("results", str(spec), "--out", str(out))
    rows = yaml.safe_load((out / "targets.yaml").read_text())["targets"]
    assert rows[0]["status"] == "measured" and rows[0]["measured_on"].startswith("CPU ")
    assert rows[0]["batch_size"] >= 1 and rows[0]["measured_peak_bytes"] <= int(2 * 1024**2 * 0.9)
    assert rows[1]["status"] == "predicted-only"
    pinned = yaml.safe_load((out / "configs" / "cpu-small.yaml").read_text())
    assert pinned["search"]["batch_size"]["max"] == rows[0]["batch_size"]


# -- the array scripts ---------------------------------------------------------------------

SCRIPTS = {"slurm-tune": "tune_slurm.sh", "lsf-tune": "tune_lsf.sh"}


def _write(tmp_path: Path, storage: str | None = URL) -> dict[str, Path]:
    from autofit.export import write_exports

    paths = write_exports(tune_results(), tmp_path, formats=list(SCRIPTS), storage=storage)
    return {p.name: p for p in paths}


@pytest.mark.parametrize("name", sorted(SCRIPTS.values()))
def test_golden_array_scripts(name: str, tmp_path: Path) -> None:
    produced = _write(tmp_path)[name].read_text()
    golden = GOLDEN / name
    if REGEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(produced)
    assert golden.exists(), f"no golden file {golden}; run with AUTOFIT_REGEN_GOLDEN=1"
    assert produced == golden.read_text(), f"{name} differs from {golden} (regenerate if intended)"
    assert "s3cret" not in produced and "PGPASSWORD" in produced


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_array_scripts_parse(tmp_path: Path) -> None:
    for storage in (URL, None):
        for path in _write(tmp_path / str(bool(storage)), storage).values():
            done = subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert os.access(path, os.X_OK)


def _fakes(tmp_path: Path) -> tuple[Path, Path]:
    """``sbatch``, ``bsub`` and ``autofit`` that log their arguments (bsub: and its stdin)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("sbatch", "autofit"):
        (bin_dir / tool).write_text(f'#!/bin/bash\nprintf "%s|" {tool} "$@" >> {log}\necho >> {log}\n')
    (bin_dir / "bsub").write_text(
        f'#!/bin/bash\nprintf "%s|" bsub "$@" >> {log}\n'
        f'head -c 11 | tr -d "\\n" >> {log}\necho >> {log}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir, log


def _run(script: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "LSB_", "AUTOFIT_"))}
    return subprocess.run([BASH, str(script)], capture_output=True, text=True, timeout=30,
                          env={**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env})


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_slurm_tune_submits_each_task_on_its_partition_and_runs_its_worker(tmp_path: Path) -> None:
    script = _write(tmp_path)["tune_slurm.sh"]
    bin_dir, log = _fakes(tmp_path)
    done = _run(script, bin_dir)
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == [
        f"sbatch|--array=0|--partition=gpu|{script}|",
        f"sbatch|--array=1|--partition=a100|{script}|",
        f"sbatch|--array=2|{script}|",  # no partition of its own: the script's default
    ]
    log.unlink()
    for task in ("0", "2"):
        done = _run(script, bin_dir, SLURM_JOB_ID="71", SLURM_ARRAY_JOB_ID="70",
                    SLURM_ARRAY_TASK_ID=task, AUTOFIT_STORAGE="postgresql+psycopg://u@h/db")
        assert done.returncode == 0, done.stderr
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert log.read_text().splitlines() == [
        f"autofit|worker|/abs/path/exp.yaml|--storage|postgresql+psycopg://u@h/db|--id|70_0@{host}|",
        "autofit|worker|/abs/path/exp.yaml|--storage|postgresql+psycopg://u@h/db|--device|cuda|"
        f"--target|V100 16GB|--id|70_2@{host}|",
    ]
    done = _run(script, bin_dir, SLURM_JOB_ID="71")
    assert done.returncode != 0 and "submit it as an array job" in done.stderr


@pytest.mark.skipif(BASH is None, reason="bash not installed")
def test_lsf_tune_submits_each_task_on_its_queue_and_runs_its_worker(tmp_path: Path) -> None:
    script = _write(tmp_path, storage=None)["tune_lsf.sh"]
    bin_dir, log = _fakes(tmp_path)
    done = _run(script, bin_dir)
    assert done.returncode != 0 and "export AUTOFIT_STORAGE=" in done.stderr  # none given
    done = _run(script, bin_dir, AUTOFIT_STORAGE="postgresql+psycopg://u@h/db")
    assert done.returncode == 0, done.stderr
    name = "vit-b-imagenet-tune"
    assert log.read_text().splitlines() == [
        f"bsub|-J|{name}[1]|-q|gpu|#!/bin/bash",
        f"bsub|-J|{name}[2]|-q|a100|#!/bin/bash",
        f"bsub|-J|{name}[3]|#!/bin/bash",
    ]
    log.unlink()
    done = _run(script, bin_dir, LSB_JOBID="9", LSB_JOBINDEX="2",
                AUTOFIT_STORAGE="postgresql+psycopg://u@h/db", AUTOFIT_SPEC="/x/exp.yaml")
    assert done.returncode == 0, done.stderr
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert log.read_text().splitlines() == [
        "autofit|worker|/x/exp.yaml|--storage|postgresql+psycopg://u@h/db|--device|cuda|"
        f"--target|A100-40GB|--id|9_2@{host}|"]
    done = _run(script, bin_dir, LSB_JOBID="9", LSB_JOBINDEX="0", AUTOFIT_STORAGE="x")
    assert done.returncode == 2 and "submit it as a job array" in done.stderr


def test_array_scripts_need_targets(tmp_path: Path) -> None:
    """A spec without targets: one line from the CLI, exit 2, nothing written."""
    import json

    data = tune_results()
    del data["spec"]["targets"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    done = subprocess.run([sys.executable, "-m", "autofit.cli", "export", str(path), "-f",
                           "slurm-tune", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "the spec has no targets" in lines[0], done.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_storage_password_is_not_written() -> None:
    from autofit.export.cluster_tune import storage_without_password

    assert storage_without_password(URL) == ("postgresql+psycopg://autofit@db.example:5432/autofit", True)
    assert storage_without_password("postgresql+psycopg://u@h/db") == ("postgresql+psycopg://u@h/db", False)
    assert storage_without_password("journal:/shared/s.journal") == ("journal:/shared/s.journal", False)


def test_readme_targets_with_partitions_validate() -> None:
    """The README's per-GPU-type targets block is a valid ``targets`` section."""
    from autofit.spec import spec_from_dict

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Many GPUs and clusters", 1)[1].split("\n## ", 1)[0]
    block = next(b.split("```", 1)[0] for b in section.split("```yaml\n")[1:] if "targets:" in b)
    raw = landscape.make_raw()
    raw["targets"] = yaml.safe_load(block)["targets"]
    targets = spec_from_dict(raw).targets
    assert [t.partition for t in targets] == ["a100", "h100", "l40s"]
    bad = landscape.make_raw()
    bad["targets"] = [{"name": "x", "memory": "8GB", "partition": "two words"}]
    with pytest.raises(Exception, match=r"targets\[0\]\.partition: must be a partition"):
        spec_from_dict(bad)
