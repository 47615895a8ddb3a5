"""Memory accounting: one breakdown type, and the tracker that fills it.

``MemoryTracker`` is a ``TorchDispatchMode`` that sees every op's outputs, counts each
storage once when it first appears and uncounts it when the storage is freed (a weakref
finalizer on the storage). It works the same on fake tensors (prediction: no real memory)
and on real tensors (measurement, and the CPU budget that raises ``torch.OutOfMemoryError``).
Because prediction and measurement run the same step code under the same tracker, the two
compare field by field.

Categories are assigned after the fact from what each storage turned out to be: a parameter
or buffer, a gradient (``p.grad`` at the end of backward), optimizer state (in
``optimizer.state`` after the step), an activation (made in forward and still alive when
forward ends, i.e. saved for backward, or the input batch), or a temporary (everything else).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autofit.breakdown import MemoryBreakdown  # torch-free; re-exported here
from autofit.choices import Category, Phase

_aten = torch.ops.aten
_BLAS_OPS = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.matmul, _aten.linear,
             _aten._scaled_dot_product_efficient_attention,
             _aten._scaled_dot_product_flash_attention_for_cpu}


@dataclass
class Block:
    """One storage seen by the tracker."""

    nbytes: int
    alloc_seq: int
    phase: Phase
    step: int
    module: str
    shape: tuple[int, ...]
    dtype: str
    free_seq: int | None = None
    category: Category | None = None
    op: str = ""
    """``aten.op#i``: the op and output index that made it ("" when tracked from outside)."""
    corrected_bytes: int = 0
    """Bytes added by a probe calibration (included in ``nbytes``)."""


@dataclass
class ModuleRecord:
    name: str
    kind: str
    params_bytes: int = 0
    saved_bytes: int = 0
    """Bytes made in this module's forward that were still alive when forward ended."""


class BudgetExceeded(torch.OutOfMemoryError):  # type: ignore[misc]
    """Raised by the CPU budget backend; a real ``torch.OutOfMemoryError`` subclass."""


@dataclass
class TimelinePoint:
    seq: int
    live_bytes: int
    phase: Phase
    step: int
    module: str


class MemoryTracker(TorchDispatchMode):
    """Counts live storage bytes through dispatch; optionally enforces a byte limit.

    ``round_to`` rounds each storage up (512 emulates the CUDA caching allocator's blocks).
    ``limit_bytes`` raises ``BudgetExceeded`` (an OutOfMemoryError) the moment live bytes
    pass it, which is how the CPU backend emulates a device of that capacity.
    """

    def __init__(self, *, round_to: int = 1, limit_bytes: int | None = None,
                 record_timeline: bool = False,
                 corrections: dict[str, int] | None = None) -> None:
        super().__init__()
        self.corrections = dict(corrections or {})
        """``aten.op#i`` -> bytes to add to each new storage that output makes (a probe
        calibration: the real kernel allocates more than its fake kernel says)."""
        self.op_log: dict[str, list[int]] = {}
        """``"<phase>|aten.op#i"`` -> [new storages, their bytes (unrounded, uncorrected)]:
        the allocation log that a trace and a real run compare op by op."""
        self.round_to = max(1, round_to)
        self.limit_bytes = limit_bytes
        self.record_timeline = record_timeline
        self.blocks: list[Block] = []
        self._live: dict[int, Block] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_seq = 0
        self.peak_phase = Phase.SETUP
        self.peak_step = 0
        self.seq = 0
        self.phase = Phase.SETUP
        self.step = 0
        self.module_stack: list[str] = []
        self.timeline: list[TimelinePoint] = []
        self.phase_marks: list[tuple[int, Phase, int]] = []
        self._hooks: list[Any] = []
        self._module_names: dict[int, str] = {}
        self.modules: dict[str, ModuleRecord] = {}
        self.uses_blas = False
        """Whether the step ran matrix products (CUDA: cuBLAS allocates its workspace)."""

    # ----------------------------------------------------------------- bookkeeping
    def _round(self, nbytes: int) -> int:
        r = self.round_to
        return nbytes if r == 1 else max(r, (nbytes + r - 1) // r * r)

    def track(self, tensor: torch.Tensor, category: Category | str | None = None) -> None:
        """Count a tensor created outside the mode (parameters built before tracing)."""
        self._add(tensor, Category(category) if category else None)

    def _add(self, tensor: torch.Tensor, category: Category | None = None, op: str = "") -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse or other storage-less tensors
        key = StorageWeakRef(storage).cdata
        block = self._live.get(key)
        if block is not None:
            if category and not block.category:
                block.category = category
            return
        nbytes = storage.nbytes()
        extra = 0
        if op:
            entry = self.op_log.setdefault(f"{Phase(self.phase).value}|{op}", [0, 0])
            entry[0] += 1
            entry[1] += nbytes
            extra = self.corrections.get(op, 0) if self.corrections else 0
            nbytes = max(0, nbytes + extra)
        if nbytes == 0:
            return
        self.seq += 1
        module = self.module_stack[-1] if self.module_stack else ""
        block = Block(
            nbytes=self._round(nbytes), alloc_seq=self.seq, phase=self.phase, step=self.step,
            module=module, shape=tuple(tensor.shape), dtype=str(tensor.dtype).replace("torch.", ""),
            category=category, op=op, corrected_bytes=extra,
        )
        self._live[key] = block
        self.blocks.append(block)
        weakref.finalize(storage, self._free, key)
        self.live_bytes += block.nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_seq = self.seq
            self.peak_phase = self.phase
            self.peak_step = self.step
        if self.record_timeline:
            self.timeline.append(TimelinePoint(self.seq, self.live_bytes, self.phase, self.step, module))
        if self.limit_bytes is not None and self.live_bytes > self.limit_bytes:
            raise BudgetExceeded(
                f"CPU memory budget exceeded: {self.live_bytes} live tensor bytes > limit "
                f"{self.limit_bytes} (allocating {tuple(tensor.shape)} {block.dtype} in "
                f"{self.phase}{' of ' + module if module else ''})"
            )

    def _free(self, key: int) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return
        self.seq += 1
        block.free_seq = self.seq
        self.live_bytes -= block.nbytes
        if self.record_timeline:
            self.timeline.append(TimelinePoint(self.seq, self.live_bytes, self.phase, self.step, ""))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.uses_blas and func.overloadpacket in _BLAS_OPS:
            self.uses_blas = True
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        for index, leaf in enumerate(tree_leaves(out)):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf, op=f"{name}#{index}")
        return out

    # ----------------------------------------------------------------- phases and tags
    def set_phase(self, phase: Phase | str, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.phase = Phase(phase)
        self.phase_marks.append((self.seq, phase, self.step))

    def tag(self, tensors: Iterable[Any], category: Category | str) -> None:
        """Label the live storages of these tensors (grads, optimizer state, ...)."""
        category = Category(category)
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            try:
                key = StorageWeakRef(t.untyped_storage()).cdata
            except (RuntimeError, NotImplementedError):
                continue
            block = self._live.get(key)
            if block is not None:
                block.category = category
            else:
                self._add(t, category)

    def end_forward(self) -> None:
        """Blocks made in this forward and still alive are activations (saved for backward)."""
        for block in self._live.values():
            if block.phase in (Phase.FORWARD, Phase.DATA) and block.step == self.step \
                    and not block.category:
                block.category = Category.ACTIVATIONS
                if block.module in self.modules and block.phase == Phase.FORWARD:
                    self.modules[block.module].saved_bytes += block.nbytes if self.step == 1 else 0

    # ----------------------------------------------------------------- module attribution
    def attach(self, model: torch.nn.Module) -> None:
        """Attribute allocations to the innermost running module (forward hooks)."""
        for name, module in model.named_modules():
            self._module_names[id(module)] = name or "(model)"
            own = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            self.modules[name or "(model)"] = ModuleRecord(name or "(model)", type(module).__name__, own)

        def pre(module: torch.nn.Module, args: Any) -> None:
            name = self._module_names.get(id(module))
            if name is not None:
                self.module_stack.append(name)

        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            name = self._module_names.get(id(module))
            if name is not None and self.module_stack and self.module_stack[-1] == name:
                self.module_stack.pop()

        self._hooks.append(torch.nn.modules.module.register_module_forward_pre_hook(pre))
        self._hooks.append(torch.nn.modules.module.register_module_forward_hook(post, always_call=True))

    def detach_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # ----------------------------------------------------------------- results
    def live_at(self, seq: int) -> list[Block]:
        return [b for b in self.blocks
                if b.alloc_seq <= seq and (b.free_seq is None or b.free_seq > seq)]

    def breakdown(self) -> MemoryBreakdown:
        """Categories of the storages alive at the peak moment."""
        totals = dict.fromkeys(Category, 0)
        for block in self.live_at(self.peak_seq):
            totals[block.category or Category.TEMPORARIES] += block.nbytes
        return MemoryBreakdown(
            params_bytes=totals[Category.PARAMS],
            grads_bytes=totals[Category.GRADS],
            optimizer_state_bytes=totals[Category.OPTIMIZER_STATE],
            activations_bytes=totals[Category.ACTIVATIONS],
            temporaries_bytes=totals[Category.TEMPORARIES],
            peak_bytes=self.peak_bytes,
            peak_phase=self.peak_phase,
            peak_step=self.peak_step,
        )

    def tensors_at_peak(self, limit: int = 20) -> list[Block]:
        """The largest storages alive at the peak moment."""
        return sorted(self.live_at(self.peak_seq), key=lambda b: -b.nbytes)[:limit]


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


@dataclass
class PhaseHooks:
    """Callbacks the shared training step calls; the tracker implements them."""

    tracker: MemoryTracker | None = None

    def phase(self, name: Phase | str, step: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.set_phase(name, step)

    def forward_done(self) -> None:
        if self.tracker is not None:
            self.tracker.end_forward()

    def backward_done(self, model: torch.nn.Module) -> None:
        if self.tracker is not None:
            self.tracker.tag([p.grad for p in model.parameters() if p.grad is not None], Category.GRADS)

    def optimizer_done(self, optimizer: torch.optim.Optimizer) -> None:
        if self.tracker is not None:
            self.tracker.tag(state_tensors(optimizer), Category.OPTIMIZER_STATE)
