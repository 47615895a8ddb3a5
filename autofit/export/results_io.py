"""results.json in and out: write it (with tuned.yaml) after a tune, read and validate it back.

``write_results`` stamps ``schema_version`` (:data:`SCHEMA_VERSION`) into results.json and
writes tuned.yaml: a header comment, the ``autofit_tuned`` section and the pinned spec (see
:mod:`autofit.export.tuned`). ``load_results`` accepts files without ``schema_version``
(version 1) and refuses newer ones with a one-line error. ``results_plan`` is the batch plan
of a results dict: scripts, framework configs and tuned.yaml all take theirs from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autofit.errors import SpecError
from autofit.export.batch_plan import BatchPlan, plan_for_output
from autofit.export.common import ExportError, comment, dump_yaml, read_text
from autofit.export.provenance import Provenance, TunedValues
from autofit.export.tuned import AUTOFIT_TUNED_KEY, TUNED_YAML, tuned_section, tuned_spec
from autofit.files import write_atomic
from autofit.spec import PRECISIONS, OutputSpec, spec_from_dict

__all__ = [
    "SCHEMA_VERSION",
    "Provenance",
    "TunedValues",
    "load_results",
    "output_spec_of",
    "results_plan",
    "tuned_yaml_text",
    "write_results",
]

SCHEMA_VERSION = 2
"""Layout version written into results.json; files without the field are version 1."""

RESULTS_JSON = "results.json"

_REQUIRED_KEYS: tuple[tuple[str, ...], ...] = (
    ("spec",),
    ("spec_hash",),
    ("device",),
    ("device", "name"),
    ("device", "torch"),
    ("margin",),
    ("best",),
    ("best", "batch_size"),
    ("best", "precision"),
)


def _check_schema_version(path: Path, results: dict[str, Any]) -> None:
    version = results.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"{path}: schema_version must be an integer >= 1, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ExportError(
            f"{path}: schema_version {version} is newer than this autofit reads "
            f"(up to {SCHEMA_VERSION}): upgrade autofit or re-run `autofit tune` with this version")


def _check_required_keys(path: Path, results: dict[str, Any]) -> None:
    for key_path in _REQUIRED_KEYS:
        node: Any = results
        for depth, key in enumerate(key_path):
            if not isinstance(node, dict):
                parent = ".".join(key_path[:depth])
                raise ExportError(f"{path}: {parent!r} must be an object, got {node!r}")
            if key not in node:
                raise ExportError(f"{path}: missing key {'.'.join(key_path)!r}")
            node = node[key]


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` written by ``autofit tune``; one-line ``ExportError`` if unusable.

    The dict is returned as stored (a version-1 file gets no ``schema_version`` added).
    """
    path = Path(path)
    text = read_text(path, "a results.json file")
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(results, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(results).__name__}")
    _check_schema_version(path, results)
    _check_required_keys(path, results)
    batch = results["best"]["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ExportError(f"{path}: best.batch_size must be an integer >= 1, got {batch!r}")
    precision = results["best"]["precision"]
    if precision not in PRECISIONS:
        raise ExportError(
            f"{path}: best.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    targets = results.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise ExportError(f"{path}: 'targets' must be a list of objects")
    return results


def output_spec_of(results: dict[str, Any]) -> OutputSpec:
    """The ``output`` section of the spec stored in the results; defaults if it does not validate.
    A ddp/fsdp spec's ``parallel.world_size`` sets the nodes x GPUs per node launched
    (``launchers.launch_output``)."""
    from autofit.export.launchers import launch_output

    try:
        output = spec_from_dict(results.get("spec"), source="results.json:spec").output
    except SpecError:
        return OutputSpec()
    return launch_output(results, output)


def results_plan(results: dict[str, Any], output: OutputSpec | None = None) -> BatchPlan:
    """The batch plan of the tuned micro-batch for ``output`` (default: the stored spec's)."""
    output = output if output is not None else output_spec_of(results)
    return plan_for_output(TunedValues.from_dict(results["best"]).batch_size, output)


def tuned_yaml_text(results: dict[str, Any]) -> str:
    """tuned.yaml: header comment, ``autofit_tuned`` (the plan of the stored output section),
    then the spec pinned to ``results["best"]``."""
    best = results["best"]
    tuned = TunedValues.from_dict(best)
    device = results.get("device") or {}
    header = comment([
        f"Tuned by autofit {results.get('autofit_version')} on {device.get('name')} "
        f"(torch {device.get('torch')}), spec hash {results.get('spec_hash')}, "
        f"margin {results.get('margin')}.",
        f"best: batch {tuned.batch_size}, input size {tuned.input_size}, {tuned.precision}, "
        f"checkpoint segments {tuned.checkpoint_segments}; peak {best.get('peak_bytes')} bytes; "
        f"verified: {best.get('verified')}",
        f"{AUTOFIT_TUNED_KEY}: what a training script runs (read it with "
        "autofit.load_tuned); the rest is the spec pinned to the tuned values.",
    ])
    spec = tuned_spec(results["spec"], best)
    body = {AUTOFIT_TUNED_KEY: tuned_section(results, results_plan(results)), **spec}
    return header + dump_yaml(body)


def write_results(out_dir: str | Path, results: dict[str, Any]) -> list[Path]:
    """Write results.json (with ``schema_version``) and, when there is a best, tuned.yaml.

    Both atomically; returns the written paths.
    """
    out = Path(out_dir)
    data = {"schema_version": SCHEMA_VERSION, **results}
    text = json.dumps(data, indent=2, default=str) + "\n"
    written = [write_atomic(out / RESULTS_JSON, text)]
    if data.get("best"):
        written.append(write_atomic(out / TUNED_YAML, tuned_yaml_text(data)))
    return written
