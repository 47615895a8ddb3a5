"""Turn one tuned result (``results.json``) into cluster submission scripts and framework configs.

Everything here is a pure function of the results dict and the output spec, so
``autofit export results.json --format slurm`` regenerates any file without re-tuning and
two runs give identical bytes (no timestamps). Every file carries its provenance (spec hash,
device, torch version, memory margin, autofit version) so a stale config is recognisable.

Modules, by job:

- :mod:`~autofit.export.batch_plan`: micro-batch x accumulation x world size arithmetic;
- :mod:`~autofit.export.results_io`: results.json in and out (and tuned.yaml out);
- :mod:`~autofit.export.tuned`: tuned.yaml's ``autofit_tuned`` section, ``load_tuned``;
- :mod:`~autofit.export.launchers`: Slurm, LSF and torchrun scripts;
- :mod:`~autofit.export.overlays`: Lightning, HF and DeepSpeed configs;
- :mod:`~autofit.export.targets`: targets.yaml and per-target specs;
- :mod:`~autofit.export.provenance` and :mod:`~autofit.export.common`: shared headers/helpers.

This module holds the format registry and :func:`write_exports`, and re-exports the public
names of the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autofit.export.batch_plan import BatchPlan, plan_batch, plan_for_output, summarize_plan
from autofit.export.cluster_tune import TUNE_FILE_NAMES, render_lsf_tune, render_slurm_tune
from autofit.export.common import ExportError, slugify
from autofit.export.launchers import RDZV_PORT, render_lsf, render_slurm, render_torchrun
from autofit.export.overlays import (
    LIGHTNING_PRECISION,
    render_deepspeed,
    render_hf,
    render_lightning,
)
from autofit.export.provenance import Provenance, TunedValues
from autofit.export.results_io import (
    SCHEMA_VERSION,
    load_results,
    output_spec_of,
    results_plan,
    write_results,
)
from autofit.export.targets import (
    TARGET_CAVEAT,
    render_target_config,
    render_targets,
    target_config_files,
    target_slugs,
)
from autofit.export.tuned import (
    AUTOFIT_TUNED_KEY,
    TunedConfig,
    load_tuned,
    tuned_section,
    tuned_spec,
)
from autofit.files import write_atomic
from autofit.spec import SCRIPTS, OutputSpec

__all__ = [
    "AUTOFIT_TUNED_KEY",
    "FILE_NAMES",
    "FORMATS",
    "LIGHTNING_PRECISION",
    "RDZV_PORT",
    "SCHEMA_VERSION",
    "TARGET_CAVEAT",
    "TUNE_FILE_NAMES",
    "BatchPlan",
    "ExportError",
    "Provenance",
    "TunedConfig",
    "TunedValues",
    "load_results",
    "load_tuned",
    "output_spec_of",
    "plan_batch",
    "plan_for_output",
    "render_deepspeed",
    "render_hf",
    "render_lightning",
    "render_lsf",
    "render_lsf_tune",
    "render_slurm",
    "render_slurm_tune",
    "render_target_config",
    "render_targets",
    "render_torchrun",
    "results_plan",
    "slugify",
    "summarize_plan",
    "target_slugs",
    "tuned_section",
    "tuned_spec",
    "write_exports",
    "write_results",
]

FORMATS: tuple[str, ...] = ("slurm", "lsf", "torchrun", "lightning", "hf", "deepspeed", "targets")
"""Every export format, in the order files are written."""

FILE_NAMES: dict[str, str] = {
    "slurm": "submit_slurm.sh",
    "lsf": "submit_lsf.sh",
    "torchrun": "torchrun.sh",
    "lightning": "lightning.yaml",
    "hf": "hf_training_args.json",
    "deepspeed": "deepspeed.json",
    "targets": "targets.yaml",
}
"""Format -> file name inside the output directory (``targets`` also writes ``configs/*.yaml``)."""


def _check_formats(formats: Sequence[str]) -> list[str]:
    if isinstance(formats, str):
        formats = [formats]
    unknown = [f for f in formats if f not in FORMATS and f not in TUNE_FILE_NAMES]
    if unknown:
        raise ExportError(
            f"unknown export format {unknown[0]!r}; valid formats: "
            f"{', '.join((*FORMATS, *TUNE_FILE_NAMES))}")
    return list(dict.fromkeys(formats))


def write_exports(results: dict[str, Any], out_dir: Path, formats: Sequence[str] | None = None,
                  output: OutputSpec | None = None, storage: str | None = None) -> list[Path]:
    """Write the requested formats into ``out_dir``; returns the written paths in order.

    ``formats=None`` writes every format, except scripts missing from ``output.scripts``;
    ``slurm-tune`` / ``lsf-tune`` (arrays measuring each target GPU type, on the study
    ``storage``, default ``$AUTOFIT_STORAGE``) only when asked for.
    ``output`` defaults to the spec's output section stored in ``results`` (the one tuned.yaml's
    ``autofit_tuned`` plan uses). Every file is rendered before any is written, then written
    atomically (``autofit.files.write_atomic``); scripts are 0o755, the rest 0o644. Raises
    ``ExportError`` (nothing written) for an unknown format or an impossible world size.
    """
    output = output if output is not None else output_spec_of(results)
    if formats is None:
        chosen = [f for f in FORMATS if f not in SCRIPTS or f in output.scripts]
    else:
        chosen = _check_formats(formats)
    out_dir = Path(out_dir)
    plan = results_plan(results, output)
    renderers: dict[str, Callable[[], str]] = {
        "slurm": lambda: render_slurm(results, output, plan),
        "lsf": lambda: render_lsf(results, output, plan),
        "torchrun": lambda: render_torchrun(results, output, plan),
        "lightning": lambda: render_lightning(results, plan),
        "hf": lambda: render_hf(results, plan),
        "deepspeed": lambda: render_deepspeed(results, plan),
        "targets": lambda: render_targets(results, output),
        "slurm-tune": lambda: render_slurm_tune(results, output, storage),
        "lsf-tune": lambda: render_lsf_tune(results, output, storage),
    }
    rendered: list[tuple[Path, str]] = []
    for fmt in chosen:
        rendered.append((out_dir / {**FILE_NAMES, **TUNE_FILE_NAMES}[fmt], renderers[fmt]()))
        if fmt == "targets":
            rendered += [(out_dir / name, text) for name, text in target_config_files(results)]
    return [write_atomic(path, text, 0o755 if path.suffix == ".sh" else 0o644)
            for path, text in rendered]
