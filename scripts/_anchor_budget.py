"""The CPU memory budget the anchors (Lightning, accelerate) run under in ``bench_anchors.py``.

autofit's CPU trials enforce a budget with ``autofit.memory.MemoryTracker(limit_bytes=...)``:
a ``TorchDispatchMode`` that counts live tensor storage bytes (parameters and buffers tracked
first, then every op output until its storage is freed) and raises ``BudgetExceeded`` (a
``torch.OutOfMemoryError``) the moment the count passes the limit. The anchors get exactly
that accounting, in their own process, around their own search.

What changes is only the error's text. Lightning's ``is_oom_error`` and accelerate's
``should_reduce_batch_size`` recognise an out-of-memory error by type (``RuntimeError``, one
argument) and message substring, not by ``torch.OutOfMemoryError``; the tracker's own message
("CPU memory budget exceeded: ...") matches neither, so an anchor would treat it as a crash.
``AllocatorBudgetExceeded`` is raised instead. It is the same event (an allocation that would
take live memory past the budget is refused) and it says so in the words PyTorch's CPU
allocator uses when it cannot allocate (c10/core/impl/alloc_cpu.cpp, "DefaultCPUAllocator:
can't allocate memory: you tried to allocate N bytes"), followed by the budget, so both
anchors' checks match the substring they look for in real CPU OOMs:

* ``lightning.pytorch.utilities.memory.is_out_of_cpu_memory``:
  ``"DefaultCPUAllocator: can't allocate memory" in exception.args[0]``;
* ``accelerate.utils.memory.should_reduce_batch_size``: the same substring.

It is still a ``BudgetExceeded`` / ``torch.OutOfMemoryError`` / ``RuntimeError`` subclass,
with a single string argument. No anchor code is patched.

Two refinements make the budget behave like a device of that size for code that keeps
running after an OOM (the anchors retry in the same process; autofit's trials end there):
the refused storage is uncounted when the error is raised (an allocator that refuses hands
out nothing), and ``outside_budget()`` marks host-side work (data loading, checkpoint files)
that would not be device memory on a GPU; ``to_device`` makes the counted device copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from autofit.memory import BudgetExceeded, MemoryTracker

ALLOCATOR_PREFIX = "DefaultCPUAllocator: can't allocate memory"


class AllocatorBudgetExceeded(BudgetExceeded):  # type: ignore[misc]
    """The budget refused an allocation; message in the CPU allocator's words."""


class AllocatorBudgetTracker(MemoryTracker):
    """``MemoryTracker`` with a limit whose OOM reads like the CPU allocator's."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(limit_bytes=limit_bytes)
        self.ooms = 0

    def _add(self, tensor: torch.Tensor, category: Any = None, op: str = "") -> None:
        try:
            super()._add(tensor, category, op=op)
        except AllocatorBudgetExceeded:
            raise
        except BudgetExceeded as exc:
            self.ooms += 1
            nbytes = self._refuse(tensor)
            raise AllocatorBudgetExceeded(
                f"{ALLOCATOR_PREFIX}: you tried to allocate {nbytes} bytes; budget of "
                f"{self.limit_bytes} bytes exceeded ({self.live_bytes} live tensor bytes "
                f"counted by autofit's MemoryTracker, allocating {tuple(tensor.shape)} "
                f"{str(tensor.dtype).replace('torch.', '')})"
            ) from exc

    def _refuse(self, tensor: torch.Tensor) -> int:
        """Uncount the storage that went over the limit: a refused allocation never exists.

        ``MemoryTracker`` sees an op's output after the op made it, so the storage that
        crossed the limit is counted, and stays counted while the exception's traceback
        keeps it alive. An allocator that refuses an allocation hands out nothing: live
        memory stays below the limit, and small allocations made while the error is being
        handled (an OOM handler's bookkeeping) still succeed. Returns the refused bytes.
        """
        try:
            storage = tensor.untyped_storage()
            key = StorageWeakRef(storage).cdata
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return 0
        block = self._live.pop(key, None)
        if block is not None:
            self.seq += 1
            block.free_seq = self.seq
            self.live_bytes -= block.nbytes
        return nbytes


def track_module(tracker: MemoryTracker, module: nn.Module) -> None:
    """Count parameters and buffers first, as autofit's CPU trials do."""
    for p in module.parameters():
        tracker.track(p, "params")
    for b in module.buffers():
        tracker.track(b, "params")


@contextmanager
def budget(limit_bytes: int, module: nn.Module | None = None) -> Iterator[AllocatorBudgetTracker]:
    """Run the body under the budget (``module``'s parameters and buffers counted first)."""
    tracker = AllocatorBudgetTracker(limit_bytes)
    if module is not None:
        track_module(tracker, module)
    with tracker:
        yield tracker


@contextmanager
def outside_budget() -> Iterator[None]:
    """Host-side work, which on a GPU is not device memory: nothing made here is counted.

    The anchors' data loading (making and collating samples; Lightning also prefetches the
    next batch) and Lightning's checkpoint save/restore around its search run on the host
    when the device is a GPU. Frees are still counted (the finalizers do not depend on the
    mode). The batch's copy to the device is made inside the budget (see ``to_device``).
    """
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def to_device(batch: Any) -> Any:
    """The host-to-device copy of a batch, inside the budget (on CPU: a clone)."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(b) for b in batch)
    return batch


def anchors_recognise(exc: BaseException) -> dict[str, Any]:
    """What each installed anchor's OOM check says about ``exc`` (None: not installed)."""
    out: dict[str, Any] = {}
    try:
        from lightning.pytorch.utilities.memory import is_oom_error

        out["lightning"] = bool(is_oom_error(exc))
    except ImportError:
        out["lightning"] = None
    try:
        from accelerate.utils.memory import should_reduce_batch_size

        out["accelerate"] = bool(should_reduce_batch_size(exc))
    except ImportError:
        out["accelerate"] = None
    return out
