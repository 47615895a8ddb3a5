"""Bad input never gives a traceback; interruption loses no measured trial; resume repeats none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autofit.errors import SpecError
from autofit.spec import spec_from_dict

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

VALID = {
    "name": "fuzz",
    "model": {"_target_": "autofit.zoo.mlp", "in_features": 8, "hidden": 8, "depth": 1,
              "out_features": 2},
    "data": {"kind": "tensor", "shape": [8], "num_classes": 2},
    "loss": "cross_entropy",
    "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1},
    "device": "cpu",
    "memory": {"budget": "1MiB", "margin": 0.1},
    "search": {"batch_size": {"min": 1, "max": 64}, "precision": ["fp32"],
               "checkpoint_segments": [0], "steps_per_trial": 1},
    "targets": [{"name": "A100-40GB", "memory": "40GB"}],
    "output": {"dir": "out", "global_batch_size": 64, "scripts": ["slurm"]},
}

junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from(["", "fp8", "auto", "24 parsecs", "1e400GB", "-1", "nosuch.module.X",
                     "torch.nn.Linear", "9" * 40, "cuda:x", "max_batchh"]),
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _paths(sub, prefix + (key,))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            yield from _paths(sub, prefix + (index,))


PATHS = [p for p in _paths(VALID) if p]


def _mutate(raw, path, value):
    import copy

    out = copy.deepcopy(raw)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


COUNT = {"cases": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(PATHS), junk), min_size=1, max_size=4),
       st.lists(st.tuples(st.text(min_size=1, max_size=8), junk), max_size=2))
def test_fuzzed_specs_give_field_errors_never_exceptions(mutations, extra_keys):
    raw = VALID
    for path, value in mutations:
        try:
            raw = _mutate(raw, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced the parent
    raw = dict(raw)
    for key, value in extra_keys:
        raw[key] = value
    COUNT["cases"] += 1
    try:
        spec_from_dict(raw, "fuzz.yaml")
    except SpecError as exc:
        assert exc.problems
        for line in exc.problems:
            assert line.startswith("fuzz.yaml"), line
            assert "\n" not in line
            assert ": " in line


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=200))
def test_fuzzed_yaml_text_through_cli_exits_2_without_traceback(tmp_path_factory, text):
    from typer.testing import CliRunner

    from autofit.cli import app

    path = tmp_path_factory.mktemp("fuzz") / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("mutation, needle", [
    ({"search": {"batch_size": {"min": 0}}}, "search.batch_size.min: must be >= 1, got 0"),
    ({"search": {"batch_size": {"max": 10**12}}}, "search.batch_size.max: must be <= 2147483648"),
    ({"memory": {"budget": "1e400GB"}}, "memory.budget"),
    ({"memory": {"margin": "ten percent"}}, "memory.margin: must be a number"),
    ({"model": {"_target_": "no dots here"}}, "model._target_: must be an import path"),
    ({"search": {"precision": "fp64"}}, "must be one of fp32, fp16, bf16"),
    ({"targets": [{"name": "X", "memory": "lots"}]}, "targets[0].memory"),
    ({"output": {"slurm": {"time": 86400}}}, "output.slurm.time: must be a quoted string"),
])
def test_bad_values_named(mutation, needle):
    raw = {**VALID, **{k: ({**VALID[k], **v} if isinstance(v, dict) and isinstance(VALID.get(k), dict) else v)
                       for k, v in mutation.items()}}
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw, "exp.yaml")
    assert any(needle in line for line in info.value.problems), info.value.problems


def _spec_file(tmp_path: Path) -> Path:
    raw = {
        "name": "slow",
        "model": {"_target_": "faults.Slow"},
        "data": {"kind": "tensor", "shape": [16], "num_classes": 4},
        "device": "cpu",
        "memory": {"budget": "8MiB", "margin": 0.1},
        "search": {"batch_size": {"min": 1, "max": 4}, "precision": ["fp32", "bf16"],
                   "steps_per_trial": 3, "verify_steps": 3, "objective": "max_throughput"},
    }
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(spec: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "autofit.cli", "tune", str(spec), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_ctrl_c_keeps_finished_trials_and_resume_repeats_none(tmp_path: Path):
    spec = _spec_file(tmp_path)
    out = tmp_path / "out"
    proc = _start(spec, out)
    # wait for the first finished trial, then interrupt during the second
    deadline = time.time() + 120
    lines = []
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("trial "):
            break
    assert any(line.startswith("trial ") for line in lines), "".join(lines) + proc.stderr.read()
    time.sleep(1.0)  # the second trial is running (each takes > 2 s)
    interrupted = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert time.time() - interrupted < 10, "the running trial was not killed promptly"
    assert "Traceback" not in stderr
    results = json.loads((out / "results.json").read_text())
    finished = [t for t in results["trials"]]
    assert len(finished) >= 1 and results["error"] == "interrupted"
    assert not (out / ".autofit.lock").exists()
    # without --resume the dir is refused; with it, no finished trial runs again
    refused = _start(spec, out)
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "--resume" in err
    resumed = _start(spec, out, "--resume", "--json")
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    data = json.loads(stdout)
    # a verification always runs (even where a search trial had the same steps); nothing
    # else that finished runs again
    def key(t: dict) -> str:
        return json.dumps(t["config"], sort_keys=True) + str(t["steps"]) + (t["purpose"] == "verify") * "v"

    done_before = {key(t) for t in finished}
    new = [t for t in data["trials"] if not t["resumed"]]
    assert all(key(t) not in done_before for t in new)
    assert sum(t["resumed"] for t in data["trials"]) == len(finished)


def test_second_ctrl_c_exits_at_once(tmp_path: Path):
    spec = _spec_file(tmp_path)
    proc = _start(spec, tmp_path / "out2")
    assert proc.stdout is not None
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line or "predicted" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert proc.returncode == 130


def test_concurrent_tune_on_same_dir_refused(tmp_path: Path):
    spec = _spec_file(tmp_path)
    out = tmp_path / "out3"
    first = _start(spec, out)
    assert first.stdout is not None
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".autofit.lock").exists():
        time.sleep(0.1)
    second = _start(spec, out)
    _, err = second.communicate(timeout=120)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=30)
    assert second.returncode == 2
    assert "in use by another autofit run" in err
