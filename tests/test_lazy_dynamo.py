"""``autofit.predict.lazy_dynamo``: traces run without importing the compiler, and anything
that does need ``torch._dynamo`` gets the real package, whole.

Each check runs in a fresh interpreter: the test process may already have imported
``torch._dynamo`` (then ``defer()`` rightly does nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=240, cwd=ROOT, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TRACE_THEN_COMPILE = """
    import json, sys
    import torch
    from autofit.predict import lazy_dynamo

    def compiler_loaded():
        return "torch._dynamo.eval_frame" in sys.modules

    out = {"deferred": lazy_dynamo.defer()}
    out["again"] = lazy_dynamo.defer()  # already registered: nothing more to do
    from torch._subclasses import FakeTensorMode

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with FakeTensorMode(allow_non_fake_inputs=True):
        opt = torch.optim.AdamW(model.parameters())
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    out["after_fake_step"] = [lazy_dynamo.deferred(), compiler_loaded()]
    # a real step too (what an in-process trial runs)
    real = torch.nn.Linear(8, 2)
    ropt = torch.optim.SGD(real.parameters(), lr=0.1)
    real(torch.randn(4, 8)).sum().backward()
    ropt.step()
    out["after_real_step"] = [lazy_dynamo.deferred(), compiler_loaded()]
    wrapped = torch.optim.Optimizer.add_param_group.__wrapped__
    cached = vars(wrapped).get("__dynamo_disable")  # torch._compile's cache of disable(fn)
    real = [c.cell_contents for c in cached.__closure__ if isinstance(c.cell_contents, list)][0]
    out["cached_light"] = [cached.__wrapped__ is wrapped, len(real)]
    # now something needs the compiler: the real package loads, whole, in place
    same = sys.modules["torch._dynamo"]
    torch._dynamo.reset()
    out["completed"] = [lazy_dynamo.deferred(), compiler_loaded(),
                        sys.modules["torch._dynamo"] is same, torch._dynamo is same]
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")
    out["compiled"] = compiled(torch.ones(3)).tolist()
    # the light disable(fn) handed out before now runs through the real one
    ropt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))]})
    out["real_disable"] = [len(real), getattr(real[0], "_torchdynamo_disable", None)]
    print(json.dumps(out))
"""


def test_trace_runs_without_the_compiler_and_a_later_compile_gets_it_whole():
    out = run_python(TRACE_THEN_COMPILE)
    assert out["deferred"] is True and out["again"] is False
    # fake and real training steps (optimizer construction and step included) never
    # loaded the compiler: they used the eager stand-ins for disable() and graph_break()
    assert out["after_fake_step"] == [True, False]
    assert out["after_real_step"] == [True, False]
    assert out["cached_light"] == [True, 0]
    # torch._dynamo.reset() ran the real __init__ into the same module object
    assert out["completed"] == [False, True, True, True]
    # the stand-in cached by torch._compile built the real disable() on its next call
    assert out["real_disable"] == [1, True]
    assert out["compiled"] == [3.0, 3.0, 3.0]


def test_distributed_and_submodules_read_as_attributes_load_the_package():
    """``init_process_group`` reads ``torch._dynamo.trace_rules`` when ``torch._dynamo`` is in
    ``sys.modules``, and DDP's constructor ``torch._dynamo.utils``: in a process that traced
    first, a per-rank estimate (a fake process group) gets the real package, not an error."""
    out = run_python("""
        import json, sys
        import autofit
        from autofit.predict import lazy_dynamo

        raw = {"name": "gpt-ranks",
               "model": {"_target_": "autofit.zoo.gpt", "vocab_size": 128, "block_size": 32,
                         "n_layer": 2, "n_head": 2, "n_embd": 32},
               "data": {"kind": "tokens", "vocab_size": 128, "seq_len": 32}, "device": "cpu",
               "memory": {"budget": 1_200_000, "margin": 0.0},
               "search": {"batch_size": {"min": 1, "max": 64}}}
        single = autofit.estimate(raw, batch_size=2, cache=False)  # a trace: deferred
        before = lazy_dynamo.deferred()
        peaks = {}
        for strategy in ("fsdp", "ddp"):
            one = {**raw, "parallel": {"strategy": strategy, "world_size": 2}}
            peaks[strategy] = autofit.estimate(one, batch_size=2, cache=False).estimate.peak_bytes
        import torch
        print(json.dumps({"before": before, "after": lazy_dynamo.deferred(),
                          "single": single.estimate.peak_bytes, **peaks,
                          "trace_rules": "torch._dynamo.trace_rules" in sys.modules}))
    """)
    assert out["before"] is True and out["after"] is False and out["trace_rules"] is True
    assert 0 < out["fsdp"] < out["single"] < out["ddp"]


def test_nothing_changes_when_dynamo_is_imported_or_switched_off():
    out = run_python("""
        import json, sys
        import torch, torch._dynamo
        from autofit.predict import lazy_dynamo
        print(json.dumps({"deferred": lazy_dynamo.defer(), "is_deferred": lazy_dynamo.deferred()}))
    """)
    assert out == {"deferred": False, "is_deferred": False}
    out = run_python("""
        import json, sys
        import autofit.predict.trace  # defers on import unless switched off
        print(json.dumps({"loaded": "torch._dynamo.eval_frame" in sys.modules,
                          "registered": "torch._dynamo" in sys.modules}))
    """, AUTOFIT_DEFER_DYNAMO="0")
    assert out == {"loaded": False, "registered": False}


@pytest.mark.parametrize("config", ["quickstart_cpu.yaml"])
def test_estimate_is_the_same_with_the_compiler_deferred_or_not(config, tmp_path):
    """The command's whole answer (breakdown, batch curve, max batch) is unchanged."""
    outputs = {}
    for defer in ("1", "0"):
        cache = tmp_path / f"cache{defer}"
        proc = subprocess.run(
            [sys.executable, "-m", "autofit.cli", "estimate", str(ROOT / "configs" / config),
             "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={**os.environ, "AUTOFIT_DEFER_DYNAMO": defer, "AUTOFIT_CACHE_DIR": str(cache)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        answer = json.loads(proc.stdout)
        answer.pop("trace_time_s")  # wall time
        answer["trace_cache"].pop("dir")
        outputs[defer] = answer
    assert outputs["1"]["max_batch_size"] == 42
    assert outputs["1"] == outputs["0"]
