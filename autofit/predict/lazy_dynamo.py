"""Import ``torch._dynamo`` only when something needs it: 1.2 s of a cold trace saved.

A fake-tensor trace never compiles, yet it pays for the whole ``torch._dynamo`` package
(about 1.2 s on a 2-core CPU, as long as ``import torch`` itself):

- ``FakeTensorMode.__init__`` runs ``import torch._dynamo.config`` to read two flags, and a
  submodule import executes its package's ``__init__`` first, which imports the compiler;
- every optimizer calls methods wrapped by ``torch._disable_dynamo``, which import
  ``torch._dynamo`` on first call to build ``torch._dynamo.disable(fn)``;
- ``Optimizer.step`` calls ``torch._dynamo.graph_break()`` in eager mode too.

``defer()`` registers the real ``torch._dynamo`` package *without running its* ``__init__``:
the module object has the real spec and ``__path__``, so ``torch._dynamo.config`` and other
submodules import as usual (cheaply). Two names are answered without the compiler, with
exactly what they do in eager mode when nothing is being compiled:

- ``disable(fn, ...)`` returns ``fn`` (eager ``disable`` only turns off a frame callback that
  is not set); the functions it was asked for are remembered;
- ``graph_break()`` does nothing.

Any other attribute (``torch.compile``, ``torch._dynamo.reset``, ``is_compiling`` ...) runs the
real ``__init__`` into the same module object, once, under a lock; the cached
``__dynamo_disable`` wrappers handed out before are then dropped, so those functions build
the real ``disable`` on their next call. After that the module is the ordinary package.
Nothing changes when ``torch._dynamo`` is already imported, or with ``AUTOFIT_DEFER_DYNAMO=0``
in the environment (the benchmarks' "before" column).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pkgutil
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

NAME = "torch._dynamo"
ENV = "AUTOFIT_DEFER_DYNAMO"

_lock = threading.RLock()
_state: dict[str, Any] = {"module": None, "completing": False, "disabled": []}


def _light_disable(fn: Callable[..., Any] | None = None, recursive: bool = True,
                   *args: Any, **kwargs: Any) -> Any:
    if fn is None:  # decorator form: disable(recursive=False)(fn)
        return lambda inner: _light_disable(inner, recursive)
    _state["disabled"].append(fn)
    return fn


def _graph_break(*args: Any, **kwargs: Any) -> None:
    return None


_LIGHT: dict[str, Callable[..., Any]] = {"disable": _light_disable, "graph_break": _graph_break}


def deferred() -> bool:
    """Whether ``torch._dynamo`` is registered but its ``__init__`` has not run."""
    module = _state["module"]
    return module is not None and "__getattr__" in module.__dict__


def defer() -> bool:
    """Register ``torch._dynamo`` without importing the compiler; False when it already is
    imported, this torch has none or ``AUTOFIT_DEFER_DYNAMO=0``, so nothing changed."""
    with _lock:
        if NAME in sys.modules or os.environ.get(ENV, "1") == "0":
            return False
        spec = importlib.util.find_spec(NAME)
        if spec is None or spec.loader is None or not spec.submodule_search_locations:
            return False
        module = importlib.util.module_from_spec(spec)
        submodules = frozenset(info.name for info in pkgutil.iter_modules(module.__path__))

        def __getattr__(name: str) -> Any:  # noqa: N807 - PEP 562 module attribute hook
            if name in submodules or name.startswith("__"):
                raise AttributeError(name)  # let the import system load the submodule
            if name in _LIGHT and not _state["completing"]:
                return _LIGHT[name]
            complete()
            try:
                return module.__dict__[name]
            except KeyError:
                raise AttributeError(f"module {NAME!r} has no attribute {name!r}") from None

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]
        _state["module"] = module
        sys.modules[NAME] = module
        import torch

        torch._dynamo = module  # type: ignore[attr-defined]
        return True


def complete() -> types.ModuleType | None:
    """Run the real ``torch._dynamo.__init__`` if ``defer()`` held it back (idempotent)."""
    with _lock:
        module = _state["module"]
        if module is None or _state["completing"] or "__getattr__" not in module.__dict__:
            return module
        _state["completing"] = True
        try:
            module.__spec__.loader.exec_module(module)  # type: ignore[union-attr]
        finally:
            _state["completing"] = False
        module.__dict__.pop("__getattr__", None)
        for fn in _state["disabled"]:  # torch._compile's cache of disable(fn): rebuilt now
            with contextlib.suppress(TypeError, AttributeError):
                vars(fn).pop("__dynamo_disable", None)
        _state["disabled"].clear()
        return module
