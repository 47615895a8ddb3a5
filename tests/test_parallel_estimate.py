"""``autofit estimate`` of a ``parallel.strategy`` list (issue 15): one rank of each listed
strategy, its per-rank peak and largest batch per rank, in the API, the text and --json."""

from __future__ import annotations

import json
import os

import yaml
from typer.testing import CliRunner

from autofit.api import estimate
from autofit.candidate import Candidate
from autofit.cli import app
from autofit.parallel import with_plan
from autofit.predict.batch_curve import predict_max_batch
from autofit.predict.device_model import CPU
from autofit.predict.trace import estimate as trace_estimate
from autofit.spec import spec_from_dict

os.environ.setdefault("OMP_NUM_THREADS", "1")

RAW = {"name": "gpt-list",
       "model": {"_target_": "autofit.zoo.gpt", "vocab_size": 128, "block_size": 32,
                 "n_layer": 2, "n_head": 2, "n_embd": 32},
       "data": {"kind": "tokens", "vocab_size": 128, "seq_len": 32}, "device": "cpu",
       "memory": {"budget": 1_200_000, "margin": 0.0},
       "parallel": {"strategy": ["none", "ddp", "fsdp"], "world_size": 4},
       "search": {"batch_size": {"min": 1, "max": 64}}}


def test_estimate_shows_each_listed_strategy(tmp_path, one_thread):
    """Each row is that strategy's own per-rank estimate and max batch; the main estimate
    stays the first strategy's; text and --json say the same; one strategy adds nothing."""
    result = estimate(RAW, batch_size=2, cache=False)
    rows = {r["strategy"]: r for r in result.per_strategy}
    assert [r["strategy"] for r in result.per_strategy] == ["none", "ddp", "fsdp"]
    spec = spec_from_dict(RAW)
    cand = Candidate(batch_size=2, input_size=32)
    for strategy, row in rows.items():
        one = with_plan(spec, strategy)
        assert row["peak_bytes"] == trace_estimate(one, cand, CPU).peak_bytes
        assert row["max_batch_size"] == predict_max_batch(
            one, cand.with_batch(1), CPU, 1_200_000).batch_size
        assert row["world_size"] == (1 if strategy == "none" else 4)
    assert rows["fsdp"]["peak_bytes"] < rows["none"]["peak_bytes"] < rows["ddp"]["peak_bytes"]
    assert rows["fsdp"]["max_batch_size"] > rows["ddp"]["max_batch_size"]
    assert result.estimate.peak_bytes == rows["none"]["peak_bytes"]

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(RAW))
    cli = CliRunner()
    data = json.loads(cli.invoke(app, ["estimate", str(path), "--batch-size", "2", "--json",
                                       "--no-cache"]).output)
    assert data["per_strategy"] == result.per_strategy
    text = cli.invoke(app, ["estimate", str(path), "--batch-size", "2", "--no-cache"])
    assert text.exit_code == 0
    lines = [ln for ln in text.output.splitlines() if "max batch per rank" in ln]
    assert len(lines) == 3
    for line, strategy in zip(lines, ("none", "ddp", "fsdp"), strict=True):
        assert line.split()[0] == strategy and line.endswith(str(rows[strategy]["max_batch_size"]))
    assert "fsdp  over 4 ranks" in text.output

    single = estimate({**RAW, "parallel": {"strategy": "fsdp", "world_size": 4}}, batch_size=2,
                      cache=False)
    assert single.per_strategy == [] and "per_strategy" not in single.to_dict()
    assert single.estimate.peak_bytes == rows["fsdp"]["peak_bytes"]
