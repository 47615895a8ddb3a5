"""autofit: find the largest PyTorch training configuration that fits, proven by real steps.

The pipeline has four stages, one package each: ``predict`` (trace the step on fake
tensors), ``trials`` (run real steps in a fresh process), ``search`` (pin the answer with as
few trials as the prediction allows) and ``export`` (the hand-over files). ``autofit.api``
holds the functions below; the ``autofit`` command (``autofit.cli``) only wraps them.

    import autofit
    result = autofit.tune("exp.yaml", on_event=print)
    print(result.best.result.candidate)
"""

import sys
import types
from typing import TYPE_CHECKING, Any

from autofit.choices import LimitKind, Objective, Phase, Precision, Purpose, Strategy
from autofit.errors import (
    AutofitError,
    BuildError,
    OutputDirError,
    SearchError,
    SpecError,
    TrialError,
    TuneFailed,
    TuneInterrupted,
)

# The rest is imported on first use (PEP 562), so that ``import autofit.cli`` (``autofit
# --help``, ``autofit validate`` of a bad spec) does not pay for importing torch.
_LAZY = {
    "autofit.api": ("EstimateResult", "ProfileResult", "as_spec", "candidate_for", "estimate",
                    "export", "load_tuned", "profile", "trial", "tune"),
    "autofit.candidate": ("Candidate", "Setting"),
    "autofit.export.tuned": ("TunedConfig",),
    "autofit.breakdown": ("MemoryBreakdown",),
    "autofit.search.events": ("EventHandler", "Note", "TrialFinished", "TrialStarted",
                              "TuneEvent"),
    "autofit.search.results": ("TrialRecord", "TuneResult"),
    "autofit.spec": ("ExperimentSpec", "load_spec"),
    "autofit.trials.result": ("TrialResult", "TrialStatus"),
    "autofit.version": ("__version__",),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from autofit.api import (
        EstimateResult,
        ProfileResult,
        as_spec,
        candidate_for,
        estimate,
        export,
        load_tuned,
        profile,
        trial,
        tune,
    )
    from autofit.breakdown import MemoryBreakdown
    from autofit.candidate import Candidate, Setting
    from autofit.export.tuned import TunedConfig
    from autofit.search.events import EventHandler, Note, TrialFinished, TrialStarted, TuneEvent
    from autofit.search.results import TrialRecord, TuneResult
    from autofit.spec import ExperimentSpec, load_spec
    from autofit.trials.result import TrialResult, TrialStatus
    from autofit.version import __version__


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'autofit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


class _Package(types.ModuleType):
    """``autofit.export`` is the function, as before the lazy imports: importing the
    subpackage of the same name (which sets the attribute to the module) must not replace it."""

    @property
    def export(self) -> Any:
        from autofit.api import export

        return export

    @export.setter
    def export(self, value: Any) -> None:
        pass  # the subpackage stays importable as ``autofit.export.<module>`` (sys.modules)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "AutofitError",
    "BuildError",
    "Candidate",
    "EstimateResult",
    "EventHandler",
    "ExperimentSpec",
    "LimitKind",
    "MemoryBreakdown",
    "Note",
    "Objective",
    "OutputDirError",
    "Phase",
    "Precision",
    "ProfileResult",
    "Purpose",
    "SearchError",
    "Setting",
    "SpecError",
    "Strategy",
    "TrialError",
    "TrialFinished",
    "TrialRecord",
    "TrialResult",
    "TrialStarted",
    "TrialStatus",
    "TuneEvent",
    "TuneFailed",
    "TuneInterrupted",
    "TuneResult",
    "TunedConfig",
    "__version__",
    "as_spec",
    "candidate_for",
    "estimate",
    "export",
    "load_spec",
    "load_tuned",
    "profile",
    "trial",
    "tune",
]
