"""autofit: find the largest PyTorch training configuration that fits, proven by real steps."""

from autofit.candidate import Candidate
from autofit.errors import AutofitError, SpecError
from autofit.memory import MemoryBreakdown
from autofit.spec import ExperimentSpec, load_spec

__version__ = "0.1.0"

__all__ = [
    "AutofitError",
    "Candidate",
    "ExperimentSpec",
    "MemoryBreakdown",
    "SpecError",
    "load_spec",
]
