"""Many workers on one study: no duplicate trials, kill -9 loses nothing, one-line storage errors.

Every test runs on a journal file; the same tests run on a throwaway PostgreSQL cluster
started from the installed binaries (skipped, with the reason, where there are none or no
driver). Worker processes run this file as a script (``python tests/test_workers.py worker``)
with a fake trial runner whose trials take a fixed time, so a kill lands mid-trial.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import landscape  # noqa: E402

SEARCH = {"precision": ["fp32"], "checkpoint_segments": [0, 1, 2]}
"""Three settings, two trials each when the prediction is right (the landscape's is)."""


def spec_raw(name: str) -> dict[str, Any]:
    raw = landscape.make_raw(**SEARCH)
    raw["name"] = name
    return raw


class SlowLandscape(landscape.Landscape):
    """The landscape, each trial taking ``delay`` s; every start and end logged to ``log``."""

    def __init__(self, delay: float, log: str | None = None) -> None:
        super().__init__()
        self.delay, self.log = delay, log

    def __call__(self, spec: Any, candidate: Any, **kw: Any) -> Any:
        self._write(f"start {candidate.label()} steps={kw['steps']}")
        time.sleep(self.delay)
        result = super().__call__(spec, candidate, **kw)
        self._write(f"done {candidate.label()} steps={kw['steps']}")
        return result

    def _write(self, line: str) -> None:
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(line + "\n")


def _worker_main(raw_json: str, url: str, delay: float, log: str, worker_id: str) -> None:
    """A worker process: the fake landscape, slow trials, every start/end in ``log``."""
    from autofit.search.workers import run_worker
    from autofit.spec import spec_from_dict

    spec = spec_from_dict(json.loads(raw_json))
    result = run_worker(spec, url, runner=SlowLandscape(delay, log), worker_id=worker_id,
                        lease_s=30, poll_s=0.1)
    print("best", result.best.result.candidate.label(), flush=True)


def start_worker(raw: dict[str, Any], url: str, delay: float, log: Path, worker_id: str
                 ) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), "worker", json.dumps(raw), url, str(delay),
         str(log), worker_id], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


# -- storages ------------------------------------------------------------------------------

def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / name).exists():
            return str(base / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free port with its own socket dir; its URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL driver not installed (pip install 'autofit[postgres]')")
    base = Path(tempfile.mkdtemp(prefix="autofit-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        prefix = ["runuser", "-u", "postgres", "--"]
        os.chmod(base, 0o755)
        for path in (base, sock):
            shutil.chown(path, "postgres")
    port = _free_port()
    run = lambda cmd: subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=60)  # noqa: E731
    made = run([initdb, "-D", str(data), "-U", "postgres", "-A", "trust"])
    if made.returncode != 0:
        pytest.skip(f"initdb failed: {made.stderr.strip().splitlines()[-1:]}")
    started = run([pg_ctl, "-D", str(data), "-l", str(base / "log"), "-o",
                   f"-k {sock} -p {port} -c listen_addresses=127.0.0.1", "-w", "start"])
    if started.returncode != 0:
        pytest.skip(f"pg_ctl start failed: {started.stderr.strip()[-200:]}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["journal", "postgres"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "journal":
        return f"journal:{tmp_path / 'study.journal'}"
    return request.getfixturevalue("postgres")


def load(raw: dict[str, Any], url: str) -> Any:
    import optuna

    from autofit.search.workers import open_storage, study_name
    from autofit.spec import spec_from_dict

    return optuna.load_study(study_name=study_name(spec_from_dict(raw)), storage=open_storage(url))


def measured(study: Any) -> dict[int, tuple]:
    """number -> (config, steps, purpose) of every measured trial in the study."""
    from autofit.search.workers import measured_trials

    return {t.number: (tuple(sorted(t.user_attrs["result"]["candidate"].items())),
                       t.user_attrs["steps"], t.user_attrs["purpose"])
            for t in measured_trials(study)}


_SEQUENTIAL: dict[str, str] = {}


def sequential_best(raw: dict[str, Any]) -> str:
    """The single-process search's answer (the name does not change it: computed once)."""
    from autofit.search.tuner import run_search
    from autofit.spec import spec_from_dict

    key = json.dumps({k: v for k, v in raw.items() if k != "name"}, sort_keys=True)
    if key not in _SEQUENTIAL:
        result = run_search(spec_from_dict(raw), runner=landscape.Landscape())
        _SEQUENTIAL[key] = result.best.result.candidate.label()
    return _SEQUENTIAL[key]


# -- tests ---------------------------------------------------------------------------------

def _wait_for(log: Path, proc: subprocess.Popen, done: int, deadline: float) -> None:
    """Until ``log`` shows ``done`` finished trials and one more started (mid-trial)."""
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        if sum(x.startswith("done") for x in lines) >= done and lines[-1].startswith("start"):
            return
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "the worker took too long"
        time.sleep(0.05)


def _runs(log: Path, what: str) -> list[str]:
    return [x.split(" ", 1)[1] for x in log.read_text().splitlines() if x.startswith(what)]


def test_workers_share_a_study_and_kill9_loses_nothing(storage: str, tmp_path: Path,
                                                        one_thread: None) -> None:
    """Two worker processes share one study; each is killed (-9) in the middle of a trial;
    a third worker started after both died finishes the study. No trial ran twice, every
    trial measured before a kill is kept, each killed trial was re-run, and the answer is
    the single-process search's. Then the study alone answers, running nothing."""
    from autofit.search.workers import duplicates, run_worker
    from autofit.spec import spec_from_dict

    raw = spec_raw(f"kill-{os.getpid()}-{int(time.time() * 1000) % 100000}")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_worker(raw, storage, 0.4, log, name) for log, name in zip(logs, "ab", strict=True)]
    deadline = time.time() + 120
    # a dies inside a trial after measuring one; b then re-runs a's dead claim (or its own,
    # then the verification) and dies inside a trial too. Neither is waited for before b's
    # death: a killed child is a zombie until then, and must still count as dead.
    _wait_for(logs[0], procs[0], 1, deadline)
    os.kill(procs[0].pid, signal.SIGKILL)
    _wait_for(logs[1], procs[1], 1, deadline)
    os.kill(procs[1].pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()
    in_flight = [_runs(log, "start")[-1] for log in logs]
    finished = [run for log in logs for run in _runs(log, "done")]
    assert all(_runs(log, "done") for log in logs), "both workers measured"
    study = load(raw, storage)
    before = measured(study)
    assert len(before) == len(finished)  # each kill came after a record, inside a trial

    survivor = landscape.Landscape()
    spec = spec_from_dict(raw)
    result = run_worker(spec, storage, runner=survivor, worker_id="c", lease_s=30, poll_s=0.1)
    assert result.best.result.candidate.label() == sequential_best(raw)
    study = load(raw, storage)
    after = measured(study)
    assert set(before.items()) <= set(after.items()), "a measured trial was lost"
    assert duplicates(study) == 0
    rerun = {f"{_label(*call[:4])} steps={call[4]}" for call in survivor.calls}
    recorded = {f"{_label(**dict(cfg))} steps={steps}" for cfg, steps, _ in before.values()}
    final = {f"{_label(**dict(cfg))} steps={steps}" for cfg, steps, _ in after.values()}
    # a killed trial was re-run by the other worker (it re-queues a dead claim) or the third
    assert set(in_flight) <= final, f"killed trials {in_flight} never measured: {final}"
    assert not (recorded & rerun), f"re-ran measured trials: {recorded & rerun}"
    assert len(after) == len(before) + len(survivor.calls)

    # every worker stopped: the study answers alone, running nothing
    again = run_worker(spec, storage, assemble_only=True)
    assert again.best.result.candidate == result.best.result.candidate
    assert len(again.trials) == len(after)


def _label(batch_size: int, input_size: int, precision: Any, checkpoint_segments: int) -> str:
    from autofit.candidate import Candidate
    from autofit.choices import Precision

    return Candidate(batch_size=batch_size, input_size=input_size,
                     precision=Precision(precision), checkpoint_segments=checkpoint_segments).label()


def test_max_input_size_items_are_the_walk(tmp_path: Path, one_thread: None) -> None:
    """max_input_size hands its walk out as one work item per (size, setting) trial: a worker
    answers what the single-process walk answers, from the same trials, with no duplicate;
    sizes predicted not to fit are never run."""
    from autofit.candidate import Candidate
    from autofit.search.tuner import run_search
    from autofit.search.workers import duplicates, run_worker
    from autofit.spec import spec_from_dict

    raw = landscape.make_raw(objective="max_input_size", input_size=[16, 32, 64],
                             batch_size={"min": 8, "max": 64})
    raw["name"] = "walk"
    raw["model"] = {"_target_": "autofit.zoo.gpt", "vocab_size": 64, "block_size": 128,
                    "n_layer": 2, "n_head": 2, "n_embd": 32}
    raw["data"] = {"kind": "tokens", "vocab_size": 64, "seq_len": 16}
    land = landscape.Landscape()
    spec = spec_from_dict(raw)
    c32 = land.peak(spec, Candidate(batch_size=8, input_size=32))
    c64 = land.peak(spec, Candidate(batch_size=8, input_size=64))
    raw["memory"] = {"budget": int((c32 + c64) / 2 / 0.9), "margin": 0.1}
    spec = spec_from_dict(raw)
    alone, shared = landscape.Landscape(), landscape.Landscape()
    expected = run_search(spec, runner=alone)
    url = f"journal:{tmp_path / 's.journal'}"
    result = run_worker(spec, url, runner=shared, poll_s=0.1, worker_id="walker")
    assert result.best.result.candidate == expected.best.result.candidate
    assert result.best.result.candidate.input_size == 32
    assert sorted(shared.calls) == sorted(alone.calls)
    assert all(call[1] <= 32 for call in shared.calls)
    study = load(raw, url)
    assert duplicates(study) == 0
    from autofit.search.workers import measured_trials

    assert {t.user_attrs["worker"] for t in measured_trials(study)} == {"walker"}


def test_results_of_unfinished_study_say_so(tmp_path: Path, one_thread: None) -> None:
    """``autofit results`` on a study with pending work: partial, with one clear line."""
    from autofit.candidate import Setting
    from autofit.choices import Precision
    from autofit.errors import TuneFailed
    from autofit.search.workers import WorkQueue, open_worker_study
    from autofit.spec import spec_from_dict

    spec = spec_from_dict(spec_raw("unfinished"))
    url = f"journal:{tmp_path / 's.journal'}"
    study, created = open_worker_study(spec, url, create=True, say=lambda m: None)
    assert created
    WorkQueue(study, "x").enqueue([Setting(0, Precision.FP32, 0)])
    from autofit.search.workers import run_worker

    with pytest.raises(TuneFailed, match="not finished: 2 work item"):
        run_worker(spec, url, assemble_only=True)


def test_different_spec_refused_while_working(tmp_path: Path, one_thread: None) -> None:
    from autofit.candidate import Setting
    from autofit.choices import Precision
    from autofit.errors import AutofitError
    from autofit.search.workers import WorkQueue, open_worker_study
    from autofit.spec import spec_from_dict

    url = f"journal:{tmp_path / 's.journal'}"
    first = spec_from_dict(spec_raw("same-name"))
    study, _ = open_worker_study(first, url, create=True, say=lambda m: None)
    WorkQueue(study, "x").enqueue([Setting(0, Precision.FP32, 0)])
    other = spec_raw("same-name")
    other["memory"]["budget"] = "8MiB"
    with pytest.raises(AutofitError, match="different spec named 'same-name' still has work"):
        open_worker_study(spec_from_dict(other), url, create=True, say=lambda m: None)


def test_worker_with_another_limit_refused(tmp_path: Path, one_thread: None) -> None:
    """A worker whose memory limit differs from the study's (another GPU type) must not mix
    its measurements in."""
    from autofit.errors import AutofitError
    from autofit.search.workers import LIMIT_ATTR, open_worker_study, run_worker
    from autofit.spec import spec_from_dict

    spec = spec_from_dict(spec_raw("limits"))
    url = f"journal:{tmp_path / 's.journal'}"
    study, _ = open_worker_study(spec, url, create=True, say=lambda m: None)
    study.set_user_attr(LIMIT_ATTR, {"limit_bytes": 123, "device": "A100"})
    study.set_user_attr("autofit_queued", 0)
    with pytest.raises(AutofitError, match="measures under 123 bytes .A100.; this worker's limit"):
        run_worker(spec, url, runner=landscape.Landscape())


def test_unreachable_storage_is_one_line() -> None:
    """A server that is not there: one line, the password hidden, exit 2, no traceback."""
    url = f"postgresql+psycopg://autofit:s3cret@127.0.0.1:{_free_port()}/nodb"
    cmd = [sys.executable, "-m", "autofit.cli", "worker",
           str(ROOT / "configs" / "quickstart_cpu.yaml"), "--storage", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot open storage"), done.stderr
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr


def test_bad_sqlite_path_is_one_line() -> None:
    from autofit.search.workers import StorageUnavailable, open_storage

    with pytest.raises(StorageUnavailable, match="^cannot open storage sqlite:") as info:
        open_storage("sqlite:////nonexistent-dir/x/study.db")
    assert "\n" not in str(info.value)


def test_wrong_password_on_postgres(postgres: str) -> None:
    """A real server that refuses the login: one line, the password hidden."""
    from autofit.search.workers import StorageUnavailable, open_storage

    port = postgres.split("@127.0.0.1:")[1].split("/")[0]
    with pytest.raises(StorageUnavailable) as info:
        open_storage(f"postgresql+psycopg://nobody:hunter2@127.0.0.1:{port}/postgres")
    message = str(info.value)
    assert "\n" not in message and "hunter2" not in message and "nobody" in message


def test_storage_errors_retry_then_stop_in_one_line() -> None:
    from sqlalchemy.exc import OperationalError

    from autofit.search.workers import StorageUnavailable, retry

    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection\nmore"))
        return "ok"

    said: list[str] = []
    assert retry(flaky, "reading", delays=(0.01, 0.01, 0.01), say=said.append) == "ok"
    assert len(calls) == 3 and len(said) == 2

    def down() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused\ndetail"))

    with pytest.raises(StorageUnavailable) as info:
        retry(down, "claiming work", delays=(0.01, 0.01))
    assert "\n" not in str(info.value) and "gave up after 2 retries" in str(info.value)


def test_tune_workers_on_this_host(tmp_path: Path) -> None:
    """The README's one-host form, real trials on CPU: ``autofit tune --workers 2``."""
    import yaml

    from autofit.search.workers import WORK_ATTR, duplicates

    raw = spec_raw("host-form")
    raw["search"]["checkpoint_segments"] = [0]
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "autofit.cli", "tune", str(path), "--workers",
                           "2", "--out", str(out)], capture_output=True, text=True, timeout=180,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "tuned.yaml").exists()
    best = results["best"]
    study = load(raw, f"journal:{out / 'study.journal'}")
    assert duplicates(study) == 0
    fits = [t["config"]["batch_size"] for t in results["trials"] if t["status"] == "fits"]
    assert best["batch_size"] == max(fits) and best["verified"]
    # the CPU budget: the finish replay reused the search trial at the winner, ran no other
    assert best["verification"] == "search trial reused"
    assert not [t for t in results["trials"] if t["purpose"] == "verify"]
    assert any(t["number"] == best["trial"] and t["status"] == "fits" for t in results["trials"])
    # worker w1 ran as its own process and stopped cleanly (w0, this process, may have
    # measured every setting before w1 had started: the trials here take 0.1 s)
    assert "[w1] " in done.stdout and "[w1] exited" not in done.stdout
    assert all(t.state.name == "PRUNED" for t in study.trials if WORK_ATTR in t.user_attrs)


def test_readme_cluster_forms_are_valid_bash() -> None:
    """The README's Slurm array is examples/slurm_workers.sh, and both it and the throwaway
    PostgreSQL script parse (``bash -n``); the one-host form runs in the test above."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Many GPUs and clusters", 1)[1].split("\n## ", 1)[0]
    script = (ROOT / "examples" / "slurm_workers.sh").read_text()
    assert script.strip() in section
    for path in (ROOT / "examples" / "slurm_workers.sh", ROOT / "scripts" / "throwaway_postgres.sh"):
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    for block in blocks:
        done = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert done.returncode == 0, (block, done.stderr)
    commands = {line.split()[1] for b in blocks for line in b.splitlines()
                if line.startswith("autofit ")}
    assert commands <= {"tune", "worker", "results", "export"}, commands
    assert "export" in commands and any("-f slurm-tune" in b for b in blocks)


def test_throwaway_postgres_script_starts_and_stops() -> None:
    """The README's one-liner for a throwaway server: it prints a URL workers can open, and
    ``stop`` removes it."""
    if not (_pg_bin("initdb") and _pg_bin("pg_ctl")):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    pytest.importorskip("psycopg", reason="PostgreSQL driver not installed")
    import optuna

    from autofit.search.workers import open_storage

    script = ROOT / "scripts" / "throwaway_postgres.sh"
    base = Path(tempfile.mkdtemp(prefix="autofit-pg-script-"))  # the server user reaches /tmp/X
    done = subprocess.run(["bash", str(script), "start", str(base), str(_free_port())],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser")
    try:
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip()
        assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        assert optuna.get_all_study_names(open_storage(url)) == []
    finally:
        subprocess.run(["bash", str(script), "stop", str(base)], capture_output=True, timeout=60)
    assert not base.exists()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5], sys.argv[6])
