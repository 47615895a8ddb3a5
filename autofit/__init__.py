"""autofit: find the largest PyTorch training configuration that fits, proven by real steps.

The pipeline has four stages, one package each: ``predict`` (trace the step on fake
tensors), ``trials`` (run real steps in a fresh process), ``search`` (pin the answer with as
few trials as the prediction allows) and ``export`` (the hand-over files). ``autofit.api``
holds the functions below; the ``autofit`` command (``autofit.cli``) only wraps them.

    import autofit
    result = autofit.tune("exp.yaml", on_event=print)
    print(result.best.result.candidate)
"""

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
from autofit.candidate import Candidate, Setting
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
from autofit.export.tuned import TunedConfig
from autofit.memory import MemoryBreakdown
from autofit.search.events import EventHandler, Note, TrialFinished, TrialStarted, TuneEvent
from autofit.search.results import TrialRecord, TuneResult
from autofit.spec import ExperimentSpec, load_spec
from autofit.trials.result import TrialResult, TrialStatus
from autofit.version import __version__

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
