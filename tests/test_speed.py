"""Issue 17: fast answers. What is checked here is *what* runs (imports, traces, cache hits),
never how long it takes: timings live in scripts/bench_speed.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(code: str) -> set[str]:
    probe = textwrap.dedent(code) + "\nimport sys\nprint('\\n'.join(sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    return set(out.stdout.split())


def test_cli_help_does_not_import_torch():
    mods = _modules_after("""
        import contextlib, io
        from autofit.cli import app
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            app(["--help"])
    """)
    assert "autofit.cli.app" in mods
    assert "torch" not in mods


def test_validate_of_a_bad_spec_does_not_import_torch(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: broken\nmodel: {_target_: autofit.zoo.mlp}\n"
                   "data: {kind: tensor, shape: [8], num_classes: 2}\n"
                   "optimiser: {_target_: torch.optim.SGD}\n")
    mods = _modules_after(f"""
        import contextlib, io
        from autofit.cli import app
        err = io.StringIO()
        with contextlib.suppress(SystemExit), contextlib.redirect_stderr(err):
            app(["validate", {str(bad)!r}])
        assert "did you mean 'optimizer'" in err.getvalue(), err.getvalue()
    """)
    assert "autofit.spec" in mods
    assert "torch" not in mods


@pytest.mark.parametrize("where", ["out_dir", "output.dir"])
def test_a_taken_output_dir_is_refused_before_torch_is_imported(tmp_path: Path, where: str):
    """The refusal is one line in well under a second: the spec's model module (which
    imports torch) is not resolved first. Both ways of naming the dir: ``out_dir`` and the
    spec's ``output.dir``; the lock-time check stays (``tests/test_cli.py``)."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "results.json").write_text("{}")
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: tiny\nmodel: {_target_: autofit.zoo.mlp, in_features: 8, hidden: 8,"
                    " depth: 1, out_features: 2}\ndata: {kind: tensor, shape: [8], "
                    f"num_classes: 2}}\ndevice: cpu\noutput: {{dir: {str(taken)!r}}}\n")
    out_dir = repr(str(taken)) if where == "out_dir" else "None"
    mods = _modules_after(f"""
        from autofit import api
        from autofit.errors import OutputDirError
        try:
            api.tune({str(spec)!r}, out_dir={out_dir})
        except OutputDirError as exc:
            assert "already holds tune results" in str(exc), exc
        else:
            raise SystemExit("not refused")
        print("REFUSED")
    """)
    assert "REFUSED" in mods
    assert "torch" not in mods


def test_lazy_package_still_exports_everything():
    import autofit
    import autofit.export.tuned  # noqa: F401  the subpackage must not shadow the function

    for name in autofit.__all__:
        assert getattr(autofit, name) is not None, name
    assert callable(autofit.export) and autofit.export.__module__ == "autofit.api"


TINY = {
    "name": "speed-tiny",
    "model": {"_target_": "autofit.zoo.mlp", "in_features": 32, "hidden": 64, "depth": 2,
              "out_features": 4},
    "data": {"kind": "tensor", "shape": [32], "num_classes": 4},
    "device": "cpu",
    "memory": {"budget": "4MiB", "margin": 0.10},
    "search": {"batch_size": {"min": 1, "max": 4096}},
}


def test_second_estimate_traces_nothing_new(tmp_path: Path):
    import autofit

    first = autofit.estimate(TINY, cache=tmp_path / "c")
    second = autofit.estimate(TINY, cache=tmp_path / "c")
    assert first.cache["new"] >= 3 and first.cache["hits"] == 0
    assert second.cache == {**first.cache, "hits": first.cache["new"], "new": 0}
    assert second.max_batch.batch_size == first.max_batch.batch_size
    assert second.estimate.peak_bytes == first.estimate.peak_bytes
    assert second.estimate.cached and not first.estimate.cached
    off = autofit.estimate(TINY, cache=False)
    assert off.cache is None and off.max_batch.batch_size == first.max_batch.batch_size


def _estimate_cli(spec_path: Path, cache_dir: Path, *extra: str) -> tuple[str, bool]:
    """``autofit estimate`` in a fresh process: (stdout, whether torch was imported)."""
    code = textwrap.dedent(f"""
        import contextlib, sys
        from autofit.cli import app
        with contextlib.suppress(SystemExit):
            app(["estimate", {str(spec_path)!r}, "--cache-dir", {str(cache_dir)!r}, *{extra!r}])
        print("TORCH-IMPORTED", "torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert "TORCH-IMPORTED" in out.stdout, out.stderr
    text, _, flag = out.stdout.rpartition("TORCH-IMPORTED")
    return text, flag.strip() == "True"


def _without_cache_line(text: str) -> str:
    """The output less its trace-cache line, with a fresh trace's "traced in X s" read as the
    cached trace's "read from the trace cache" (the only other line that may differ)."""
    import re

    text = re.sub(r"traced in [0-9.]+ s", "read from the trace cache", text)
    return "\n".join(line for line in text.splitlines() if not line.startswith("trace cache:"))


def test_a_second_estimate_answers_without_torch(tmp_path: Path):
    import yaml

    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(TINY))
    first, torch_first = _estimate_cli(spec_path, tmp_path / "c")
    second, torch_second = _estimate_cli(spec_path, tmp_path / "c")
    assert torch_first and not torch_second
    assert "0 hit(s)" in first and "0 new trace(s)" in second
    assert "traced in" in first and "read from the trace cache" in second
    assert _without_cache_line(second) == _without_cache_line(first)
    as_json, torch_json = _estimate_cli(spec_path, tmp_path / "c", "--json")
    assert not torch_json and '"max_batch_size"' in as_json
    # another question (a batch the record does not hold) goes the full way
    _, torch_other = _estimate_cli(spec_path, tmp_path / "c", "--batch-size", "3")
    assert torch_other


def test_the_command_skips_teardown_but_keeps_output_and_exit_code(tmp_path: Path):
    """``autofit`` leaves with os._exit once torch is loaded: everything printed still
    arrives through a pipe, and the exit code is the command's."""
    import yaml

    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(TINY))
    ok = subprocess.run([sys.executable, "-m", "autofit.cli", "estimate", str(spec_path),
                         "--no-cache", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    import json

    assert json.loads(ok.stdout)["max_batch_size"] > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "model": {"_target_": "autofit.zoo.nope"}}))
    failed = subprocess.run([sys.executable, "-m", "autofit.cli", "estimate", str(bad)],
                            capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 2
    assert "cannot import 'autofit.zoo.nope'" in failed.stderr and "Traceback" not in failed.stderr


def test_an_answer_record_replays_only_complete_evidence(tmp_path: Path):
    import autofit

    cache = tmp_path / "c"
    first = autofit.estimate(TINY, cache=cache)
    records = list(cache.glob("estimate-*.json"))
    assert len(records) == 1
    # a larger budget is another answer: its own record, the shared traces hit
    wider = autofit.estimate({**TINY, "memory": {"budget": "6MiB", "margin": 0.10}}, cache=cache)
    assert len(list(cache.glob("estimate-*.json"))) == 2
    assert wider.cache["hits"] >= 1
    assert wider.max_batch.batch_size == autofit.estimate(
        {**TINY, "memory": {"budget": "6MiB", "margin": 0.10}}, cache=False).max_batch.batch_size
    # a record whose trace is gone is no answer: the trace is run again, same result
    import json

    keys = json.loads(records[0].read_text())["traces"]
    (cache / f"{keys[-1]}.json").unlink()
    again = autofit.estimate(TINY, cache=cache)
    assert again.cache["new"] == 1 and again.cache["hits"] == len(keys) - 1
    assert again.max_batch.batch_size == first.max_batch.batch_size
    assert again.to_dict()["batch_curve"] == first.to_dict()["batch_curve"]


def test_device_without_torch():
    from autofit.predict.cache import device_without_torch

    assert device_without_torch("cpu") == "cpu"
    assert device_without_torch("cuda") is None and device_without_torch("cuda:1") is None
    import glob
    import os

    gpu_nodes = glob.glob("/dev/nvidia*") or os.path.exists("/dev/kfd")
    if sys.platform.startswith("linux"):
        assert device_without_torch("auto") == (None if gpu_nodes else "cpu")


def test_cache_key_follows_what_a_trace_reads(tmp_path: Path):
    import autofit
    from autofit.predict.cache import TraceCache
    from autofit.predict.device_model import CPU, CUDA_DEFAULT

    cache = TraceCache(tmp_path)
    spec = autofit.as_spec(TINY)
    cand = autofit.candidate_for(spec, batch_size=4)
    key = cache.key(spec, cand, CPU)
    assert key == TraceCache(tmp_path).key(autofit.as_spec(dict(TINY)), cand, CPU)
    assert key != cache.key(spec, cand.with_batch(5), CPU)
    assert key != cache.key(spec, cand, CUDA_DEFAULT)
    wider = {**TINY, "model": {**TINY["model"], "hidden": 65}}
    assert key != cache.key(autofit.as_spec(wider), cand, CPU)
    cheaper = {**TINY, "memory": {"budget": "8MiB", "margin": 0.2}}  # a budget is not traced
    assert key == cache.key(autofit.as_spec(cheaper), cand, CPU)


def test_a_user_module_edit_invalidates_its_traces(tmp_path: Path):
    import os

    from autofit.predict.cache import module_file, spec_fingerprint
    from autofit.spec import load_spec

    (tmp_path / "mymodel.py").write_text("import torch\n\ndef net():\n"
                                         "    return torch.nn.Linear(8, 2)\n")
    spec_path = tmp_path / "exp.yaml"
    spec_path.write_text("model: {_target_: mymodel.net}\n"
                         "data: {kind: tensor, shape: [8], num_classes: 2}\ndevice: cpu\n")
    spec = load_spec(spec_path, check_imports=False)
    assert module_file("mymodel.net", [str(tmp_path)]) == str(tmp_path / "mymodel.py")
    before = spec_fingerprint(spec)
    st = os.stat(tmp_path / "mymodel.py")
    os.utime(tmp_path / "mymodel.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert spec_fingerprint(spec) != before


@pytest.mark.parametrize("limit_mib", [8, 24])
def test_segment_lines_pin_the_boundary_in_three_traces(limit_mib: int):
    import autofit
    from autofit.predict.batch_curve import predict_max_batch
    from autofit.predict.device_model import CPU
    from autofit.predict.trace import estimate

    # a decoder whose every stretch of the step is affine in batch from batch 1 (an MLP's
    # backward peak moves between moments at small batches: more traces, same boundary)
    spec = autofit.as_spec({**TINY, "model": {"_target_": "autofit.zoo.gpt", "n_layer": 2,
                                              "n_embd": 64, "n_head": 2, "vocab_size": 64,
                                              "block_size": 32},
                            "data": {"kind": "tokens", "vocab_size": 64, "seq_len": 32}})
    base = autofit.candidate_for(spec, batch_size=1)
    limit = limit_mib * 2**20
    result = predict_max_batch(spec, base, CPU, limit)
    b = result.batch_size
    assert result.traces <= 4  # 3 when every stretch is affine from the lowest batch
    # the answer is the traced boundary: b fits and b + 1 does not, traced independently
    assert estimate(spec, base.with_batch(b), CPU).peak_bytes <= limit
    assert estimate(spec, base.with_batch(b + 1), CPU).peak_bytes > limit
    # an answer read off the lines carries the exact traced peak
    assert result.estimate.peak_bytes == estimate(spec, base.with_batch(b), CPU).peak_bytes


def test_verification_length_follows_the_backend():
    """Under the CPU budget one timed step proves the winner; CUDA keeps verify_steps (creep);
    max_throughput keeps them too (its answer is the verification's timing)."""
    from autofit.candidate import Candidate
    from autofit.choices import LimitKind, Purpose
    from autofit.search.results import TrialRecord
    from autofit.search.searches import CPU_BUDGET_VERIFY_STEPS, verification_steps
    from autofit.spec import spec_from_dict
    from autofit.trials.result import TrialResult

    raw = {"model": {"_target_": "autofit.zoo.mlp"},
           "data": {"kind": "tensor", "shape": [8], "num_classes": 2},
           "search": {"verify_steps": 10}}
    spec = spec_from_dict(raw)

    def best(kind: LimitKind) -> TrialRecord:
        result = TrialResult(candidate=Candidate(batch_size=4, input_size=0), status="fits",
                             limit_kind=kind)
        return TrialRecord(number=0, purpose=Purpose.PREDICTED, result=result,
                           predicted_peak_bytes=1, steps=1)

    steps, why = verification_steps(spec, best(LimitKind.CPU_BUDGET))
    assert steps == CPU_BUDGET_VERIFY_STEPS < 10 and "deterministic" in why
    steps, why = verification_steps(spec, best(LimitKind.CUDA_FRACTION))
    assert steps == 10 and "creep" not in why and "grow over steps" in why
    throughput = spec_from_dict({**raw, "search": {"verify_steps": 10, "objective": "max_throughput"}})
    assert verification_steps(throughput, best(LimitKind.CPU_BUDGET))[0] == 10
    assert verification_steps(spec, best(LimitKind.RLIMIT))[0] == 10


def test_cpu_budget_search_trial_is_the_verification():
    """Under the CPU budget a fitting search trial at the winner that ran as many steps past
    step 2 as the verification would is reused (no trial run, a note says why); not when it
    ran fewer, did not fit, lacked optimizer state, on CUDA, rlimit or for max_throughput."""
    import dataclasses

    from autofit.candidate import Candidate
    from autofit.choices import LimitKind, Purpose
    from autofit.search.results import TrialRecord
    from autofit.search.searches import Search, verify_best
    from autofit.spec import spec_from_dict
    from autofit.trials.result import TrialResult

    raw = {"model": {"_target_": "autofit.zoo.mlp"},
           "data": {"kind": "tensor", "shape": [8], "num_classes": 2},
           "search": {"verify_steps": 10}}
    spec = spec_from_dict(raw)
    ran: list[tuple[int, int]] = []

    class Ledger:  # a verification that runs records itself here
        max_trials = 0

        def run(self, candidate, purpose, predicted_peak, steps=None, asked=None):
            ran.append((candidate.batch_size, steps))
            return TrialRecord(number=9, purpose=purpose, predicted_peak_bytes=predicted_peak,
                               steps=steps, result=TrialResult(candidate=candidate, status="fits",
                                                               steps_run=2 + steps))

    def search(s=spec) -> Search:
        return Search(s, None, {}, {}, Ledger(), lambda event: None, "binary")  # type: ignore[arg-type]

    def trial(kind: LimitKind, steps_run: int = 3, status: str = "fits",
              warning: str = "") -> TrialRecord:
        result = TrialResult(candidate=Candidate(batch_size=4, input_size=0), status=status,
                             limit_kind=kind, steps_run=steps_run, warning=warning)
        return TrialRecord(number=3, purpose=Purpose.REFINE, result=result,
                           predicted_peak_bytes=1, steps=1)

    s = search()
    best = trial(LimitKind.CPU_BUDGET)
    got = verify_best(s, best)
    assert ran == [] and got is not None and got.reused and got.purpose == Purpose.VERIFY
    assert got.result is best.result and got.number == 3 and not best.reused
    assert any("peak repeats from step 2" in n and "batch 4" in n and "1 step past step 2" in n
               and "reused as the verification" in n for n in s.notes)
    # too few steps past step 2, no optimizer state, another limit kind or objective: it runs
    cases = [trial(LimitKind.CPU_BUDGET, steps_run=2),
             trial(LimitKind.CPU_BUDGET, warning="optimizer state never appeared (every fp16 "
                                                 "step overflowed)"),
             trial(LimitKind.CUDA_FRACTION, steps_run=20), trial(LimitKind.CUDA_DEVICE),
             trial(LimitKind.RLIMIT)]
    for case in cases:
        ran.clear()
        got = verify_best(search(), case)
        assert ran and got is not None and not got.reused and got.number == 9
    throughput = spec_from_dict({**raw, "search": {"verify_steps": 10,
                                                   "objective": "max_throughput"}})
    ran.clear()
    assert not verify_best(search(throughput), trial(LimitKind.CPU_BUDGET, 20)).reused
    assert ran == [(4, 10)]
    # a verification longer than the search trial's (verify_steps under the CPU cap) runs
    short = dataclasses.replace(spec, search=dataclasses.replace(spec.search, warmup_steps=3))
    ran.clear()
    assert not verify_best(search(short), trial(LimitKind.CPU_BUDGET, steps_run=3)).reused
    assert ran == [(4, 1)]


def test_settings_are_predicted_side_by_side_with_the_same_answers(tmp_path: Path,
                                                                   monkeypatch):
    """A process forked from the trial fork server traces settings from the last one down
    while this one traces from the first up; the answers are the serial ones, and the
    helper's settings are read back from the cache it filled (hits on an empty cache)."""
    import time

    import autofit
    from autofit.predict.batch_curve import predict_many, predict_max_batch
    from autofit.predict.cache import TraceCache, using
    from autofit.predict.device_model import CPU
    from autofit.search.plan import settings_of
    from autofit.trials import runner

    spec = autofit.as_spec({**TINY, "model": {"_target_": "autofit.zoo.gpt", "n_layer": 1,
                                              "n_embd": 32, "n_head": 2, "vocab_size": 64,
                                              "block_size": 32},
                            "data": {"kind": "tokens", "vocab_size": 64, "seq_len": 32},
                            "search": {"batch_size": {"min": 1, "max": 4096},
                                       "input_size": [8, 16, 24, 32]}})
    bases = [s.candidate(1) for s in settings_of(spec)]
    limit = 2 * 2**20
    serial = [predict_max_batch(spec, b, CPU, limit, exact=False).batch_size for b in bases]
    runner.prestart()
    server = runner.running_server()
    assert server is not None
    try:
        deadline = time.monotonic() + 120
        while not server.ready_now() and time.monotonic() < deadline:
            time.sleep(0.05)
        order: list[int] = []
        import autofit.predict.batch_curve as bc

        # this process claims its first setting only once the helper holds the last one (or
        # after 60 s), so that a loaded machine cannot let it take every setting first
        own_claim = bc._Helper.claim

        def claim_after_the_helper(helper: Any, index: int) -> bool:
            last = Path(helper.request["claims"]) / f"claim-{len(helper.request['bases']) - 1}"
            deadline = time.monotonic() + 60
            while helper.pid is not None and not last.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return own_claim(helper, index)

        monkeypatch.setattr(bc._Helper, "claim", claim_after_the_helper)
        with using(TraceCache(tmp_path / "c")) as cache:
            found = predict_many(spec, bases, CPU, limit, exact=False, server=server,
                                 on_each=lambda i, _: order.append(i))
        assert [p.batch_size for p in found] == serial
        assert sorted(order) == list(range(len(bases)))
        assert cache.hits > 0  # the helper's traces, read back
        assert cache.hits + cache.new == sum(p.traces for p in found)
        monkeypatch.undo()
        # an error here mid-way: the helper is stopped and its exit line read, so the next
        # trial through the same server gets its own reply
        real = bc.predict_max_batch
        calls = {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected")
            return real(*args, **kwargs)

        bc.predict_max_batch = failing
        try:
            with using(TraceCache(tmp_path / "e")), pytest.raises(RuntimeError, match="injected"):
                predict_many(spec, bases, CPU, limit, exact=False, server=server)
        finally:
            bc.predict_max_batch = real
        trial = runner.run_trial(spec, bases[0], limit_bytes=limit)
        assert trial.status.value == "fits", trial.message
    finally:
        runner.shutdown()
    # no server (or no cache): this process traces every setting itself
    with using(TraceCache(tmp_path / "d")) as alone:
        again = predict_many(spec, bases, CPU, limit, exact=False, server=None)
    assert [p.batch_size for p in again] == serial and alone.hits == 0


def test_the_fork_server_preloads_only_the_frameworks_the_parent_loaded(monkeypatch):
    """A Lightning or HF trial forked from the server finds its framework imported already;
    the server imports only known frameworks, and only those the parent (the spec) loaded."""
    from autofit.trials import forkserver, runner

    script = ("import sys; from autofit.trials.forkserver import _preload; "
              "_preload('lightning.pytorch,wave,no_such_framework'); "
              "print('lightning.pytorch' in sys.modules, 'wave' in sys.modules)")
    pytest.importorskip("lightning")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]  # a framework yes, any other module no
    seen: list[tuple[str, ...]] = []

    class Recorded:
        def __init__(self, preload: tuple[str, ...] = ()) -> None:
            seen.append(preload)

        def alive(self) -> bool:
            return True

    monkeypatch.setattr(runner, "ForkServer", Recorded)
    monkeypatch.setattr(runner, "_SERVER", None)
    monkeypatch.setitem(sys.modules, "transformers", sys.modules.get("transformers", object()))
    runner._server()
    assert seen and "transformers" in seen[0]
    assert set(seen[0]) == {n for n in forkserver.FRAMEWORKS if n in sys.modules}


def test_the_last_trace_of_an_estimate_runs_ahead_in_a_forked_process(tmp_path: Path,
                                                                       monkeypatch):
    """After its first trace, ``estimate`` forks a process that traces the batch the search
    will most likely trace last (the step above the answer) while this one traces the
    second: the answer is the serial one, byte for byte, with 3 new traces in the cache. A
    wrong guess, or a forked process that fails, changes nothing but who traces."""
    import contextlib
    import os
    import threading

    import autofit
    import autofit.api as api
    import autofit.predict.trace as tr
    from autofit.predict.device_model import CPU

    spec = autofit.as_spec({**TINY, "model": {"_target_": "autofit.zoo.gpt", "n_layer": 2,
                                              "n_embd": 32, "n_head": 2, "vocab_size": 64,
                                              "block_size": 64},
                            "data": {"kind": "tokens", "vocab_size": 64, "seq_len": 64},
                            "memory": {"budget": "16MiB", "margin": 0.10}})
    if not tr._can_fork(spec, CPU):
        pytest.skip("no fork here (not Linux, one CPU, or a thread running)")
    forked: list[int] = []
    taken: list[int] = []
    fork, take = tr._Ahead.fork.__func__, tr._Ahead.take

    def recorded_fork(cls: Any, *args: Any) -> Any:
        ahead = fork(cls, *args)
        forked.append(ahead.pid if ahead is not None else 0)
        return ahead

    def recorded_take(self: Any, *args: Any) -> Any:
        est = take(self, *args)
        if est is not None:
            taken.append(est.candidate.batch_size)
        return est

    idle_cpu = tr.idle_cpu
    monkeypatch.setattr(tr, "idle_cpu", lambda: True)  # the mechanism, whatever the load
    monkeypatch.setattr(tr._Ahead, "fork", classmethod(recorded_fork))
    monkeypatch.setattr(tr._Ahead, "take", recorded_take)

    def answer(result: Any) -> dict[str, Any]:
        data = result.to_dict()
        data.pop("trace_time_s"), data.pop("trace_cache")
        return data

    with monkeypatch.context() as serial_only:
        serial_only.setattr(tr, "traced_ahead", lambda *a, **k: contextlib.nullcontext(False))
        serial = autofit.estimate(spec, cache=False)
    assert forked == [] and serial.max_batch.curve.points[-1][0] == serial.max_batch.batch_size + 1
    ahead = autofit.estimate(spec, cache=tmp_path / "c")
    assert len(forked) == 1 and taken == [serial.max_batch.batch_size + 1]
    assert answer(ahead) == answer(serial)
    assert ahead.cache["new"] == serial.max_batch.traces and ahead.cache["hits"] == 0
    # its answer record names the forked trace too: the same estimate again traces nothing
    warm = autofit.estimate(spec, cache=tmp_path / "c")
    assert warm.cache["hits"] == ahead.cache["new"] and warm.cache["new"] == 0
    assert answer(warm) == answer(serial) and len(forked) == 1
    # every forked process is reaped when the estimate returns
    with pytest.raises(ChildProcessError):
        os.waitpid(forked[0], os.WNOHANG)
    # a wrong guess: the forked process is killed and reaped, the answer is the same
    with monkeypatch.context() as wrong:
        wrong.setattr(api, "_likely_probe", lambda s, e, limit: e.candidate.with_batch(4000))
        assert answer(autofit.estimate(spec, cache=False)) == answer(serial)
    assert len(forked) == 2 and len(taken) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(forked[1], os.WNOHANG)
    # the forked process fails: the trace runs here, same answer
    parent, traced = os.getpid(), tr._traced

    def failing_there(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() != parent:
            raise RuntimeError("injected")
        return traced(*args, **kwargs)

    with monkeypatch.context() as failing:
        failing.setattr(tr, "_traced", failing_there)
        assert answer(autofit.estimate(spec, cache=False)) == answer(serial)
    assert len(forked) == 3 and len(taken) == 1
    # a CPU busy with other work: no fork (it would slow this process's own traces)
    assert idle_cpu("0.52 0.58 0.59 1/345 9001", cpus=2)
    assert not idle_cpu("3.10 2.58 2.59 2/345 9001", cpus=2)
    assert not idle_cpu("0.10 0.08 0.05 1/345 9001", cpus=1)
    assert not idle_cpu("unreadable", cpus=4)
    with monkeypatch.context() as busy:
        busy.setattr(tr, "idle_cpu", lambda: False)
        assert answer(autofit.estimate(spec, cache=False)) == answer(serial)
    assert len(forked) == 4 and forked[-1] == 0 and len(taken) == 1
    # another Python thread running: no fork (it could hold a lock the copy waits on)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert not tr._can_fork(spec, CPU)
    finally:
        stop.set()
        other.join()


def test_usable_cpus_follow_the_affinity_mask(monkeypatch):
    """One count of the CPUs this process may use (affinity, cgroup quota) for the forked
    trace, the idle-CPU check and the workers' thread split; not the machine's count."""
    import os

    from autofit import cluster
    from autofit.device import usable_cpus
    from autofit.predict import trace as tr

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert usable_cpus() == 1
    assert cluster._threads(1) == "1"
    assert not tr.idle_cpu("0.00 0.00 0.00 1/345 9001")  # only this process, on its one CPU
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    quota = {"text": "max 100000\n"}

    def cgroup(path, *args, **kwargs):  # the cgroup v2 CPU quota file, as the test sets it
        import io

        assert path == "/sys/fs/cgroup/cpu.max"
        return io.StringIO(quota["text"])

    monkeypatch.setattr("autofit.device.open", cgroup, raising=False)
    assert usable_cpus() == 4 and cluster._threads(2) == "2"
    quota["text"] = "200000 100000\n"  # a quota of 2 CPUs
    assert usable_cpus() == 2 and cluster._threads(2) == "1"
