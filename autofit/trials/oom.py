"""Is this exception an out-of-memory, and which limit produced it?

The primary test is the exception type (``torch.OutOfMemoryError``, raised by the CUDA
caching allocator and by the CPU budget). The CPU allocator under ``RLIMIT_AS`` raises a plain
RuntimeError, so its messages are matched here and only here.
"""

from __future__ import annotations

import os

from autofit.choices import LimitKind


def is_oom_error(exc: BaseException) -> tuple[bool, LimitKind | None]:
    """(is it an OOM, the limit that produced it; None = the limit the trial ran under)."""
    import torch

    from autofit.memory import BudgetExceeded

    if isinstance(exc, BudgetExceeded):
        return True, LimitKind.CPU_BUDGET
    if isinstance(exc, torch.OutOfMemoryError):
        return True, None  # the CUDA allocator: under the fraction cap or the whole card
    if isinstance(exc, MemoryError):
        return True, LimitKind.RLIMIT
    if isinstance(exc, RuntimeError):
        text = str(exc)
        # DefaultCPUAllocator (c10/core/impl/alloc_cpu.cpp) and oneDNN primitive creation
        # are what RLIMIT_AS produces on CPU (DESIGN.md, "Pitfalls").
        if "DefaultCPUAllocator: can't allocate memory" in text or (
            "could not create a primitive" in text and os.environ.get("AUTOFIT_RLIMIT")
        ):
            return True, LimitKind.RLIMIT
    return False, None
