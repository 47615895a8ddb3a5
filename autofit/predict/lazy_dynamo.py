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

- ``disable(fn, ...)`` returns ``fn`` wrapped so that it runs as is (eager ``disable`` only
  turns off a frame callback that is not set) until the compiler has loaded, and through the
  real ``disable(fn, ...)`` from then on;
- ``graph_break()`` does nothing.

Any other attribute (``torch.compile``, ``torch._dynamo.reset``, ``is_compiling``, a submodule
read as an attribute such as ``torch._dynamo.trace_rules`` in ``init_process_group``) runs the
real ``__init__`` into the same module object, once, under a lock and outside the caller's
dispatch modes. After that the module is the ordinary package.
Nothing changes when ``torch._dynamo`` is already imported, or with ``AUTOFIT_DEFER_DYNAMO=0``
in the environment (the benchmarks' "before" column).
"""

from __future__ import annotations

import functools
import importlib
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
_state: dict[str, Any] = {"module": None, "completing": False}


def _light_disable(fn: Callable[..., Any] | None = None, recursive: bool = True,
                   *args: Any, **kwargs: Any) -> Any:
    """``disable`` as eager mode runs it: ``fn`` itself while the compiler is deferred; once
    it has loaded, the real ``disable(fn, ...)``, built on the first call after that."""
    if fn is None:  # decorator form: disable(recursive=False)(fn)
        return lambda inner: _light_disable(inner, recursive, *args, **kwargs)
    real: list[Callable[..., Any]] = []

    def eager(*call_args: Any, **call_kwargs: Any) -> Any:
        if deferred():
            return fn(*call_args, **call_kwargs)
        if not real:
            real.append(sys.modules[NAME].disable(fn, recursive, *args, **kwargs))
        return real[0](*call_args, **call_kwargs)

    try:
        return functools.wraps(fn)(eager)
    except (AttributeError, TypeError):  # not a plain function: nothing to wrap
        return fn


def _graph_break(*args: Any, **kwargs: Any) -> None:
    return None


_LIGHT: dict[str, Callable[..., Any]] = {"disable": _light_disable, "graph_break": _graph_break}


def _asked_by_an_import() -> bool:
    """Whether the attribute lookup comes from ``from torch._dynamo import x`` (the import
    system's ``hasattr`` check before it imports submodule ``x`` itself)."""
    caller = sys._getframe(2)  # __getattr__ <- its caller (hasattr runs in C: no frame)
    return caller.f_code.co_name == "_handle_fromlist"


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
            if name.startswith("__"):
                raise AttributeError(name)
            if name in submodules:
                if _state["completing"] or _asked_by_an_import():
                    raise AttributeError(name)  # the import system loads the submodule
                complete()  # torch._dynamo.trace_rules.f(): the package as it would be
                return importlib.import_module(f"{NAME}.{name}")
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
        from torch.utils._python_dispatch import _disable_current_modes

        _state["completing"] = True
        try:  # outside any dispatch mode of the caller (a trace's FakeTensorMode, a tracker)
            with _disable_current_modes():
                module.__spec__.loader.exec_module(module)  # type: ignore[union-attr]
        finally:
            _state["completing"] = False
        module.__dict__.pop("__getattr__", None)
        return module
