"""An on-disk cache of traces: a second ``estimate``/``tune``/``profile`` traces nothing new.

A trace is a pure function of what it is keyed by:

* the spec sections a trace reads (``model``, ``data``, ``loss``, ``optimizer``, ``step``,
  ``device``; not the budget, the search ranges, the targets or the output);
* the candidate (batch, input size, precision, checkpoint segments, strategy of a list);
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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autofit.candidate import Candidate
    from autofit.predict.device_model import DeviceModel
    from autofit.predict.trace import MemoryEstimate
    from autofit.spec import ExperimentSpec

FORMAT = 1
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
    _spec_keys: dict[int, str] = field(default_factory=dict)

    def key(self, spec: ExperimentSpec, candidate: Candidate, model: DeviceModel) -> str:
        import torch

        from autofit.version import __version__

        spec_key = self._spec_keys.get(id(spec))
        if spec_key is None:
            spec_key = self._spec_keys[id(spec)] = spec_fingerprint(spec)
        text = json.dumps({
            "format": FORMAT, "spec": spec_key, "candidate": candidate.to_dict(),
            "torch": torch.__version__, "device_model": asdict(model),
            "autofit": [__version__, autofit_code_fingerprint()],
            **parallel_key(spec),
        }, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str) -> MemoryEstimate | None:
        from autofit.predict.trace import MemoryEstimate

        path = self.directory / f"{key}.json"
        try:
            data = json.loads(path.read_text())
            if "strategy" in data:  # one rank of DDP / FSDP2
                from autofit.predict.distributed import RankEstimate

                est = RankEstimate.from_dict(data)
            else:
                est = MemoryEstimate.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        est.cached = True
        self.hits += 1
        return est

    def put(self, key: str, est: MemoryEstimate) -> None:
        self.new += 1
        try:
            from autofit.files import write_atomic

            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self.directory / f"{key}.json", json.dumps(est.to_dict(full=True)))
        except OSError:
            pass  # a cache that cannot be written is only a slower run

    def summary(self) -> str:
        return (f"trace cache: {self.hits} hit(s), {self.new} new trace(s) "
                f"({self.directory})")

    def to_dict(self) -> dict[str, Any]:
        return {"dir": str(self.directory), "hits": self.hits, "new": self.new}


_ACTIVE: ContextVar[TraceCache | None] = ContextVar("autofit_trace_cache", default=None)


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


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/autofit/traces`` (``~/.cache/autofit/traces``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autofit" / "traces"


__all__ = ["CACHE_DIR_NAME", "ENV_DIR", "TraceCache", "active", "cache_for", "module_file",
           "spec_fingerprint", "user_cache_dir", "using"]
