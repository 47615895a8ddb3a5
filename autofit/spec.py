"""The experiment spec: YAML in, frozen validated dataclasses out.

``load_spec`` collects *every* problem before raising, one line each, naming the YAML path,
the bad value and the file line (``exp.yaml:12: search.batch_size.min: must be >= 1, got 0``).
Unknown keys are errors with a "did you mean" hint. In the same pass ``load_spec`` resolves
every import path (model, nested ``_target_`` in model kwargs, optimizer, loss, step) with
``importlib.util.find_spec`` and attribute lookup, calling nothing, so a misspelled key and an
unimportable target are reported together (``spec_from_dict`` does this only when asked:
``check_imports=True``). The spec keeps its YAML line map so that build errors can name the
file line too (``ExperimentSpec.where``). The spec is the interface: components never see
these objects' raw dicts, the builders map spec -> components.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib
import importlib.util
import json
import pkgutil
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from autofit.choices import PRECISION_ALIASES, Objective, Precision, Strategy
from autofit.errors import SpecError
from autofit.units import parse_bytes

PRECISIONS: tuple[str, ...] = Precision.values()
OBJECTIVES: tuple[str, ...] = Objective.values()
STRATEGIES: tuple[str, ...] = Strategy.values()
CPU_LIMITS: tuple[str, ...] = ("budget", "rlimit")
SCRIPTS: tuple[str, ...] = ("slurm", "lsf", "torchrun")
BUILTIN_LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "model")
DATA_KINDS: tuple[str, ...] = ("image", "tokens", "tensor")
BUILTIN_STEPS: tuple[str, ...] = ("autofit", "hf_trainer")
"""Named steps for ``step:``; anything else is an import path (Lightning is found by its class)."""
FIELD_KINDS: tuple[str, ...] = ("tokens", "ones", "zeros", "classes", "normal", "uniform", "image")
"""What a structured batch field holds (``data.batch``)."""
FIELD_DTYPES: tuple[str, ...] = ("int64", "int32", "bool", "float32", "float16", "bfloat16")
SIZE_AXIS_NAMES: tuple[str, ...] = ("input_size", "seq_len")
"""Names a field's shape may use for the input-size axis (searched by ``search.input_size``)."""
TARGET_FIELD_NAMES: tuple[str, ...] = ("labels", "label", "target", "targets", "y")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    target: str
    """Import path of a class or function returning an ``nn.Module`` (``pkg.mod.Name``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments; the string ``"${input_size}"`` is replaced by the trial's input size."""
    blocks: str | tuple[str, ...] | None = None
    """Attribute path of the ``nn.ModuleList`` / ``nn.Sequential`` of blocks split into
    checkpoint segments, or several named stages in order (``[layer1, layer2]``); None = auto."""


@dataclass(frozen=True, kw_only=True)
class BatchField:
    """One field of a structured batch: what it holds and its per-sample shape."""

    name: str
    kind: str
    """One of FIELD_KINDS: token ids, ones/zeros (masks), class ids, normal/uniform floats, image."""
    shape: tuple[int | str, ...] | None = None
    """Per-sample shape; ``"input_size"`` marks the searched axis. None: the kind's default
    (tokens/ones/zeros: ``(input_size,)``, image: ``(channels, H, W)``, classes per sample: ``()``)."""
    dtype: str | None = None
    """Torch dtype name; None: int64 for ids and masks, float32 for floats."""
    high: int | None = None
    """Exclusive upper bound of token/class ids (tokens: ``data.vocab_size``)."""


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    kind: Literal["image", "tokens", "tensor"]
    """Synthetic batches: image (B, C, H, W) float, tokens (B, L) long, tensor (B, *shape)."""
    channels: int = 3
    size: tuple[int, int] = (32, 32)
    """Image height and width in pixels."""
    num_classes: int | None = None
    vocab_size: int | None = None
    seq_len: int = 0
    """Token sequence length."""
    shape: tuple[int, ...] = ()
    """Per-sample shape for kind=tensor."""
    batch: tuple[BatchField, ...] = ()
    """Structured batch fields; empty means the single-tensor shorthand of ``kind``."""
    batch_form: Literal["tensor", "dict", "tuple"] = "tensor"
    """dict: ``model(**batch)``; tuple: ``(inputs..., target)``; tensor: one input ``x``."""
    target: str | None = None
    """Field given to ``loss`` (not the model) when the loss is not ``model``."""


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    target: str = "torch.optim.AdamW"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class MemorySpec:
    budget_bytes: int | None = None
    """Device capacity to plan for; None means "auto" (the device's own capacity)."""
    budget_text: str = "auto"
    """The budget as the user wrote it, kept so output can say "24GB (decimal)"."""
    margin: float = 0.10
    """Fraction of the budget kept free: configurations must peak under budget * (1 - margin)."""
    cpu_limit: Literal["budget", "rlimit"] = "budget"
    """CPU trials: 'budget' counts live tensor bytes (deterministic), 'rlimit' uses RLIMIT_AS."""


@dataclass(frozen=True, kw_only=True)
class BatchRange:
    min: int = 1
    max: int = 65536
    multiple_of: int = 1
    """Only batch sizes divisible by this are tried (e.g. 8 for tensor cores)."""

    @property
    def lowest(self) -> int:
        """Smallest allowed batch: ``min`` rounded up to a multiple of ``multiple_of``."""
        return -(-self.min // self.multiple_of) * self.multiple_of

    @property
    def highest(self) -> int:
        """Largest allowed batch: ``max`` rounded down to a multiple of ``multiple_of``."""
        return self.max // self.multiple_of * self.multiple_of


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    batch_size: BatchRange = field(default_factory=BatchRange)
    input_sizes: tuple[int, ...] = ()
    """Image side in pixels or sequence length; empty = the data section's size only."""
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    checkpoint_segments: tuple[int, ...] = (0,)
    """0 = no activation checkpointing; K = split the blocks into K checkpointed segments."""
    objective: Objective = Objective.MAX_BATCH
    strategy: Strategy = Strategy.AUTO
    steps_per_trial: int = 3
    """Timed steps per trial, after the warm-up steps."""
    warmup_steps: int = 2
    """Untimed full steps first; optimizer state appears at the first optimizer.step()."""
    verify_steps: int = 10
    """Steps of the final verification run of the winner."""
    timeout_s: float = 600.0
    """Wall-clock limit of one trial, process start included."""
    max_trials: int = 0
    """Cap on real trials; 0 = automatic."""
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    name: str
    memory_bytes: int
    memory_text: str
    bf16: bool = True
    """Whether the target GPU supports bf16 (False for V100/T4)."""
    partition: str | None = None
    """Slurm partition (LSF queue) holding this GPU type: where ``export -f slurm-tune``
    sends the worker that measures it."""


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    dir: str = "tuned"
    global_batch_size: int | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    scripts: tuple[str, ...] = SCRIPTS
    slurm: dict[str, Any] = field(default_factory=dict)
    lsf: dict[str, Any] = field(default_factory=dict)
    train_command: str = "train.py --config tuned.yaml"
    """Script + args that torchrun launches in the generated submission scripts."""


PARALLEL_STRATEGIES = ("none", "ddp", "fsdp")
PARALLEL_DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class ParallelSpec:
    """How the training job is spread over ranks; memory is planned per rank."""

    strategies: tuple[str, ...] = ("none",)
    """none | ddp | fsdp (FSDP2 ``fully_shard``); several = searched across."""
    world_size: int | None = None
    """Ranks; None = ``output.nodes x output.gpus_per_node``."""
    reshard_after_forward: bool = True
    param_dtype: str | None = None
    """FSDP mixed precision: dtype of the all-gathered parameters (None: as stored)."""
    reduce_dtype: str | None = None
    """FSDP mixed precision: dtype of the gradient reduce-scatter (None: param_dtype)."""
    gradient_as_bucket_view: bool = False
    """DDP: gradients are views into its buckets (saves 1x the gradient bytes)."""

    @property
    def strategy(self) -> str:
        return self.strategies[0]


@dataclass(frozen=True, kw_only=True)
class ExperimentSpec:
    name: str
    model: ModelSpec
    data: DataSpec
    loss: str = "cross_entropy"
    """cross_entropy | mse | model (the model returns its loss) | an import path."""
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    device: str = "auto"
    memory: MemorySpec = field(default_factory=MemorySpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    targets: tuple[TargetSpec, ...] = ()
    output: OutputSpec = field(default_factory=OutputSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    step: str | None = None
    """None: chosen from the model and batch (autofit / hf / lightning); ``autofit`` or
    ``hf_trainer``; or the import path of a user step: a full step
    ``fn(model, optimizer, batch, scaler, ...) -> loss`` or the forward form
    ``fn(model, batch_size, input_size, device) -> loss``."""
    source_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The YAML as loaded, used to write tuned.yaml with the same keys the user wrote."""
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict, compare=False, repr=False)
    """YAML path -> 1-based file line (empty when the spec did not come from a file)."""

    def where(self, path: tuple[Any, ...] = ()) -> str:
        """Message prefix naming the file line of a YAML path: ``"exp.yaml:12: model: "``
        (``"exp.yaml: optimizer: "`` for a section the file does not have)."""
        return _where(self.source_path, self.lines, path, top=False)[1]

    @property
    def world_size(self) -> int:
        """Ranks of the job: ``parallel.world_size`` or ``output.nodes x output.gpus_per_node``."""
        return self.parallel.world_size or self.output.nodes * self.output.gpus_per_node

    @property
    def default_input_size(self) -> int:
        if self.data.kind == "image":
            return self.data.size[0]
        if self.data.kind == "tokens":
            return self.data.seq_len
        return 0

    @property
    def input_sizes(self) -> tuple[int, ...]:
        return self.search.input_sizes or (self.default_input_size,)

    def spec_hash(self) -> str:
        """Short stable hash of the spec content (provenance of generated files)."""
        text = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- loading


def _dotted(path: tuple[Any, ...]) -> str:
    """``("search", "precision", 0)`` -> ``search.precision[0]``."""
    dotted = ".".join(
        f"[{p}]" if isinstance(p, int) else (str(p) if str(p).isprintable() and str(p).strip() and "." not in str(p) else repr(p))
        for p in path)
    return dotted.replace(".[", "[")


def _where(source: str | None, lines: dict[tuple[Any, ...], int], path: tuple[Any, ...],
           *, top: bool = True) -> tuple[int, str]:
    """(file line or 0, ``"source:LINE: yaml.path: "``): the line of the nearest known parent
    (``top``: the file's first line when only the top level is known)."""
    key = path
    while key and key not in lines:
        key = key[:-1]
    line = lines.get(key, 0) if key or top or not path else 0
    prefix = "" if not source else f"{source}:{line}: " if line else f"{source}: "
    return line, f"{prefix}{_dotted(path) or '(top level)'}: "


class _Problems:
    """Collects problems with YAML paths and file lines, and the import paths to resolve."""

    def __init__(self, source: str, lines: dict[tuple[Any, ...], int]) -> None:
        self.source = source
        self.lines = lines
        self.items: list[str] = []
        self.line_numbers: list[int] = []
        self.imports: list[tuple[tuple[Any, ...], str]] = []
        """(YAML path, import path) of every syntactically valid import path in the spec."""

    def add(self, path: tuple[Any, ...], message: str) -> None:
        line, where = _where(self.source, self.lines, path)
        message = message.replace("\n", "\\n").replace("\r", "\\r")
        self.items.append(f"{where}{message}")
        self.line_numbers.append(line)

    def sorted_items(self) -> list[str]:
        """The problems in file-line order (stable: same line or no line keeps found order)."""
        order = sorted(range(len(self.items)), key=self.line_numbers.__getitem__)
        return [self.items[i] for i in order]


def _line_map(node: yaml.Node, path: tuple[Any, ...] = (), out: dict | None = None,
              active: set[int] | None = None) -> dict:
    """YAML path -> 1-based line, from the composed node tree."""
    out = {} if out is None else out
    active = set() if active is None else active
    out[path] = node.start_mark.line + 1
    if id(node) in active:  # an alias of an enclosing node (``&a [*a]``): do not recurse
        return out
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out, active)
            out[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, path + (index,), out, active)
    active.discard(id(node))
    return out


def _check_keys(p: _Problems, path: tuple, mapping: dict, allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; allowed: {', '.join(allowed)}"
            p.add(path + (key,), f"unknown key{suggestion}")


def _section(p: _Problems, raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        p.add((key,), f"must be a mapping, got {type(value).__name__} {value!r}")
        return {}
    return value


def _int(p: _Problems, path: tuple, value: Any, *, minimum: int | None = None,
         maximum: int | None = None, default: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        p.add(path, f"must be an integer, got {type(value).__name__} {value!r}")
        return default
    if minimum is not None and value < minimum:
        p.add(path, f"must be >= {minimum}, got {value}")
        return default
    if maximum is not None and value > maximum:
        p.add(path, f"must be <= {maximum}, got {value}")
        return default
    return value


def _float(p: _Problems, path: tuple, value: Any, *, minimum: float, maximum: float,
           default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        p.add(path, f"must be a number, got {type(value).__name__} {value!r}")
        return default
    if not minimum <= value <= maximum:
        p.add(path, f"must be between {minimum} and {maximum}, got {value}")
        return default
    return float(value)


def _choice(p: _Problems, path: tuple, value: Any, choices: tuple[str, ...], default: str) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        p.add(path, f"must be one of {', '.join(choices)}, got {value!r}{extra}")
        return default
    return value


def _import_path(p: _Problems, path: tuple, value: Any) -> str:
    if not isinstance(value, str) or "." not in value or value.strip() != value or not all(
        part.isidentifier() for part in value.split(".")
    ):
        p.add(path, f"must be an import path like 'package.module.Name', got {value!r}")
        return ""
    p.imports.append((path, value))
    return value


def _nested_targets(p: _Problems, path: tuple, value: Any, seen: set[int] | None = None) -> None:
    """Check the ``_target_`` of mappings nested in model kwargs (built recursively)."""
    seen = set() if seen is None else seen
    if not isinstance(value, dict | list) or id(value) in seen:
        return  # YAML aliases can make a structure contain itself
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if key == "_target_" and isinstance(value, dict):
            _import_path(p, path + (key,), item)
        else:
            _nested_targets(p, path + (key,), item, seen)


def _callable_section(p: _Problems, path: tuple, value: Any, extra: tuple[str, ...] = ()
                      ) -> tuple[str, dict, dict]:
    """``{_target_: x, **kwargs}`` or Lightning's ``{class_path: x, init_args: {...}}``."""
    if isinstance(value, str):
        return _import_path(p, path, value), {}, {}
    if not isinstance(value, dict):
        p.add(path, f"must be a mapping with '_target_', got {type(value).__name__} {value!r}")
        return "", {}, {}
    value = dict(value)
    own = {k: value.pop(k) for k in extra if k in value}
    if "class_path" in value:
        target = _import_path(p, path + ("class_path",), value.pop("class_path"))
        init_args = value.pop("init_args", {}) or {}
        if not isinstance(init_args, dict):
            p.add(path + ("init_args",), f"must be a mapping, got {init_args!r}")
            init_args = {}
        _check_keys(p, path, value, ("class_path", "init_args", *extra))
        return target, dict(init_args), own
    if "_target_" not in value:
        p.add(path, "missing '_target_' (import path of the class or function to call)")
        return "", {}, own
    target = _import_path(p, path + ("_target_",), value.pop("_target_"))
    return target, value, own


def _int_list(p: _Problems, path: tuple, value: Any, *, minimum: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, dict):
        _check_keys(p, path, value, ("min", "max", "step"))
        lo = _int(p, path + ("min",), value.get("min"), minimum=minimum, default=minimum)
        hi = _int(p, path + ("max",), value.get("max"), minimum=minimum, default=lo)
        step = _int(p, path + ("step",), value.get("step", 1), minimum=1, default=1)
        if hi < lo:
            p.add(path, f"max must be >= min, got min={lo}, max={hi}")
            return ()
        values = tuple(range(lo, hi + 1, step))
        if len(values) > 1000:
            p.add(path, f"range gives {len(values)} values; at most 1000")
            return ()
        return values
    if not isinstance(value, list) or not value:
        p.add(path, f"must be a non-empty list of integers or {{min, max, step}}, got {value!r}")
        return ()
    out = [_int(p, path + (i,), v, minimum=minimum, default=-1) for i, v in enumerate(value)]
    return tuple(sorted({v for v in out if v >= minimum}))


def _size_pair(p: _Problems, path: tuple, value: Any) -> tuple[int, int]:
    if isinstance(value, list):
        if len(value) != 2:
            p.add(path, f"must be an int or [height, width], got {value!r}")
            return (32, 32)
        h = _int(p, path + (0,), value[0], minimum=1, default=32)
        w = _int(p, path + (1,), value[1], minimum=1, default=32)
        return (h, w)
    side = _int(p, path, value, minimum=1, default=32)
    return (side, side)


def _field_shape(p: _Problems, path: tuple, value: Any) -> tuple[int | str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        p.add(path, f"must be a list of sizes (ints or 'input_size'), got {value!r}")
        return None
    dims: list[int | str] = []
    for i, dim in enumerate(value):
        if isinstance(dim, str):
            if dim not in SIZE_AXIS_NAMES:
                p.add(path + (i,), f"must be a positive int or one of {', '.join(SIZE_AXIS_NAMES)}, got {dim!r}")
            dims.append("input_size")
        else:
            dims.append(_int(p, path + (i,), dim, minimum=1, default=1))
    return tuple(dims)


def _batch_field(p: _Problems, path: tuple, name: str, value: Any, kind: str) -> BatchField:
    """``tokens`` / ``ones`` / ... or ``{kind, shape, dtype, high}`` / ``{classes: N, per}``."""
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        p.add(path, f"must be a field kind ({', '.join(FIELD_KINDS)}) or a mapping, got {value!r}")
        return BatchField(name=name, kind="normal")
    _check_keys(p, path, value, ("kind", "shape", "dtype", "high", "classes", "per"))
    default_kind = "classes" if "classes" in value else None
    field_kind = _choice(p, path + ("kind",), value.get("kind", default_kind), FIELD_KINDS, "normal")
    shape = _field_shape(p, path + ("shape",), value.get("shape"))
    high = None
    if field_kind == "classes":
        if "classes" not in value and "high" not in value:
            p.add(path, "missing 'classes' (number of classes, e.g. {classes: 3, per: sample})")
        high = _int(p, path + ("classes",), value.get("classes", value.get("high", 2)), minimum=1,
                    default=2)
        per = _choice(p, path + ("per",), value.get("per", "sample"), ("sample", "token"), "sample")
        if shape is None:
            shape = () if per == "sample" else ("input_size",)
    elif "high" in value:
        high = _int(p, path + ("high",), value["high"], minimum=1, default=2)
    elif field_kind == "tokens" and kind != "tokens":
        p.add(path, "tokens fields need data.kind: tokens (for vocab_size) or 'high'")
    if field_kind in ("normal", "uniform") and shape is None and kind != "tensor":
        p.add(path + ("shape",), f"missing (per-sample shape of the {field_kind} floats)")
    dtype = value.get("dtype")
    if dtype is not None:
        dtype = _choice(p, path + ("dtype",), dtype, FIELD_DTYPES, "float32")
    return BatchField(name=name, kind=field_kind, shape=shape, dtype=dtype, high=high)


def _load_batch(p: _Problems, data: dict, kind: str
                ) -> tuple[tuple[BatchField, ...], str, str | None]:
    value = data.get("batch")
    path = ("data", "batch")
    if value is None:
        return (), "tensor", None
    if isinstance(value, dict) and value:
        fields = tuple(_batch_field(p, path + (name,), str(name), item, kind)
                       for name, item in value.items())
        form = "dict"
    elif isinstance(value, list) and value:
        fields = tuple(_batch_field(p, path + (i,), f"field{i}", item, kind)
                       for i, item in enumerate(value))
        form = "tuple"
    else:
        p.add(path, "must be a mapping of named fields (model(**batch)) or a list (a tuple batch), "
                    f"got {value!r}")
        return (), "tensor", None
    target = data.get("target")
    names = [f.name for f in fields]
    if target is not None and (form != "dict" or target not in names):
        p.add(("data", "target"), f"must name a field of data.batch ({', '.join(names)}), got {target!r}")
        target = None
    if target is None and form == "dict":
        target = next((n for n in TARGET_FIELD_NAMES if n in names), None)
    return fields, form, target


def _load_data(p: _Problems, raw: dict) -> DataSpec:
    data = _section(p, raw, "data")
    if "data" not in raw and not raw.get("step"):
        p.add(("data",), "missing (e.g. {kind: image, channels: 3, size: 32, num_classes: 10})")
    errors_before = len(p.items)
    kind = _choice(p, ("data", "kind"), data.get("kind", "image" if not data else None),
                   DATA_KINDS, "image") if data else "image"
    if len(p.items) > errors_before:
        return DataSpec(kind="image")  # an unknown kind: its keys cannot be checked against it
    allowed = {
        "image": ("kind", "channels", "size", "num_classes"),
        "tokens": ("kind", "vocab_size", "seq_len"),
        "tensor": ("kind", "shape", "num_classes"),
    }[kind]
    _check_keys(p, ("data",), data, (*allowed, "batch", "target"))
    fields, form, target = _load_batch(p, data, kind)
    batch = {"batch": fields, "batch_form": form, "target": target}
    if kind == "image":
        return DataSpec(
            kind="image",
            channels=_int(p, ("data", "channels"), data.get("channels", 3), minimum=1, default=3),
            size=_size_pair(p, ("data", "size"), data.get("size", 32)),
            num_classes=_int(p, ("data", "num_classes"), data["num_classes"], minimum=1, default=10)
            if "num_classes" in data else None, **batch,
        )
    if kind == "tokens":
        if "vocab_size" not in data:
            p.add(("data", "vocab_size"), "missing (number of token ids)")
        if "seq_len" not in data:
            p.add(("data", "seq_len"), "missing (tokens per sample)")
        return DataSpec(
            kind="tokens",
            vocab_size=_int(p, ("data", "vocab_size"), data.get("vocab_size", 2), minimum=2, default=2),
            seq_len=_int(p, ("data", "seq_len"), data.get("seq_len", 1), minimum=1, default=1),
            **batch,
        )
    shape = data.get("shape")
    if not isinstance(shape, list) or not shape:
        if not fields:
            p.add(("data", "shape"), f"must be a non-empty list of positive integers, got {shape!r}")
        shape = [1]
    dims = tuple(_int(p, ("data", "shape", i), d, minimum=1, default=1) for i, d in enumerate(shape))
    return DataSpec(
        kind="tensor", shape=dims,
        num_classes=_int(p, ("data", "num_classes"), data["num_classes"], minimum=1, default=10)
        if "num_classes" in data else None, **batch,
    )


def _load_memory(p: _Problems, raw: dict) -> MemorySpec:
    mem = _section(p, raw, "memory")
    _check_keys(p, ("memory",), mem, ("budget", "margin", "cpu_limit"))
    budget = mem.get("budget", "auto")
    budget_bytes: int | None = None
    if budget != "auto":
        try:
            budget_bytes = parse_bytes(budget)
            if budget_bytes < 2**16:
                p.add(("memory", "budget"), f"must be at least 64KiB, got {budget!r}")
            elif budget_bytes > 2**50:
                p.add(("memory", "budget"), f"must be at most 1PiB, got {budget!r}")
        except ValueError as exc:
            p.add(("memory", "budget"), f"{exc} (or 'auto')")
    return MemorySpec(
        budget_bytes=budget_bytes,
        budget_text=str(budget),
        margin=_float(p, ("memory", "margin"), mem.get("margin", 0.10), minimum=0.0, maximum=0.9,
                      default=0.10),
        cpu_limit=_choice(p, ("memory", "cpu_limit"), mem.get("cpu_limit", "budget"), CPU_LIMITS,
                          "budget"),  # type: ignore[arg-type]
    )


def _load_search(p: _Problems, raw: dict) -> SearchSpec:
    s = _section(p, raw, "search")
    allowed = ("batch_size", "input_size", "precision", "checkpoint_segments", "objective",
               "strategy", "steps_per_trial", "warmup_steps", "verify_steps", "timeout_s",
               "max_trials", "seed")
    _check_keys(p, ("search",), s, allowed)
    bs = s.get("batch_size", {}) or {}
    if not isinstance(bs, dict):
        p.add(("search", "batch_size"), f"must be a mapping {{min, max}}, got {bs!r}")
        bs = {}
    _check_keys(p, ("search", "batch_size"), bs, ("min", "max", "multiple_of"))
    bmin = _int(p, ("search", "batch_size", "min"), bs.get("min", 1), minimum=1, default=1)
    bmax = _int(p, ("search", "batch_size", "max"), bs.get("max", 65536), minimum=1,
                maximum=2**31, default=65536)
    mult = _int(p, ("search", "batch_size", "multiple_of"), bs.get("multiple_of", 1), minimum=1,
                default=1)
    if bmax < bmin:
        p.add(("search", "batch_size", "max"), f"must be >= min ({bmin}), got {bmax}")
    if mult > 1 and bmax // mult * mult < bmin:
        p.add(("search", "batch_size", "multiple_of"),
              f"no multiple of {mult} lies in [{bmin}, {bmax}]")
    precisions = s.get("precision", ["fp32"])
    if isinstance(precisions, str):
        precisions = [precisions]
    if not isinstance(precisions, list) or not precisions:
        p.add(("search", "precision"), f"must be a list from fp32, fp16, bf16, got {precisions!r}")
        precisions = ["fp32"]
    precs = tuple(dict.fromkeys(
        Precision(_choice(p, ("search", "precision", i), PRECISION_ALIASES.get(str(v), v),
                          PRECISIONS, "fp32"))
        for i, v in enumerate(precisions)
    ))
    segments = _int_list(p, ("search", "checkpoint_segments"), s.get("checkpoint_segments", [0]),
                         minimum=0) or (0,)
    input_sizes: tuple[int, ...] = ()
    if "input_size" in s:
        input_sizes = _int_list(p, ("search", "input_size"), s["input_size"], minimum=1)
    return SearchSpec(
        batch_size=BatchRange(min=bmin, max=max(bmax, bmin), multiple_of=mult),
        input_sizes=input_sizes,
        precisions=precs,
        checkpoint_segments=segments,
        objective=Objective(_choice(p, ("search", "objective"), s.get("objective", "max_batch"),
                                    OBJECTIVES, "max_batch")),
        strategy=Strategy(_choice(p, ("search", "strategy"), s.get("strategy", "auto"),
                                  STRATEGIES, "auto")),
        steps_per_trial=_int(p, ("search", "steps_per_trial"), s.get("steps_per_trial", 3),
                             minimum=1, maximum=1000, default=3),
        warmup_steps=_int(p, ("search", "warmup_steps"), s.get("warmup_steps", 2), minimum=2,
                          maximum=100, default=2),
        verify_steps=_int(p, ("search", "verify_steps"), s.get("verify_steps", 10), minimum=0,
                          maximum=10000, default=10),
        timeout_s=_float(p, ("search", "timeout_s"), s.get("timeout_s", 600), minimum=1,
                         maximum=7 * 86400, default=600),
        max_trials=_int(p, ("search", "max_trials"), s.get("max_trials", 0), minimum=0,
                        maximum=10000, default=0),
        seed=_int(p, ("search", "seed"), s.get("seed", 0), minimum=0, default=0),
    )


def _load_targets(p: _Problems, raw: dict) -> tuple[TargetSpec, ...]:
    targets = raw.get("targets", []) or []
    if not isinstance(targets, list):
        p.add(("targets",), f"must be a list of {{name, memory}}, got {targets!r}")
        return ()
    out = []
    for i, t in enumerate(targets):
        path = ("targets", i)
        if not isinstance(t, dict):
            p.add(path, f"must be a mapping {{name, memory}}, got {t!r}")
            continue
        _check_keys(p, path, t, ("name", "memory", "bf16", "partition"))
        name = t.get("name")
        if not isinstance(name, str) or not name:
            p.add(path + ("name",), f"must be a non-empty string, got {name!r}")
            name = f"target{i}"
        try:
            mem = parse_bytes(t.get("memory"))
        except (ValueError, TypeError) as exc:
            p.add(path + ("memory",), str(exc))
            mem = 0
        bf16 = t.get("bf16", not any(old in name.upper() for old in ("V100", "T4", "P100", "K80")))
        if not isinstance(bf16, bool):
            p.add(path + ("bf16",), f"must be true or false, got {bf16!r}")
            bf16 = True
        partition = t.get("partition")
        if partition is not None and (not isinstance(partition, str) or not partition.strip()
                                      or any(c.isspace() for c in partition)):
            p.add(path + ("partition",), f"must be a partition (queue) name, got {partition!r}")
            partition = None
        out.append(TargetSpec(name=name, memory_bytes=mem, memory_text=str(t.get("memory")),
                              bf16=bf16, partition=partition))
    return tuple(out)


def _load_output(p: _Problems, raw: dict) -> OutputSpec:
    o = _section(p, raw, "output")
    _check_keys(p, ("output",), o, ("dir", "global_batch_size", "nodes", "gpus_per_node",
                                    "scripts", "slurm", "lsf", "train_command"))
    directory = o.get("dir", "tuned")
    if not isinstance(directory, str) or not directory:
        p.add(("output", "dir"), f"must be a path string, got {directory!r}")
        directory = "tuned"
    gbs = o.get("global_batch_size")
    if gbs is not None:
        gbs = _int(p, ("output", "global_batch_size"), gbs, minimum=1, default=1)
    scripts = o.get("scripts", list(SCRIPTS))
    if not isinstance(scripts, list):
        p.add(("output", "scripts"), f"must be a list from {', '.join(SCRIPTS)}, got {scripts!r}")
        scripts = []
    scripts = [_choice(p, ("output", "scripts", i), v, SCRIPTS, "torchrun") for i, v in enumerate(scripts)]
    slurm = o.get("slurm", {}) or {}
    lsf = o.get("lsf", {}) or {}
    if not isinstance(slurm, dict):
        p.add(("output", "slurm"), f"must be a mapping, got {slurm!r}")
        slurm = {}
    if not isinstance(lsf, dict):
        p.add(("output", "lsf"), f"must be a mapping, got {lsf!r}")
        lsf = {}
    _check_keys(p, ("output", "slurm"), slurm, ("partition", "time", "cpus_per_task", "account",
                                                "job_name", "mem"))
    _check_keys(p, ("output", "lsf"), lsf, ("queue", "walltime", "project", "job_name"))
    # YAML reads an unquoted 24:00:00 as a base-60 integer (86400), which Slurm would take as
    # minutes: durations must be quoted strings
    for section, key, mapping in (("slurm", "time", slurm), ("lsf", "walltime", lsf)):
        if key in mapping and not isinstance(mapping[key], str):
            p.add(("output", section, key),
                  f"must be a quoted string like \"24:00:00\", got {mapping[key]!r} (YAML read it as a number)")
    train_command = o.get("train_command", "train.py --config tuned.yaml")
    if not isinstance(train_command, str) or not train_command.strip():
        p.add(("output", "train_command"), f"must be a non-empty string, got {train_command!r}")
        train_command = "train.py --config tuned.yaml"
    return OutputSpec(
        dir=directory,
        global_batch_size=gbs,
        nodes=_int(p, ("output", "nodes"), o.get("nodes", 1), minimum=1, maximum=100000, default=1),
        gpus_per_node=_int(p, ("output", "gpus_per_node"), o.get("gpus_per_node", 1), minimum=1,
                           maximum=1024, default=1),
        scripts=tuple(dict.fromkeys(scripts)),
        slurm=dict(slurm),
        lsf=dict(lsf),
        train_command=train_command,
    )


def _bool(p: _Problems, path: tuple, value: Any, default: bool) -> bool:
    if not isinstance(value, bool):
        p.add(path, f"must be true or false, got {value!r}")
        return default
    return value


def _load_parallel(p: _Problems, raw: dict) -> ParallelSpec:
    par = _section(p, raw, "parallel")
    _check_keys(p, ("parallel",), par, ("strategy", "world_size", "fsdp", "ddp"))
    strategies = par.get("strategy", "none")
    if isinstance(strategies, str):
        strategies = [strategies]
    if not isinstance(strategies, list) or not strategies:
        p.add(("parallel", "strategy"), f"must be one of {', '.join(PARALLEL_STRATEGIES)} or a "
              f"list of them, got {strategies!r}")
        strategies = ["none"]
    listed = isinstance(par.get("strategy"), list)
    chosen = tuple(dict.fromkeys(
        _choice(p, ("parallel", "strategy") + ((i,) if listed else ()), v, PARALLEL_STRATEGIES,
                "none") for i, v in enumerate(strategies)))
    world = par.get("world_size")
    if world is not None:
        world = _int(p, ("parallel", "world_size"), world, minimum=1, maximum=1 << 20, default=1)
    fsdp = par.get("fsdp", {}) or {}
    ddp = par.get("ddp", {}) or {}
    for key, value in (("fsdp", fsdp), ("ddp", ddp)):
        if not isinstance(value, dict):
            p.add(("parallel", key), f"must be a mapping, got {value!r}")
    fsdp = fsdp if isinstance(fsdp, dict) else {}
    ddp = ddp if isinstance(ddp, dict) else {}
    _check_keys(p, ("parallel", "fsdp"), fsdp, ("reshard_after_forward", "mixed_precision"))
    _check_keys(p, ("parallel", "ddp"), ddp, ("gradient_as_bucket_view",))
    mp = fsdp.get("mixed_precision", {}) or {}
    if not isinstance(mp, dict):
        p.add(("parallel", "fsdp", "mixed_precision"),
              f"must be a mapping {{param_dtype, reduce_dtype}}, got {mp!r}")
        mp = {}
    _check_keys(p, ("parallel", "fsdp", "mixed_precision"), mp, ("param_dtype", "reduce_dtype"))
    dtypes = {}
    for key in ("param_dtype", "reduce_dtype"):
        if mp.get(key) is not None:
            value = PRECISION_ALIASES.get(str(mp[key]), mp[key])
            dtypes[key] = _choice(p, ("parallel", "fsdp", "mixed_precision", key), value,
                                  PARALLEL_DTYPES, "fp32")
    return ParallelSpec(
        strategies=chosen, world_size=world,
        reshard_after_forward=_bool(p, ("parallel", "fsdp", "reshard_after_forward"),
                                    fsdp.get("reshard_after_forward", True), True),
        param_dtype=dtypes.get("param_dtype"), reduce_dtype=dtypes.get("reduce_dtype"),
        gradient_as_bucket_view=_bool(p, ("parallel", "ddp", "gradient_as_bucket_view"),
                                      ddp.get("gradient_as_bucket_view", False), False),
    )


def _device(p: _Problems, value: Any) -> str:
    if value == "auto" or value == "cpu" or value == "cuda":
        return value
    if isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit():
        return value
    p.add(("device",), f"must be auto, cpu, cuda or cuda:N, got {value!r}")
    return "auto"


# --------------------------------------------------------------------------- import paths


def _raised(name: str, exc: BaseException) -> str:
    return f"importing {name!r} raised {type(exc).__name__}: {exc}"


def _close(name: str, candidates: Any) -> str | None:
    try:
        names = [c for c in candidates if isinstance(c, str) and not c.startswith("_")]
    except Exception:  # a user object with a broken __dir__
        return None
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return match[0] if match else None


def _submodule_names(module: Any) -> list[str]:
    search = getattr(module, "__path__", None)
    if search is None:
        return []
    try:
        return [info.name for info in pkgutil.iter_modules(search)]
    except Exception:
        return []


def _find(name: str) -> tuple[bool, bool]:
    """(module exists, is a package) without importing it (its parents are imported)."""
    module = sys.modules.get(name)
    if module is not None:  # also covers modules without __spec__, like a script's __main__
        return True, hasattr(module, "__path__")
    found = importlib.util.find_spec(name)
    return found is not None, found is not None and found.submodule_search_locations is not None


def _longest_module(parts: list[str]) -> tuple[Any, int, str, BaseException | None]:
    """(module, number of parts it spans, why not, cause) for the longest importable prefix."""
    try:
        exists, package = _find(parts[0])
    except (Exception, SystemExit) as exc:  # user code runs: catch what it can raise
        return None, 0, _raised(parts[0], exc), exc
    if not exists:
        top = [info.name for info in pkgutil.iter_modules()] + list(sys.builtin_module_names)
        match = _close(parts[0], top)
        hint = f"; did you mean {'.'.join([match, *parts[1:]])!r}?" if match else ""
        return None, 0, f"no module named {parts[0]!r}{hint}", None
    cut = 1
    while cut < len(parts) and package:
        try:  # imports the parent package
            exists, package = _find(".".join(parts[:cut + 1]))
        except (Exception, SystemExit) as exc:
            return None, 0, _raised(".".join(parts[:cut]), exc), exc
        if not exists:
            break
        cut += 1
    name = ".".join(parts[:cut])
    try:
        return importlib.import_module(name), cut, "", None
    except (Exception, SystemExit) as exc:
        return None, 0, _raised(name, exc), exc


def resolve_import(target: str) -> tuple[Any, str, BaseException | None]:
    """Resolve ``pkg.mod.Name[.attr...]`` without calling it: ``(object, "", None)``, or
    ``(None, why, cause)`` with a "did you mean" where one is close (``cause``: the exception
    user code raised, if any). Imports the modules on the way, as building would."""
    parts = target.split(".")
    obj, cut, why, cause = _longest_module(parts)
    if obj is None:
        return None, why, cause
    for i in range(cut, len(parts)):
        owner, name = ".".join(parts[:i]), parts[i]
        try:
            obj = getattr(obj, name)
            continue
        except AttributeError:
            pass
        except Exception as exc:  # a module __getattr__ or descriptor raised
            return None, f"looking up {'.'.join(parts[:i + 1])!r} raised {type(exc).__name__}: {exc}", exc
        is_module = isinstance(obj, types.ModuleType)
        submodules = _submodule_names(obj) if is_module else []
        try:
            attributes = dir(obj)
        except Exception:
            attributes = []
        match = _close(name, [*attributes, *submodules])
        hint = f"; did you mean {'.'.join([*parts[:i], match, *parts[i + 1:]])!r}?" if match else ""
        if submodules and i < len(parts) - 1:
            return None, f"no module named {owner + '.' + name!r}{hint}", None
        kind = "module " if is_module else ""
        return None, f"{kind}{owner!r} has no attribute {name!r}{hint}", None
    return obj, "", None


@contextlib.contextmanager
def _spec_dir_on_path(source: str) -> Iterator[None]:
    """Modules next to the spec file and in the working directory importable, as at build
    time (``build.add_spec_dir_to_path``); sys.path is restored afterwards."""
    added = []
    if source and source != "<spec>":
        folder = str(Path(source).resolve().parent)
        if folder not in sys.path:
            added.append(folder)
    if "" not in sys.path and "." not in sys.path:
        added.append("")
    for entry in added:
        sys.path.insert(0, entry)
    importlib.invalidate_caches()  # files written since the last import are seen
    try:
        yield
    finally:
        for entry in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _check_imports(p: _Problems) -> None:
    """One problem per import path of the spec that does not resolve."""
    seen: dict[str, str] = {}
    with _spec_dir_on_path(p.source):
        for path, target in p.imports:
            if target not in seen:
                seen[target] = resolve_import(target)[1]
            if seen[target]:
                p.add(path, f"cannot import {target!r}: {seen[target]}")


TOP_LEVEL_KEYS = ("name", "model", "data", "loss", "optimizer", "device", "memory", "search",
                  "targets", "output", "step", "parallel", "autofit_tuned")
"""``autofit_tuned`` is the tuned values a ``tuned.yaml`` carries for the training script
(``autofit.load_tuned``); a spec that has it is still a spec, and the key is not validated here."""


def _blocks(p: _Problems, value: Any) -> str | tuple[str, ...] | None:
    """``model.blocks``: one attribute path, or a list of them (named stages, in order)."""
    if value is None:
        return None

    def is_path(v: Any) -> bool:
        return isinstance(v, str) and all(part.isidentifier() for part in v.split("."))

    if is_path(value):
        return value
    if isinstance(value, list) and value and all(is_path(v) for v in value):
        if len(set(value)) != len(value):
            p.add(("model", "blocks"), f"names a stage twice: {value!r}")
            return None
        return value[0] if len(value) == 1 else tuple(value)
    p.add(("model", "blocks"), f"must be an attribute path like 'transformer.h' or a list of "
          f"them like [layer1, layer2], got {value!r}")
    return None


def spec_from_dict(raw: Any, source: str = "<spec>", lines: dict | None = None, *,
                   check_imports: bool = False) -> ExperimentSpec:
    """Validate a loaded YAML mapping. Raises SpecError listing every problem.

    ``check_imports``: also resolve every import path (off by default: results.json and the
    trial process re-read specs where the model's code may not be importable).
    """
    p = _Problems(source, lines or {})
    if not isinstance(raw, dict):
        p.add((), f"the spec must be a YAML mapping, got {type(raw).__name__}")
        raise SpecError(p.items, source, unread=True)
    _check_keys(p, (), raw, TOP_LEVEL_KEYS)
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        p.add(("name",), f"must be a non-empty string, got {name!r}")
        name = "experiment"
    if "model" not in raw:
        p.add(("model",), "missing (e.g. {_target_: autofit.zoo.resnet, depth: 18})")
        model = ModelSpec(target="")
    else:
        target, kwargs, own = _callable_section(p, ("model",), raw["model"], extra=("blocks",))
        blocks = _blocks(p, own.get("blocks"))
        model = ModelSpec(target=target, kwargs=kwargs, blocks=blocks)
        lightning = isinstance(raw["model"], dict) and "class_path" in raw["model"]
        _nested_targets(p, ("model", "init_args") if lightning else ("model",), kwargs)
    data = _load_data(p, raw)
    loss = raw.get("loss", "cross_entropy")
    if not isinstance(loss, str) or (loss not in BUILTIN_LOSSES and "." not in loss):
        hint = difflib.get_close_matches(str(loss), BUILTIN_LOSSES, n=1, cutoff=0.6)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        p.add(("loss",), f"must be one of {', '.join(BUILTIN_LOSSES)} or an import path, got {loss!r}{extra}")
        loss = "cross_entropy"
    elif loss not in BUILTIN_LOSSES:
        loss = _import_path(p, ("loss",), loss) or "cross_entropy"
    raw_data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    kind_ok = raw_data.get("kind", "image") in DATA_KINDS  # else only data.kind is reported
    if (loss == "cross_entropy" and data.kind == "image" and data.num_classes is None
            and "data" in raw and not data.batch and kind_ok):
        p.add(("data", "num_classes"), "missing (needed for loss: cross_entropy on images)")
    if "optimizer" in raw:
        opt_target, opt_kwargs, _ = _callable_section(p, ("optimizer",), raw["optimizer"])
        optimizer = OptimizerSpec(target=opt_target or "torch.optim.AdamW", kwargs=opt_kwargs)
    else:
        optimizer = OptimizerSpec()
    step = raw.get("step")
    if step is not None and step not in BUILTIN_STEPS:
        if isinstance(step, str) and "." not in step:
            step = _choice(p, ("step",), step, BUILTIN_STEPS, "autofit")
        else:
            step = _import_path(p, ("step",), step) or None
    search = _load_search(p, raw)
    if search.input_sizes and data.kind == "tensor":
        p.add(("search", "input_size"), "not supported for data.kind: tensor (no size axis)")
    spec = ExperimentSpec(
        name=name,
        model=model,
        data=data,
        loss=loss,
        optimizer=optimizer,
        device=_device(p, raw.get("device", "auto")),
        memory=_load_memory(p, raw),
        search=search,
        targets=_load_targets(p, raw),
        output=_load_output(p, raw),
        parallel=_load_parallel(p, raw),
        step=step,
        source_path=source if source != "<spec>" else None,
        raw=copy.deepcopy(raw),
        lines=dict(lines or {}),
    )
    if check_imports:
        _check_imports(p)
    if p.items:
        raise SpecError(p.sorted_items(), source)
    return spec


def load_spec(path: str | Path, *, check_imports: bool = True) -> ExperimentSpec:
    """Read and validate a YAML experiment spec. Raises SpecError with every problem, the
    import paths that do not resolve included (``check_imports``; modules next to the spec
    file are importable)."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise SpecError([f"{source}: file not found"], source, unread=True)
    if path.is_dir():
        raise SpecError([f"{source}: is a directory, expected a YAML file"], source, unread=True)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{source}: cannot read: {exc}"], source, unread=True) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{source}{line}: invalid YAML: {problem}"], source, unread=True) from None
    if raw is None:
        raise SpecError([f"{source}: the file is empty"], source, unread=True)
    lines = _line_map(node) if node is not None else {}
    spec = spec_from_dict(raw, source, lines, check_imports=check_imports)
    return replace(spec, source_path=str(path.resolve()))
