"""What a training script reads from a tune: ``tuned.yaml`` and its ``autofit_tuned`` section.

``tuned.yaml`` is the experiment spec pinned to the tuned configuration (:func:`tuned_spec`,
still a valid spec) plus one top-level mapping, ``autofit_tuned`` (:func:`tuned_section`),
holding the values a training run uses: the tuned micro-batch, the gradient accumulation and
world size of the batch plan, precision, checkpoint segments, input size. The same section
feeds the ``AUTOFIT_*`` environment variables of the generated scripts (:func:`tuned_env`),
so the scripts and tuned.yaml cannot disagree. :func:`load_tuned` reads it back as a typed
:class:`TunedConfig`, with one error line per problem.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from autofit.export.batch_plan import BatchPlan
from autofit.export.common import ExportError, read_text
from autofit.export.provenance import TunedValues
from autofit.spec import PARALLEL_STRATEGIES, PRECISIONS, ParallelSpec

AUTOFIT_TUNED_KEY = "autofit_tuned"
"""Top-level key of tuned.yaml holding the tuned values; the spec loader ignores it."""

TUNED_YAML = "tuned.yaml"
"""File name of the pinned spec in the output directory."""

ENV_VARS: dict[str, str] = {
    "AUTOFIT_MICRO_BATCH_SIZE": "micro_batch_size",
    "AUTOFIT_GRAD_ACCUM_STEPS": "gradient_accumulation_steps",
    "AUTOFIT_GLOBAL_BATCH_SIZE": "global_batch_size",
    "AUTOFIT_PRECISION": "precision",
    "AUTOFIT_CHECKPOINT_SEGMENTS": "checkpoint_segments",
    "AUTOFIT_INPUT_SIZE": "input_size",
    "AUTOFIT_SPEC_HASH": "spec_hash",
}
"""Environment variable of the generated scripts -> ``autofit_tuned`` key it holds."""

PARALLEL_ENV_VAR = "AUTOFIT_PARALLEL_STRATEGY"
"""Exported by the generated scripts when the tune was for ddp or fsdp (read it with
``autofit.parallel.env_plan``, which pairs it with torchrun's ``WORLD_SIZE``)."""

_AUTOCAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def parallel_of(results: dict[str, Any]) -> ParallelSpec:
    """The ``parallel`` section of the spec stored in the results (``results["spec"]``), read by
    the spec loader; results without one are single-process (strategy none). Of a list, the
    strategy is the winner's (``results["best"]["strategy"]``), else the first listed.
    ``ExportError`` when the section does not validate."""
    from autofit.spec import _load_parallel, _Problems

    raw = results.get("spec")
    problems = _Problems("results.json:spec", {})
    parallel = _load_parallel(problems, raw if isinstance(raw, dict) else {})
    if problems.items:
        raise ExportError(*problems.sorted_items())
    won = (results.get("best") or {}).get("strategy")
    if won and won in parallel.strategies:  # a list searched: the winner's
        parallel = replace(parallel, strategies=(str(won),))
    return parallel


def tuned_spec(raw: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the raw spec with the search pinned to one tuned configuration.

    ``search.batch_size`` becomes ``{min: b, max: b}``; precision and checkpoint segments
    become one-element lists. The input size is pinned (``search.input_size: [s]``) when the
    spec searched it or the data is images/tokens; ``data.size`` (when an int) or
    ``data.seq_len`` follows it. Every other key is kept as written, except an
    ``autofit_tuned`` section (from a tuned.yaml used as a spec), which is dropped.
    """
    spec = copy.deepcopy(raw)
    spec.pop(AUTOFIT_TUNED_KEY, None)
    tuned = TunedValues.from_dict(best)
    search = spec.get("search")
    if not isinstance(search, dict):
        search = {}
    search["batch_size"] = {"min": tuned.batch_size, "max": tuned.batch_size}
    search["precision"] = [tuned.precision]
    search["checkpoint_segments"] = [tuned.checkpoint_segments]
    data = spec.get("data")
    kind = (data.get("kind", "image") if isinstance(data, dict) else None)
    if tuned.input_size >= 1 and ("input_size" in search or kind in ("image", "tokens")):
        search["input_size"] = [tuned.input_size]
        if isinstance(data, dict) and kind == "image" and isinstance(data.get("size"), int):
            data["size"] = tuned.input_size
        elif isinstance(data, dict) and kind == "tokens":
            data["seq_len"] = tuned.input_size
    spec["search"] = search
    won = best.get("strategy")
    if won and isinstance(spec.get("parallel"), dict):  # a parallel.strategy list: the winner
        spec["parallel"]["strategy"] = won
    return spec


def tuned_section(results: dict[str, Any], plan: BatchPlan) -> dict[str, Any]:
    """The ``autofit_tuned`` mapping for ``results["best"]`` run with ``plan``.

    Keys and order are the fields of :class:`TunedConfig` (without ``spec``).
    """
    tuned = TunedValues.from_dict(results["best"])
    return {
        "max_batch_size": tuned.batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "global_batch_size": plan.global_batch_size,
        "world_size": plan.world_size,
        "precision": tuned.precision,
        "checkpoint_segments": tuned.checkpoint_segments,
        "input_size": tuned.input_size,
        "verified": tuned.verified,
        "spec_hash": str(results.get("spec_hash", "unknown")),
        "step": str((results.get("step") or {}).get("kind", "autofit")),
        "strategy": parallel_of(results).strategy,
    }


def tuned_env(section: dict[str, Any]) -> dict[str, str]:
    """The scripts' ``AUTOFIT_*`` variables from an ``autofit_tuned`` section, in order.

    ``AUTOFIT_TUNED_YAML`` is relative to the directory the job starts in, like the paths in
    ``output.train_command`` (Slurm runs a copy of the script, so its own directory is no guide).
    """
    env = {name: str(section[key]) for name, key in ENV_VARS.items()}
    env["AUTOFIT_TUNED_YAML"] = TUNED_YAML
    if section.get("strategy", "none") != "none":  # single-process scripts stay as they were
        env[PARALLEL_ENV_VAR] = str(section["strategy"])
    return env


@dataclass(frozen=True)
class TunedConfig:
    """A ``tuned.yaml`` as a training script uses it (see :func:`load_tuned`)."""

    max_batch_size: int
    """Largest micro-batch (samples per GPU) that ran and fit during the tune."""
    micro_batch_size: int
    """Samples per forward/backward on one GPU: what the data loader yields."""
    gradient_accumulation_steps: int
    """Micro-batches accumulated before each optimizer step."""
    global_batch_size: int
    """Samples per optimizer step over all GPUs: micro x accumulation x world."""
    world_size: int
    """GPUs (processes) the plan is for: nodes x GPUs per node."""
    precision: str
    """fp32 | fp16 (autocast + GradScaler) | bf16 (autocast)."""
    checkpoint_segments: int
    """Activation-checkpointing segments (0 = none)."""
    input_size: int
    """Image side in pixels or sequence length in tokens; 0 where the data has no size axis."""
    verified: bool
    """True when a real run at the tuned batch fitted; False = predicted only."""
    spec_hash: str
    """Hash of the tuned spec (also ``AUTOFIT_SPEC_HASH`` in the scripts)."""
    spec: dict[str, Any] = field(hash=False)
    step: str = "autofit"
    """The training step the batch was proven with (autofit, hf, hf_trainer, lightning,
    lightning_manual, custom, custom_forward); files written before it existed say autofit."""
    strategy: str = "none"
    """none | ddp | fsdp: the data parallelism the per-rank memory was tuned for, over
    ``world_size`` ranks (``parallel.strategy`` of the spec; of a list, the winner's); files
    written before it existed say none."""
    """The pinned spec (tuned.yaml without ``autofit_tuned``): ``spec_from_dict(spec)``."""

    @property
    def autocast_dtype(self) -> str | None:
        """``torch`` dtype name for ``torch.autocast``: None (fp32), "float16" or "bfloat16"."""
        return _AUTOCAST_DTYPES.get(self.precision)

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 needs a ``torch.amp.GradScaler``; fp32 and bf16 do not."""
        return self.precision == "fp16"

    @classmethod
    def from_section(cls, section: dict[str, Any], spec: dict[str, Any],
                     source: str = "tuned.yaml") -> TunedConfig:
        """Validate an ``autofit_tuned`` mapping; ``ExportError`` with one line per problem."""
        problems = []
        values: dict[str, Any] = {}
        for name in (f.name for f in fields(cls) if f.name not in ("spec", "step", "strategy")):
            where = f"{source}: {AUTOFIT_TUNED_KEY}.{name}"
            if name not in section:
                problems.append(f"{where}: missing")
                continue
            value = section[name]
            why = _field_problem(name, value)
            if why:
                problems.append(f"{where}: {why}, got {value!r}")
            values[name] = value
        strategy = section.get("strategy", "none")
        if strategy not in PARALLEL_STRATEGIES:
            problems.append(f"{source}: {AUTOFIT_TUNED_KEY}.strategy: must be one of "
                            f"{', '.join(PARALLEL_STRATEGIES)}, got {strategy!r}")
        if not problems:
            problems = _consistency_problems(values, f"{source}: {AUTOFIT_TUNED_KEY}")
        if problems:
            raise ExportError(*problems)
        return cls(**values, spec=spec, step=str(section.get("step", "autofit")),
                   strategy=strategy)


_COUNTS = {"max_batch_size": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
           "global_batch_size": 1, "world_size": 1, "checkpoint_segments": 0, "input_size": 0}


def _field_problem(name: str, value: Any) -> str:
    """Why one ``autofit_tuned`` value is ill-typed ("" if it is fine)."""
    if name in _COUNTS:
        minimum = _COUNTS[name]
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        return "" if ok else f"must be an integer >= {minimum}"
    if name == "precision":
        return "" if value in PRECISIONS else f"must be one of {', '.join(PRECISIONS)}"
    if name == "verified":
        return "" if isinstance(value, bool) else "must be true or false"
    return "" if isinstance(value, str) and value else "must be a non-empty string"


def _consistency_problems(values: dict[str, Any], where: str) -> list[str]:
    micro, accumulation, world = (values["micro_batch_size"], values["gradient_accumulation_steps"],
                                  values["world_size"])
    problems = []
    if micro * accumulation * world != values["global_batch_size"]:
        problems.append(f"{where}: global_batch_size {values['global_batch_size']} is not "
                        f"micro_batch_size x gradient_accumulation_steps x world_size = "
                        f"{micro} x {accumulation} x {world} = {micro * accumulation * world}")
    if micro > values["max_batch_size"]:
        problems.append(f"{where}: micro_batch_size {micro} is larger than max_batch_size "
                        f"{values['max_batch_size']}, the largest batch that fitted")
    return problems


def load_tuned(path: str | Path) -> TunedConfig:
    """Read a ``tuned.yaml`` written by ``autofit tune``.

    Raises ``ExportError`` (an ``AutofitError``) with one line per problem: a missing or
    unreadable file, invalid YAML, a missing ``autofit_tuned`` section or ill-typed values in it.
    """
    path = Path(path)
    text = read_text(path, "a tuned.yaml file")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ExportError(f"{path}{line}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a YAML mapping, got {type(raw).__name__}")
    section = raw.get(AUTOFIT_TUNED_KEY)
    if section is None:
        raise ExportError(f"{path}: missing the {AUTOFIT_TUNED_KEY!r} section (a tuned.yaml "
                          f"from an older autofit: re-run `autofit tune` to regenerate it)")
    if not isinstance(section, dict):
        raise ExportError(f"{path}: {AUTOFIT_TUNED_KEY!r} must be a mapping, got "
                          f"{type(section).__name__}")
    spec = {key: value for key, value in raw.items() if key != AUTOFIT_TUNED_KEY}
    return TunedConfig.from_section(section, spec, source=str(path))
