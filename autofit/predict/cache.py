"""An on-disk cache of traces: a second ``estimate``/``tune``/``profile`` traces nothing new.

A trace is a pure function of what it is keyed by:

* the spec sections a trace reads (``model``, ``data``, ``loss``, ``optimizer``, ``step``,
  ``device``; not the budget, the search ranges, the targets or the output);
* the candidate (batch, input size, precision, checkpoint segments, strategy of a list);
* ``memory.cpu_limit: rlimit`` on CPU (its estimates name the ops whose scratch only the
  allocator sees);
* for DDP / FSDP2, the ``parallel`` plan (strategy, world size, options; ``parallel_key``);
* the torch version and the device model (its kind and every constant);
* the code: autofit's own sources and the files of the modules the spec names (model,
  optimizer, loss, step, nested ``_target_``), by size and modification time. Modules those
  import are not followed: after editing one, run with ``--no-cache``.

Each entry is one JSON file ``<dir>/<key>.json`` (``MemoryEstimate.to_dict`` plus what the
batch search reads). The default dir is ``<output dir>/.trace_cache``; ``AUTOFIT_CACHE_DIR``
(or ``cache=<dir>`` in the API, ``--cache-dir`` on the command line) puts it elsewhere, such
as a user cache dir shared by every spec. Writes are atomic; an unreadable entry is a miss.

The cache is active inside ``using(cache)``; ``autofit.predict.trace.estimate`` consults
``active()``. Per-layer traces and profiles' timelines are not cached.

An *answer record* (``estimate-<key>.json``) lists the traces one ``autofit estimate`` read or
made, and the plan it printed against (device, budget, limit). It is keyed by everything the
command's answer depends on besides those traces: the whole spec, the same code fingerprints,
the knobs, the calibration file and this machine's memory. A second identical ``estimate``
finds the record, reads the traces it names and redoes the max-batch arithmetic on them,
without importing torch (about 1.5 s of a 2 s budget) or resolving the spec's import paths
(the named files are fingerprinted as for traces). Only for answers on the CPU, where the
device is known without torch (``device: cpu``, or ``auto`` with no GPU device node here).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autofit.candidate import Candidate
    from autofit.predict.device_model import DeviceModel
    from autofit.predict.estimates import MemoryEstimate
    from autofit.spec import ExperimentSpec

FORMAT = 2
"""Bumped when the entry layout changes (part of every key)."""
CACHE_DIR_NAME = ".trace_cache"
ENV_DIR = "AUTOFIT_CACHE_DIR"
TRACE_SECTIONS = ("model", "data", "loss", "optimizer", "step", "device")
"""Spec sections a trace depends on; the rest (budget, search, targets, output) does not."""


def _stat_line(path: str | os.PathLike[str]) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


_AUTOFIT_CODE: dict[str, str] = {}


def torch_version() -> str:
    """torch's version, read from its installed metadata: no ``import torch`` (1.3-2 s) on a
    cache hit. Falls back to importing it when the metadata is missing."""
    if "torch" not in _AUTOFIT_CODE:
        try:
            _AUTOFIT_CODE["torch"] = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            import torch

            _AUTOFIT_CODE["torch"] = torch.__version__
    return _AUTOFIT_CODE["torch"]


def autofit_code_fingerprint() -> str:
    """Size and mtime of every autofit source file (a trace runs autofit's step and builders)."""
    if "value" not in _AUTOFIT_CODE:
        root = Path(__file__).resolve().parent.parent
        lines = sorted(_stat_line(p) for p in root.rglob("*.py"))
        _AUTOFIT_CODE["value"] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return _AUTOFIT_CODE["value"]


def module_file(target: str, extra_path: list[str] | None = None) -> str | None:
    """The source file of the longest module prefix of ``pkg.mod.Name``, found without
    executing any module (the top-level finder, then each package's own directories)."""
    parts = target.split(".")
    try:
        found = None
        if extra_path:
            found = importlib.machinery.PathFinder.find_spec(parts[0], extra_path)
        found = found or importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    origin, locations = found.origin, found.submodule_search_locations
    for i in range(1, len(parts)):
        if not locations:
            break
        sub = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), list(locations))
        if sub is None:
            break
        origin, locations = sub.origin, sub.submodule_search_locations
    return origin


def _targets(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("_target_", "class_path") and isinstance(item, str):
                yield item
            else:
                yield from _targets(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _targets(item)


def spec_fingerprint(spec: ExperimentSpec) -> str:
    """Hash of the trace-relevant spec sections and of the files their import paths name."""
    raw = {k: v for k, v in (spec.raw or {}).items() if k in TRACE_SECTIONS}
    targets = set(_targets(raw))
    for name in (spec.loss, spec.step or ""):
        if "." in name:
            targets.add(name)
    extra = [str(Path(spec.source_path).resolve().parent)] if spec.source_path else []
    files = sorted({f for t in targets if (f := module_file(t, extra)) is not None})
    text = json.dumps({"spec": raw, "files": [_stat_line(f) for f in files]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def parallel_key(spec: ExperimentSpec) -> dict[str, Any]:
    """What a trace reads from ``parallel`` (strategy, world size, FSDP/DDP options); empty
    for a single process, whose keys stay as they were."""
    par = spec.parallel
    if par.strategy == "none":
        return {}
    return {"parallel": {"strategy": par.strategy, "world_size": spec.world_size,
                         "reshard_after_forward": par.reshard_after_forward,
                         "param_dtype": par.param_dtype, "reduce_dtype": par.reduce_dtype,
                         "gradient_as_bucket_view": par.gradient_as_bucket_view}}


@dataclass
class TraceCache:
    """Trace results on disk, and what this run got from them."""

    directory: Path
    hits: int = 0
    """Traces answered from the cache."""
    new: int = 0
    """Traces run and stored."""
    used: list[str] = field(default_factory=list)
    """Keys of the traces this run read or stored, in order, each once (an answer record)."""
    _spec_keys: dict[int, str] = field(default_factory=dict)

    def key(self, spec: ExperimentSpec, candidate: Candidate, model: DeviceModel) -> str:
        from autofit.predict.calibrate import allocator_limited
        from autofit.version import __version__

        spec_key = self._spec_key(spec)
        text = json.dumps({
            "format": FORMAT, "spec": spec_key, "candidate": candidate.to_dict(),
            "torch": torch_version(), "device_model": asdict(model),
            "autofit": [__version__, autofit_code_fingerprint()],
            **parallel_key(spec),
            # the allocator as the limit adds lines naming ops it sees and the trace does not
            # (``known_misreporting``); the budget limit's keys stay as they were
            **({"cpu_limit": "rlimit"} if allocator_limited(spec, model.kind) else {}),
        }, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _spec_key(self, spec: ExperimentSpec) -> str:
        """``spec_fingerprint`` of ``spec``, computed once per spec object."""
        spec_key = self._spec_keys.get(id(spec))
        if spec_key is None:
            spec_key = self._spec_keys[id(spec)] = spec_fingerprint(spec)
        return spec_key

    def _write(self, name: str, text: str) -> None:
        write_quietly(self.directory / name, text)

    def get(self, key: str) -> MemoryEstimate | None:
        from autofit.predict.estimates import MemoryEstimate

        path = self.directory / f"{key}.json"
        try:
            data = json.loads(path.read_text())
            est: MemoryEstimate
            if "strategy" in data:  # one rank of DDP / FSDP2
                from autofit.predict.distributed import RankEstimate

                est = RankEstimate.from_dict(data)
            else:
                est = MemoryEstimate.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        est.cached = True
        self.hits += 1
        self._use(key)
        return est

    def _use(self, key: str) -> None:
        if key not in self.used:
            self.used.append(key)

    def put(self, key: str, est: MemoryEstimate) -> None:
        self.new += 1
        self._use(key)
        self._write(f"{key}.json", json.dumps(est.to_dict(full=True)))

    def answer_key(self, spec: ExperimentSpec, question: dict[str, Any],
                   calibration_file: Path) -> str:
        """Key of an answer record: the whole spec and the files it names, the question
        (candidate, device, what was asked), the code, the calibration file and this
        machine's memory (an 'auto' budget's capacity)."""
        from autofit.device import cpu_total_bytes
        from autofit.version import __version__

        spec_key = self._spec_key(spec)
        text = json.dumps({
            "format": FORMAT, "spec": spec_key, "raw": spec.raw, "question": question,
            "torch": torch_version(), "autofit": [__version__, autofit_code_fingerprint()],
            "calibration": _stat_line(calibration_file.resolve()),
            "memory": cpu_total_bytes(),
        }, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get_answer(self, key: str) -> tuple[dict[str, Any], list[MemoryEstimate]] | None:
        """The record's plan and the traces it names (each a hit), or None when the record
        or any of its traces is missing."""
        try:
            record = json.loads((self.directory / f"estimate-{key}.json").read_text())
            plan, keys = dict(record["plan"]), [str(k) for k in record["traces"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        hits, found = self.hits, []
        for trace_key in keys:
            est = self.get(trace_key)
            if est is None:
                self.hits, self.used = hits, []  # a partial answer counts nothing
                return None
            found.append(est)
        return plan, found

    def put_answer(self, key: str, plan: dict[str, Any]) -> None:
        """Record the traces this run used (``used``) under the answer's key."""
        self._write(f"estimate-{key}.json",
                    json.dumps({"plan": plan, "traces": self.used}, default=str))

    def summary(self) -> str:
        return (f"trace cache: {self.hits} hit(s), {self.new} new trace(s) "
                f"({self.directory})")

    def to_dict(self) -> dict[str, Any]:
        return {"dir": str(self.directory), "hits": self.hits, "new": self.new}


_ACTIVE: ContextVar[TraceCache | None] = ContextVar("autofit_trace_cache", default=None)


def write_quietly(path: Path, text: str) -> None:
    """Write a cache file atomically, its directory made first; a cache that cannot be
    written is only a slower run, so an OSError is swallowed."""
    try:
        from autofit.files import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError:
        pass


def active() -> TraceCache | None:
    """The cache traces consult now (None: tracing uncached)."""
    return _ACTIVE.get()


def cache_for(setting: bool | str | os.PathLike[str] | None, out_dir: Path) -> TraceCache | None:
    """The cache an API call uses: ``False``/``None`` none; ``True`` ``$AUTOFIT_CACHE_DIR`` or
    ``<out_dir>/.trace_cache``; a path that directory."""
    if setting is None or setting is False:
        return None
    if setting is True:
        env = os.environ.get(ENV_DIR)
        return TraceCache(Path(env).expanduser() if env else Path(out_dir) / CACHE_DIR_NAME)
    return TraceCache(Path(setting).expanduser())


@contextlib.contextmanager
def using(cache: TraceCache | None) -> Iterator[TraceCache | None]:
    """Make ``cache`` the active one (an outer active cache stays when ``cache`` is None)."""
    if cache is None:
        yield active()
        return
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def device_without_torch(device: str) -> str | None:
    """The device ``resolve_device`` would pick, when it is known without importing torch:
    'cpu' asked for, or 'auto' on a machine with no GPU device node (NVIDIA, ROCm) or on macOS
    (no CUDA). None otherwise (the caller imports torch and asks)."""
    if device == "cpu":
        return "cpu"
    if device != "auto":
        return None
    if sys.platform == "darwin":
        return "cpu"
    if sys.platform.startswith("linux"):
        import glob

        if not glob.glob("/dev/nvidia*") and not os.path.exists("/dev/kfd"):
            return "cpu"
    return None


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/autofit/traces`` (``~/.cache/autofit/traces``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autofit" / "traces"


__all__ = ["CACHE_DIR_NAME", "ENV_DIR", "TraceCache", "active", "cache_for",
           "device_without_torch", "module_file", "spec_fingerprint", "torch_version",
           "user_cache_dir", "using"]
