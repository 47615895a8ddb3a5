"""Data parallelism on one rank: DDP and FSDP2, for predictions and for real rank trials.

Memory is planned per rank. What a rank holds depends on the strategy:

* ``fsdp`` (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer
  state are sharded over the world size; each unit's parameters are all-gathered for its
  forward and backward and freed again (``UntypedStorage.resize_(0)``). The units are the
  blocks that checkpointing finds (``autofit.build.find_blocks``), then the root.
  Predicted by tracing one rank on a fake process group of size N (no real memory, any N).
* ``ddp``: every rank holds the whole model; DDP's gradient buckets add one copy of the
  gradient bytes, alive from construction on, unless ``gradient_as_bucket_view`` makes the
  gradients views into the buckets. DDP does not construct under ``FakeTensorMode``, so the
  prediction replays the single-process trace with the buckets added (``ddp_peak``).

``track_resizes(tracker)`` makes a ``MemoryTracker`` follow storages resized in place (FSDP2
frees and re-allocates unsharded parameters that way; a tracker that misses it counts them
twice).

``settled_collectives()`` makes a real gloo rank's memory follow the step's order: gloo's worker
thread keeps its own reference to a collective's tensors for a moment after the caller's wait
returns, so a buffer the step has dropped can stay alive into the next allocations (measured:
an all-gather output, one FSDP unit's unsharded parameters, in about a quarter of the calls).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from autofit.choices import Category
from autofit.errors import BuildError

if TYPE_CHECKING:
    from autofit.memory import MemoryTracker
    from autofit.spec import ExperimentSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEASURE_FROM_STEP = 2
"""FSDP2 under an outer FakeTensorMode counts full-size DTensor temporaries once in the first
optimizer step: per-rank peaks are read from this step on, in predictions and trials alike."""


@dataclass(frozen=True)
class RankPlan:
    """One strategy at one world size, and the options it runs with."""

    strategy: str = "none"
    world_size: int = 1
    reshard_after_forward: bool = True
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    gradient_as_bucket_view: bool = False

    @classmethod
    def from_spec(cls, spec: ExperimentSpec, strategy: str | None = None,
                  world_size: int | None = None) -> RankPlan:
        par = spec.parallel
        return cls(strategy=strategy or par.strategy, world_size=world_size or spec.world_size,
                   reshard_after_forward=par.reshard_after_forward, param_dtype=par.param_dtype,
                   reduce_dtype=par.reduce_dtype,
                   gradient_as_bucket_view=par.gradient_as_bucket_view)

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    def label(self) -> str:
        return "single process" if not self.distributed else f"{self.strategy} x{self.world_size}"


def with_plan(spec: ExperimentSpec, strategy: str, world_size: int | None = None) -> ExperimentSpec:
    """The spec with one strategy (and world size) chosen from its ``parallel`` section."""
    par = replace(spec.parallel, strategies=(strategy,),
                  world_size=world_size or spec.parallel.world_size)
    return replace(spec, parallel=par)


def with_world_size(spec: ExperimentSpec, world_size: int) -> ExperimentSpec:
    """The spec run at ``world_size`` ranks (its strategies unchanged; ``raw`` stays the
    user's): what a machine with fewer GPUs than the job's ranks verifies instead."""
    return replace(spec, parallel=replace(spec.parallel, world_size=world_size))


_PLANNED: dict[tuple[int, str], tuple[Any, Any]] = {}


def spec_for(spec: ExperimentSpec, candidate: Any) -> ExperimentSpec:
    """The spec ``candidate`` runs with: its own strategy (``Candidate.strategy``, set when
    ``parallel.strategy`` lists several), else ``spec`` itself.

    The derived specs are kept (one per spec and strategy), so that repeated traces of one
    search see the same object (the trace cache keys its spec fingerprints by identity).
    """
    strategy = getattr(candidate, "strategy", "")
    if not strategy or spec.parallel.strategies == (strategy,):
        return spec
    key = (id(spec), strategy)
    held = _PLANNED.get(key)
    if held is None or held[0] is not spec:
        if len(_PLANNED) > 64:
            _PLANNED.clear()
        held = _PLANNED[key] = (spec, with_plan(spec, strategy))
    return held[1]


# --------------------------------------------------------------------------- resize tracking

_TRACKERS: list[MemoryTracker] = []
_ORIGINAL_RESIZE: Any = None


class _StorageView:
    """What ``MemoryTracker._add`` reads from a tensor, for a bare storage."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.shape = (storage.nbytes(),)
        self.dtype = torch.uint8

    def untyped_storage(self) -> Any:
        return self._storage


def _resize(storage: Any, size: int) -> Any:
    old = storage.nbytes()
    out = _ORIGINAL_RESIZE(storage, size)
    if _TRACKERS and storage.nbytes() != old:
        key = StorageWeakRef(storage).cdata
        for tracker in list(_TRACKERS):
            block = tracker._live.get(key)
            category = block.category if block is not None else None
            if block is not None:
                tracker._free(key)
            if storage.nbytes():  # FSDP2: an unsharded parameter, all-gathered again
                tracker._add(_StorageView(storage), category or Category.PARAMS)  # type: ignore[arg-type]
                resized = tracker.__dict__.setdefault("resized_seqs", set())
                resized.add(tracker.seq)
    return out


@contextlib.contextmanager
def track_resizes(tracker: MemoryTracker) -> Iterator[None]:
    """While open, ``UntypedStorage.resize_`` frees and re-allocates in ``tracker``."""
    global _ORIGINAL_RESIZE
    if _ORIGINAL_RESIZE is None:
        _ORIGINAL_RESIZE = torch.UntypedStorage.resize_
        torch.UntypedStorage.resize_ = _resize  # type: ignore[method-assign,assignment]
    _TRACKERS.append(tracker)
    try:
        yield
    finally:
        _TRACKERS.remove(tracker)


def rank_tracker(**kwargs: Any) -> MemoryTracker:
    """A ``MemoryTracker`` for one rank: a DTensor counts as its local shard.

    A tracker sees DTensor ops at the DTensor level only (the local ops run inside its
    dispatch). A real DTensor's own storage is empty, a fake one's is global-sized: both are
    wrong, the local tensor is what the rank holds.
    """
    from autofit.memory import MemoryTracker

    class RankTracker(MemoryTracker):
        def _add(self, tensor: Any, category: Any = None, *args: Any, **kw: Any) -> None:
            if type(tensor).__name__ == "DTensor":
                tensor = tensor._local_tensor
            super()._add(tensor, category, *args, **kw)

    return RankTracker(**kwargs)


# --------------------------------------------------------------------------- wrapping


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and type(t).__name__ == "DTensor" else t


def shard_units(model: nn.Module, blocks_path: Any) -> list[nn.Module]:
    """The modules ``fully_shard`` is applied to before the root: the blocks checkpointing
    finds (inside checkpointed segments too), or the layers of an ``nn.Sequential``."""
    from autofit.build import CheckpointedSegment, CheckpointedSequential, find_blocks

    segments = [m for m in model.modules() if isinstance(m, CheckpointedSegment)]
    if segments:
        return [b for seg in segments for b in seg.blocks]
    body = model.body if isinstance(model, CheckpointedSequential) else model
    if isinstance(body, nn.Sequential) and not blocks_path:
        return [m for m in body if any(True for _ in m.parameters())]
    try:
        stages = find_blocks(model, blocks_path)
    except BuildError:
        return []
    return [block for _, stage in stages for block in stage]  # type: ignore[attr-defined]


def fsdp_wrapper(plan: RankPlan, spec: ExperimentSpec, mesh: Any) -> Any:
    """``TrainingJob(wrap=...)``: ``fully_shard`` on each block, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def wrap(model: nn.Module) -> nn.Module:
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": plan.reshard_after_forward}
        if plan.param_dtype or plan.reduce_dtype:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=DTYPES.get(plan.param_dtype or ""),
                reduce_dtype=DTYPES.get(plan.reduce_dtype or plan.param_dtype or ""))
        for unit in shard_units(model, spec.model.blocks):
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        return model

    return wrap


def ddp_wrapper(plan: RankPlan, device: torch.device) -> Any:
    """``TrainingJob(wrap=...)``: the model in ``DistributedDataParallel`` (real ranks only)."""
    from torch.nn.parallel import DistributedDataParallel

    def wrap(model: nn.Module) -> nn.Module:
        ids = [device.index or 0] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids,
                                       gradient_as_bucket_view=plan.gradient_as_bucket_view)

    return wrap


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[Any]:
    """A fake process group of ``world_size`` ranks in this process (rank 0); yields its
    1-D device mesh. Collectives return at once and move nothing."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise BuildError("a process group is already initialised in this process")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))  # outside FakeTensorMode: it reads ranks
    finally:
        dist.destroy_process_group()


SETTLE_TIMEOUT_S = 1.0
"""The longest a collective waits for gloo's worker thread to let go of its tensors."""
SETTLED_COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                       "reduce_scatter_tensor")


def _use_counts(tensors: list[torch.Tensor]) -> list[int]:
    return [torch._C._storage_Use_Count(t.untyped_storage()._cdata) for t in tensors]


def _settle(tensors: list[torch.Tensor], before: list[int], born: list[Any],
            stats: dict[str, int]) -> None:
    """Wait (at most ``SETTLE_TIMEOUT_S``) until no storage of ``tensors`` has more users than
    ``before``, its count before the collective (the backend's work, which holds views of them,
    is gone), and every block in ``born`` is freed: storages a tracker first saw inside the
    collective (gloo's reduce-scatter stages through a flat buffer its worker allocates and the
    caller's ``wait()`` splits; the worker frees it with the work)."""

    def released() -> bool:
        return (all(now <= was for now, was in zip(_use_counts(tensors), before, strict=True))
                and all(block.free_seq is not None for block in born))

    stats["calls"] = stats.get("calls", 0) + 1
    if released():
        return
    stats["waited"] = stats.get("waited", 0) + 1
    deadline = time.perf_counter() + SETTLE_TIMEOUT_S
    while time.perf_counter() < deadline:
        time.sleep(0.0002)
        if released():
            return
    stats["unsettled"] = stats.get("unsettled", 0) + 1


@contextlib.contextmanager
def settled_collectives(*, tracker: MemoryTracker | None = None) -> Iterator[dict[str, int]]:
    """While open, the FSDP2 collectives (``torch.distributed.all_gather_single`` and
    ``reduce_scatter_single``, and their ``*_tensor`` forms) return, or their work's ``wait()``
    returns, only once the backend holds none of their tensors any more, and (with ``tracker``)
    once every storage the tracker first saw during the collective is freed: a tensor the step
    drops after the collective is then freed when the step drops it, as in-step accounting (and
    the prediction) assume. Used by CPU rank trials; yields the counts of calls, of those
    that had to wait and of those still held after ``SETTLE_TIMEOUT_S``."""
    import torch.distributed as dist

    stats: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in SETTLED_COLLECTIVES if hasattr(dist, name)}

    class SettlingWork(dist.Work):  # type: ignore[misc]
        def __init__(self, work: Any, tensors: list[torch.Tensor], before: list[int],
                     mark: int) -> None:
            super().__init__()
            self._work, self._tensors, self._before, self._mark = work, tensors, before, mark

        def wait(self, timeout: Any = None) -> bool:
            if self._work is None:
                return True
            done = self._work.wait() if timeout is None else self._work.wait(timeout)
            self._work = None  # drop the caller's reference first: only the worker's is left
            born = tracker.blocks[self._mark:] if tracker is not None else []
            _settle(self._tensors, self._before, born, stats)
            self._tensors = []
            return bool(done) if done is not None else True

        def is_completed(self) -> bool:
            return self._work is None or bool(self._work.is_completed())

    def settling(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            before = _use_counts(tensors)
            mark = len(tracker.blocks) if tracker is not None else 0
            asked_async = bool(kwargs.pop("async_op", False))
            # the backend gets fresh views: whatever it keeps of them, even the tensor objects
            # themselves, then counts as a user of the storage until it lets go
            args = tuple(a.view(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.view(v.shape) if isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
            work = original(*args, async_op=True, **kwargs)
            del args, kwargs
            if work is None:  # not a member of the group: nothing ran
                return None
            settling_work = SettlingWork(work, tensors, before, mark)
            del work
            if asked_async:
                return settling_work
            settling_work.wait()
            return None

        return call

    for name, original in originals.items():
        setattr(dist, name, settling(original))
    try:
        yield stats
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def init_rank_group(rank: int, world_size: int, store_path: str, device: torch.device,
                    timeout_s: float) -> Any:
    """Join the real process group of a rank trial (gloo on CPU, NCCL on CUDA)."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=store,
                            timeout=datetime.timedelta(seconds=max(1.0, timeout_s)))
    return init_device_mesh(device.type, (world_size,))


# --------------------------------------------------------------------------- the DDP bucket model


def ddp_bucket_bytes(model: nn.Module) -> int:
    """Bytes of DDP's gradient buckets: one slot per trainable parameter, in its dtype."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def replay_peak(tracker: MemoryTracker, *, from_step: int = 1, extra_bytes: int = 0,
                drop: Category | None = None) -> tuple[int, int]:
    """(peak live bytes, sequence number) over the tracker's blocks, counting only events of
    step >= ``from_step``, with ``extra_bytes`` alive throughout and blocks of category
    ``drop`` left out (DDP with bucket views: the gradients live in the buckets)."""
    delta: dict[int, int] = {}
    for block in tracker.blocks:
        if drop is not None and block.category == drop:
            continue
        delta[block.alloc_seq] = delta.get(block.alloc_seq, 0) + block.nbytes
        if block.free_seq is not None:
            delta[block.free_seq] = delta.get(block.free_seq, 0) - block.nbytes
    start = min((seq for seq, _, step in tracker.phase_marks if step >= from_step),
                default=0)
    live, peak, peak_seq = extra_bytes, 0, 0
    for seq in sorted(delta):
        live += delta[seq]
        if seq > start and delta[seq] > 0 and live > peak:
            peak, peak_seq = live, seq
    return peak, peak_seq


def breakdown_at(tracker: MemoryTracker, seq: int, *, extra: dict[str, int] | None = None,
                 drop: Category | None = None) -> dict[str, int]:
    """Bytes by category alive at ``seq`` (plus ``extra`` categories)."""
    totals = {c.value: 0 for c in Category}
    for block in tracker.live_at(seq):
        if drop is not None and block.category == drop:
            continue
        totals[(block.category or Category.TEMPORARIES).value] += block.nbytes
    for key, value in (extra or {}).items():
        totals[key] = totals.get(key, 0) + value
    return totals


# --------------------------------------------------------------------------- reference formulas


def deepspeed_zero_bytes(params: int, world_size: int, stage: int, *,
                         cpu_offload: bool = False) -> int:
    """DeepSpeed's own per-GPU estimate (``estimate_zero2/3_model_states_mem_needs``, no
    offload): model states only, activations left out.

    ZeRO-2: 2 bytes (fp16 params) x P + 16 bytes x P / N (grads, fp32 master + Adam states).
    ZeRO-3: 18 bytes x P / N, plus the largest layer's fp16 params (taken as 0 here).
    """
    if stage == 2:
        return int(2 * params + (0 if cpu_offload else 16 * params / world_size))
    if stage == 3:
        return int(18 * params / world_size)
    raise ValueError(f"ZeRO stage {stage}: only 2 and 3 have a formula")


def env_plan() -> tuple[str, int] | None:
    """The strategy and world size a launcher script set (``AUTOFIT_PARALLEL_STRATEGY``,
    ``WORLD_SIZE``), for a training script that reads them."""
    strategy = os.environ.get("AUTOFIT_PARALLEL_STRATEGY")
    if not strategy:
        return None
    return strategy, int(os.environ.get("WORLD_SIZE", "1"))
