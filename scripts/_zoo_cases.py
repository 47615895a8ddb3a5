"""Shared small zoo cases for the benchmark scripts (``scripts/bench_*.py``).

Each case is a plain spec dict (what ``autofit.spec.spec_from_dict`` takes), small enough to
run real training steps on a 2-core CPU in well under a second at batch 4 (fp32). Every zoo
model appears once: mlp, resnet, vit, gpt in ``CASES`` (the rows every benchmark runs), and
the workspace-heavy ones in ``WORKSPACE_CASES`` (``lstm``, ``gru_s2s``, ``audio``, ``resnet18``:
extra rows of ``bench_estimate``'s probe-calibration table).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
from typing import Any

CASES: dict[str, dict[str, Any]] = {
    "mlp": {
        "name": "mlp",
        "model": {"_target_": "autofit.zoo.mlp", "in_features": 784, "hidden": 512, "depth": 4,
                  "out_features": 10},
        "data": {"kind": "tensor", "shape": [784], "num_classes": 10},
        "loss": "cross_entropy",
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0e-3},
    },
    "resnet": {
        "name": "resnet18-w16",
        "model": {"_target_": "autofit.zoo.resnet", "depth": 18, "width": 16, "num_classes": 10},
        "data": {"kind": "image", "channels": 3, "size": 32, "num_classes": 10},
        "loss": "cross_entropy",
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
    },
    "vit": {
        "name": "vit-d96",
        "model": {"_target_": "autofit.zoo.vit", "image_size": 32, "patch_size": 4, "dim": 96,
                  "depth": 4, "heads": 3, "num_classes": 10},
        "data": {"kind": "image", "channels": 3, "size": 32, "num_classes": 10},
        "loss": "cross_entropy",
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0e-3},
    },
    "gpt": {
        "name": "gpt-l4-e128",
        "model": {"_target_": "autofit.zoo.gpt", "vocab_size": 512, "block_size": 128,
                  "n_layer": 4, "n_head": 4, "n_embd": 128},
        "data": {"kind": "tokens", "vocab_size": 512, "seq_len": 128},
        "loss": "cross_entropy",
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 3.0e-4},
    },
}

WORKSPACE_CASES: dict[str, dict[str, Any]] = {
    "lstm": {  # CPU LSTM: aten.mkldnn_rnn_layer's fake kernel returns an empty workspace
        "name": "lstm-lm-2x128",
        "model": {"_target_": "autofit.zoo.lstm_lm", "vocab_size": 2000, "dim": 128,
                  "num_layers": 2},
        "data": {"kind": "tokens", "vocab_size": 2000, "seq_len": 64},
        "loss": "cross_entropy",
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0e-3},
    },
    "gru_s2s": {  # encoder (bidirectional) + decoder GRU, teacher forcing, the model's loss
        "name": "gru-seq2seq-2x128",
        "model": {"_target_": "autofit.zoo.gru_seq2seq", "vocab_size": 2000, "dim": 128,
                  "num_layers": 2, "bidirectional": True},
        "data": {"kind": "tokens", "vocab_size": 2000, "seq_len": 32,
                 "batch": {"src": "tokens", "tgt": "tokens"}},
        "loss": "model",
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0e-3},
    },
    "resnet18": {  # the zoo's ResNet-18 CIFAR at full width: oneDNN convolution scratch
        "name": "resnet18-cifar",
        "model": {"_target_": "autofit.zoo.resnet", "depth": 18, "width": 64, "num_classes": 10},
        "data": {"kind": "image", "channels": 3, "size": 32, "num_classes": 10},
        "loss": "cross_entropy",
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
    },
    "audio": {  # raw waveform (B, 1, samples): input size = samples (1 s at 16 kHz)
        "name": "audio-m5-w32",
        "model": {"_target_": "autofit.zoo.audio_conv1d", "num_classes": 35, "width": 32},
        "data": {"kind": "tokens", "vocab_size": 2, "seq_len": 16000,
                 "batch": [{"kind": "normal", "shape": [1, "input_size"]}, {"classes": 35}]},
        "loss": "cross_entropy",
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0e-3},
    },
}
"""Workspace-heavy zoo models. ``audio`` uses ``data.kind: tokens`` only for its size axis
(``seq_len`` = samples, searched by ``search.input_size``); its batch is a float waveform
and a class id per sample."""

GPT_TINY: dict[str, Any] = {
    "name": "gpt-l2-e64",
    "model": {"_target_": "autofit.zoo.gpt", "vocab_size": 256, "block_size": 128,
              "n_layer": 2, "n_head": 2, "n_embd": 64},
    "data": {"kind": "tokens", "vocab_size": 256, "seq_len": 128},
    "loss": "cross_entropy",
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 3.0e-4},
}
"""The smallest GPT, for the slow 3-axis (size x precision x segments) search."""


MARGIN = 0.10
BUDGETS: dict[str, str] = {
    "mlp": "23.8MiB",  # peak is params + grads + AdamW state + ~3 KiB per sample
    "resnet": "64MiB",
    "vit": "75MiB",
    "gpt": "167MiB",
}
"""One emulated device per zoo case, shared by every benchmark so their figures compare."""


def case_names() -> list[str]:
    return list(CASES)


def case(name: str) -> dict[str, Any]:
    """A deep copy of one case's spec dict (safe to modify)."""
    if name == "gpt_tiny":
        return copy.deepcopy(GPT_TINY)
    if name in WORKSPACE_CASES:
        return copy.deepcopy(WORKSPACE_CASES[name])
    return copy.deepcopy(CASES[name])


def with_budget(raw: dict[str, Any], budget: str | int | None = None, *, margin: float = 0.10,
                device: str = "cpu", search: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy of ``raw`` with ``device``, ``memory: {budget, margin}`` and ``search`` overrides.

    ``budget`` is a size string (``"64MiB"``) or bytes; None leaves the memory section out
    (budget ``auto``).
    """
    out = copy.deepcopy(raw)
    out["device"] = device
    if budget is not None:
        out["memory"] = {"budget": budget if isinstance(budget, str) else f"{int(budget)}B",
                         "margin": margin}
    if search:
        merged = dict(out.get("search", {}) or {})
        merged.update(copy.deepcopy(search))
        out["search"] = merged
    return out


def spec_of(name: str, budget: str | int | None = None, *, margin: float = 0.10,
            device: str = "cpu", search: dict[str, Any] | None = None) -> Any:
    """``spec_from_dict`` of a named case with budget/margin/device/search set."""
    from autofit.spec import spec_from_dict

    return spec_from_dict(with_budget(case(name), budget, margin=margin, device=device,
                                      search=search), f"<{name}>")


def machine_line() -> str:
    """One line naming the machine: platform, CPUs, Python and torch versions, load average.

    The load average shows whether other work shared the CPUs while the timings were taken.
    """
    import torch

    cpus = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cpus
    try:
        load = "load avg " + "/".join(f"{v:.2f}" for v in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        load = "load avg n/a"
    return (f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
            f"{cpus} CPUs ({usable} usable, torch threads {torch.get_num_threads()}) | "
            f"Python {sys.version.split()[0]} | torch {torch.__version__} | {load}")


def fmt_mib(nbytes: float | int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**20:.2f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-style markdown table (also readable as plain text)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w)
                                       for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    t = text.replace(",", "").replace("%", "").replace("+", "").replace("x", "").strip()
    try:
        float(t)
    except ValueError:
        return False
    return True


class Report:
    """Collects printed lines so ``--markdown PATH`` can write the same text to a file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def write(self, path: str | None) -> None:
        if path:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write("\n".join(self.lines) + "\n")
            print(f"(written to {path})", flush=True)
