"""Probe calibration: where a fake kernel allocates less (or more) than its real kernel.

A trace is exact wherever the fake (meta) kernels allocate what the real kernels do. Where
they do not (``aten.mkldnn_rnn_layer``'s fake kernel returns an empty workspace; the real
one returns megabytes), the trace is silently wrong. A real run of the same step under the
same ``MemoryTracker`` records the same allocation log (``MemoryTracker.op_log``: new
storages and their bytes per phase, op and output index), so the two compare op by op:

* each op output whose real bytes per call differ from the traced bytes per call gets a
  correction, bytes per call as an affine function of ``x = batch x size units`` (tokens:
  the sequence length; images: side squared; 1 without a size axis), fitted over the probes
  of one setting (a single probe gives a proportional correction);
* the corrected trace adds those bytes to every storage that output makes, so lifetimes,
  phases, the breakdown and the per-stretch batch lines all see them;
* what the corrected trace still misses of the probe's measured peak, beyond
  ``UNEXPLAINED_THRESHOLD``, is reported as unexplained and added as a measured slope
  (bytes per unit of ``x``);
* a CPU probe run with the allocator view (``AllocatorView``: ``torch.profiler`` with
  ``profile_memory=True``) also measures what the CPU allocator held at its peak, scratch that
  never passes dispatch included (oneDNN convolution). Its excess over the tracker's peak is
  fitted over ``x`` (``scratch_bytes``: one probe gives a constant, as the scratch follows the
  layers more than the batch; two or more an affine fit), named by the op running at the peak,
  and added to predictions whose limit is the real allocator (``cpu_limit: rlimit``); the
  ``budget`` limit counts tracked tensor bytes, which the scratch never was.

``using(store)`` makes every ``predict.trace.estimate`` in its scope apply the store's
corrections (the trace cache keys corrected traces apart). A store is plain JSON: it lives
in ``results.json`` and ``calibration.json`` next to it, so ``--resume``, ``export`` and the
targets use it.

What a calibration reads of its traces (``TracedLog``: the peak, BLAS use, the allocation
log; for a corrected trace the bytes each corrected op adds at the peak) is kept in the
active trace cache (``oplog/<key>.json`` in its directory, keyed as the trace cache keys a
trace, plus the corrections; a subdirectory, so counts of the cache's trace files leave them out), so a repeated setting calibrates without tracing, and without torch.
``PendingTrace`` traces it in a thread while the probe trial runs in its own process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autofit.candidate import Candidate
from autofit.predict.device_model import DeviceModel
from autofit.spec import ExperimentSpec

MB = 1e6
UNEXPLAINED_THRESHOLD = 0.03
"""|measured - corrected trace| / measured above which the probe's total is not explained."""
MIN_OP_FRACTION = 0.002
"""An op's per-step mismatch below this fraction of the measured peak is noise, not a bug."""
MIN_PER_CALL_BYTES = 1024

KNOWN_MISREPORTING = {
    "aten.mkldnn_rnn_layer": "CPU oneDNN LSTM: the fake kernel returns an empty workspace",
    "aten._cudnn_rnn": "cuDNN RNN: the reserve/workspace depends on the cuDNN algorithm",
}
"""Ops whose fake kernels are known to misreport, named by ``autofit estimate`` without a
probe (keys are overload packets, as in ``MemoryTracker.op_log``). CPU GRUs run as plain
ATen ops (no ``mkldnn_rnn_layer``) and are traced exactly."""
ALLOCATOR_SCRATCH = {
    "aten.convolution": "CPU oneDNN convolution: its scratch never passes dispatch, so the "
                        "allocator holds more than the trace at the peak (measured +1 to +3% "
                        "in bench_estimate) and cpu_limit: rlimit counts it",
}
"""Ops whose kernels allocate scratch the tracker cannot see; named only where the limit is
the CPU allocator itself (``cpu_limit: rlimit``)."""


def _mb(nbytes: float) -> str:
    """Decimal megabytes, as the issue and ``autofit trial`` speak of them (kB when small)."""
    return f"{nbytes / MB:.1f} MB" if abs(nbytes) >= 0.1 * MB else f"{nbytes / 1e3:.1f} kB"


def _mb2(nbytes: float) -> str:
    return f"{nbytes / MB:.2f} MB" if abs(nbytes) >= 0.01 * MB else f"{nbytes / 1e3:.2f} kB"


def size_units(spec: ExperimentSpec, candidate: Candidate) -> int:
    """Per-sample size units of a candidate: tokens, pixels (side squared), or 1."""
    size = candidate.input_size
    if not size:
        return 1
    return size * size if spec.data.kind == "image" else size


def x_of(spec: ExperimentSpec, candidate: Candidate) -> int:
    return max(1, candidate.batch_size) * size_units(spec, candidate)


def setting_key(candidate: Candidate, device_kind: str) -> str:
    """What a calibration is shared over: precision, checkpoint segments and device kind
    (batch and input size are its variables)."""
    return f"{candidate.precision.value}/{candidate.checkpoint_segments}/{device_kind}"


def per_call(op_log: dict[str, list[int]]) -> dict[str, tuple[int, float]]:
    """``aten.op#i`` -> (new storages, mean bytes per storage), summed over phases."""
    totals: dict[str, list[int]] = {}
    for key, (calls, nbytes) in op_log.items():
        op = key.split("|", 1)[-1]
        entry = totals.setdefault(op, [0, 0])
        entry[0] += int(calls)
        entry[1] += int(nbytes)
    return {op: (calls, nbytes / calls) for op, (calls, nbytes) in totals.items() if calls}


def phases_of(op_log: dict[str, list[int]], op: str) -> list[str]:
    return sorted({k.split("|", 1)[0] for k in op_log if k.split("|", 1)[-1] == op})


@dataclass
class OpProbe:
    """One probe's view of one op output."""

    batch_size: int
    input_size: int
    x: int
    calls_per_step: float
    traced_per_call: float
    real_per_call: float

    @property
    def delta(self) -> float:
        return self.real_per_call - self.traced_per_call


@dataclass
class OpCorrection:
    """Real minus traced bytes per new storage of one op output: ``intercept + slope * x``."""

    op: str
    """``aten.op#i`` (the op's overload packet and output index)."""
    intercept: float = 0.0
    slope: float = 0.0
    phases: list[str] = field(default_factory=list)
    probes: list[OpProbe] = field(default_factory=list)
    at_peak_bytes: int = 0
    """What it added at the latest probe's corrected peak (0: not alive at the peak)."""

    def bytes_per_call(self, x: int) -> int:
        return int(round(self.intercept + self.slope * x))

    def refit(self) -> None:
        points = {p.x: p.delta for p in self.probes}  # latest probe of each x wins
        if len(points) == 1:
            (x, delta), = points.items()
            self.intercept, self.slope = 0.0, delta / x
            return
        n = len(points)
        mx = sum(points) / n
        my = sum(points.values()) / n
        sxx = sum((x - mx) ** 2 for x in points)
        self.slope = sum((x - mx) * (y - my) for x, y in points.items()) / sxx
        self.intercept = my - self.slope * mx

    @property
    def name(self) -> str:
        return self.op.split("#")[0]

    def describe(self, probe: OpProbe | None = None) -> str:
        probe = probe or self.probes[-1]
        at_peak = self.at_peak_bytes or abs(probe.delta * probe.calls_per_step)
        verb = "under-reports" if probe.delta > 0 else "over-reports"
        where = " at the peak" if self.at_peak_bytes else " per step"
        return (f"{self.name} (output {self.op.split('#')[-1]}): fake kernel {verb} by "
                f"{_mb(abs(at_peak))}{where} at batch {probe.batch_size} "
                f"({_mb2(probe.traced_per_call)} traced vs {_mb2(probe.real_per_call)} "
                f"real per call); corrected")


@dataclass
class ProbeRecord:
    batch_size: int
    input_size: int
    x: int
    measured_bytes: int
    traced_bytes: int
    corrected_bytes: int
    """The prediction after op corrections (before the unexplained slope)."""
    reserved_bytes: int | None = None
    """CUDA: the probe's ``max_memory_reserved`` (None on CPU)."""


@dataclass
class AllocatorProbe:
    """One CPU probe's allocator view against its tracker view."""

    batch_size: int
    input_size: int
    x: int
    tracker_bytes: int
    allocator_bytes: int
    op: str = ""
    """The op running when the allocator's peak was reached (``aten::...``)."""

    @property
    def excess(self) -> int:
        return self.allocator_bytes - self.tracker_bytes


@dataclass
class Calibration:
    """The corrections of one setting key (see ``setting_key``)."""

    key: str
    ops: dict[str, OpCorrection] = field(default_factory=dict)
    unexplained_slope: float = 0.0
    """Bytes per unit of x the probes measured that no op explains (0: explained)."""
    probes: list[ProbeRecord] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    reserve_ratio: float = 0.0
    """CUDA: measured reserved / allocated of this setting's probes (0: not measured); the
    allocator's reserve per setting instead of the device model's global constants."""
    allocator: list[AllocatorProbe] = field(default_factory=list)
    """CPU probes measured under the allocator view (see ``AllocatorView``)."""
    scratch_intercept: float = 0.0
    scratch_slope: float = 0.0
    """Allocator peak minus tracker peak, bytes: ``scratch_intercept + scratch_slope * x``."""

    def scratch_bytes(self, x: int) -> int:
        """What the CPU allocator holds at its peak beyond the tracked tensors (>= 0)."""
        return max(0, int(round(self.scratch_intercept + self.scratch_slope * x)))

    def refit_scratch(self) -> None:
        points = {p.x: p.excess for p in self.allocator}  # latest probe of each x wins
        if not points:
            self.scratch_intercept = self.scratch_slope = 0.0
        elif len(points) == 1:  # a constant: oneDNN scratch follows the layers, not the batch
            (x, excess), = points.items()
            self.scratch_intercept, self.scratch_slope = float(excess), 0.0
        else:
            n = len(points)
            mx, my = sum(points) / n, sum(points.values()) / n
            sxx = sum((x - mx) ** 2 for x in points)
            self.scratch_slope = sum((x - mx) * (y - my) for x, y in points.items()) / sxx
            self.scratch_intercept = my - self.scratch_slope * mx

    def corrections(self, x: int) -> dict[str, int]:
        return {op: c.bytes_per_call(x) for op, c in self.ops.items() if c.bytes_per_call(x)}

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "ops": {k: asdict(v) for k, v in self.ops.items()},
                "unexplained_slope": self.unexplained_slope, "reserve_ratio": self.reserve_ratio,
                "probes": [asdict(p) for p in self.probes], "messages": list(self.messages),
                "allocator": [asdict(p) for p in self.allocator],
                "scratch_intercept": self.scratch_intercept, "scratch_slope": self.scratch_slope}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        ops = {}
        for op, raw in (data.get("ops") or {}).items():
            raw = dict(raw)
            raw["probes"] = [OpProbe(**p) for p in raw.get("probes", [])]
            ops[op] = OpCorrection(**raw)
        return cls(key=data["key"], ops=ops,
                   unexplained_slope=float(data.get("unexplained_slope", 0.0)),
                   reserve_ratio=float(data.get("reserve_ratio", 0.0)),
                   probes=[ProbeRecord(**p) for p in data.get("probes", [])],
                   messages=list(data.get("messages", [])),
                   allocator=[AllocatorProbe(**p) for p in data.get("allocator", [])],
                   scratch_intercept=float(data.get("scratch_intercept", 0.0)),
                   scratch_slope=float(data.get("scratch_slope", 0.0)))


@dataclass
class Applied:
    """What ``estimate`` applies to one candidate."""

    corrections: dict[str, int]
    residual_bytes: int
    """Added to the traced peak: the unexplained slope, plus ``scratch_bytes`` when the
    limit is the CPU allocator (``cpu_limit: rlimit``)."""
    digest: str
    reserve_ratio: float = 0.0
    scratch_bytes: int = 0
    """The allocator view's scratch included in ``residual_bytes`` (0: not applied)."""

    def reserved(self, allocated_bytes: int, model: DeviceModel) -> int:
        """Predicted ``max_memory_reserved``: the probe's ratio, in whole segments."""
        seg = max(1, model.segment_bytes)
        return max(allocated_bytes, int(-(-allocated_bytes * self.reserve_ratio // seg) * seg))


@dataclass
class CalibrationStore:
    """Calibrations by setting key; what results.json and calibration.json hold."""

    calibrations: dict[str, Calibration] = field(default_factory=dict)
    spec_key: str = ""
    """``cache.spec_fingerprint`` of the spec probed: a changed model drops the store."""

    def find(self, candidate: Candidate, device_kind: str) -> Calibration | None:
        """The setting's own calibration, else one of the same precision and segments probed
        on another device kind (a CPU probe corrects CPU-traced CUDA targets)."""
        own = self.calibrations.get(setting_key(candidate, device_kind))
        if own is not None:
            return own
        prefix = setting_key(candidate, "")
        for key, cal in sorted(self.calibrations.items()):
            if key.startswith(prefix):
                return cal
        return None

    def applied(self, spec: ExperimentSpec, candidate: Candidate, device_kind: str) -> Applied | None:
        cal = self.find(candidate, device_kind)
        if cal is None:
            return None
        x = x_of(spec, candidate)
        corrections = cal.corrections(x)
        residual = int(round(cal.unexplained_slope * x))
        scratch = cal.scratch_bytes(x) if allocator_limited(spec, device_kind) else 0
        ratio = cal.reserve_ratio if cal.key.endswith(f"/{device_kind}") else 0.0
        if not corrections and not residual and not ratio and not scratch:
            return None
        digest = cal.digest() + (f":scratch={scratch}" if scratch else "")  # cache keys apart
        return Applied(corrections, residual + scratch, digest, ratio, scratch)

    def messages(self) -> list[str]:
        return [m for cal in self.calibrations.values() for m in cal.messages]

    def to_dict(self) -> dict[str, Any]:
        return {"spec_key": self.spec_key,
                "settings": {k: v.to_dict() for k, v in sorted(self.calibrations.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CalibrationStore:
        data = data or {}
        return cls({k: Calibration.from_dict(v) for k, v in (data.get("settings") or {}).items()},
                   spec_key=str(data.get("spec_key", "")))

    def save(self, path: str | Path) -> None:
        from autofit.files import write_atomic

        write_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStore:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()


def allocator_limited(spec: ExperimentSpec, device_kind: str) -> bool:
    """Whether the limit is the CPU allocator itself (``cpu_limit: rlimit``), whose peak
    includes scratch the tracker never sees."""
    return device_kind == "cpu" and spec.memory.cpu_limit == "rlimit"


CALIBRATION_FILE = "calibration.json"
"""Kept in the output dir (next to results.json) by ``estimate --calibrate`` and ``tune``."""


def spec_key(spec: ExperimentSpec) -> str:
    from autofit.predict.cache import spec_fingerprint

    return spec_fingerprint(spec)


def load_for(spec: ExperimentSpec, out_dir: str | Path) -> CalibrationStore:
    """The output dir's calibrations if they were probed on this very spec (else empty)."""
    key = spec_key(spec)
    store = CalibrationStore.load(Path(out_dir) / CALIBRATION_FILE)
    if store.spec_key != key:
        return CalibrationStore(spec_key=key)
    return store


def probe(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
          store: CalibrationStore, *, device: str | None = None,
          runner: Any = None) -> tuple[Calibration | None, Any]:
    """A dedicated probe: one real trial of ``candidate`` (no limit, one timed step) and
    the calibration it gives (None when the probe did not fit: the result says why). On CPU
    the probe also runs under the allocator view (``AllocatorView``)."""
    from autofit.trials.runner import run_trial

    extra = {"allocator_view": True} if model.kind == "cpu" and runner is None else {}
    result = (runner or run_trial)(spec, candidate, limit_bytes=None, steps=1, device=device,
                                   **extra)
    return calibrate_from_trial(spec, result, model, store), result


# ---------------------------------------------------------------------- allocator view
_ALLOC_HELPERS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_",
                  "aten::as_strided", "aten::as_strided_", "aten::zeros", "aten::zero_",
                  "aten::fill_", "aten::new_empty", "aten::new_empty_strided", "aten::zeros_like"}


class AllocatorView:
    """The CPU allocator's view of some steps: every c10 CPU allocation, including scratch
    that never passes dispatch (oneDNN convolution), from ``torch.profiler`` with
    ``profile_memory=True``.

    The profiler's raw records hold one ``[memory]`` record per allocator call (bytes > 0
    allocated, < 0 freed); sorted by time and summed, their running maximum plus
    ``baseline_bytes`` (what was live when the view started: parameters and buffers) is the
    peak. ``peak_op`` names the innermost op (allocation helpers skipped) running when the
    peak was reached.
    """

    def __init__(self, baseline_bytes: int = 0) -> None:
        self.baseline_bytes = int(baseline_bytes)
        self.peak_bytes = 0
        self.peak_op = ""
        self._prof: Any = None

    def __enter__(self) -> AllocatorView:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        self._read(self._prof.profiler.kineto_results.events())
        self._prof = None

    def _read(self, events: Any) -> None:
        from torch.autograd import DeviceType

        records, ops = [], []
        for e in events:
            if e.device_type() != DeviceType.CPU:
                continue
            if e.name() == "[memory]":
                records.append((e.start_ns(), e.nbytes(), e.start_thread_id()))
            else:
                ops.append((e.start_ns(), e.start_ns() + e.duration_ns(), e.name(),
                            e.start_thread_id()))
        records.sort(key=lambda r: r[0])  # stable: ties keep the recorded order
        running = peak = 0
        at = None
        for record in records:
            running += record[1]
            if running > peak:
                peak, at = running, record
        self.peak_bytes = self.baseline_bytes + peak
        if at is not None:
            inside = [o for o in ops if o[0] <= at[0] <= o[1] and o[3] == at[2]
                      and o[2] not in _ALLOC_HELPERS]
            if inside:
                self.peak_op = max(inside, key=lambda o: o[0])[2]


_ACTIVE: list[CalibrationStore] = []


def active() -> CalibrationStore | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def using(store: CalibrationStore | None) -> Iterator[CalibrationStore | None]:
    """Every ``estimate`` inside applies ``store``'s corrections (None: none)."""
    if store is None:
        yield None
        return
    _ACTIVE.append(store)
    try:
        yield store
    finally:
        _ACTIVE.remove(store)


def applied_for(spec: ExperimentSpec, candidate: Candidate, device_kind: str) -> Applied | None:
    store = active()
    return store.applied(spec, candidate, device_kind) if store is not None else None


# ---------------------------------------------------------------------------- comparison
@dataclass
class OpDiff:
    op: str
    traced_calls: int
    real_calls: int
    traced_per_call: float
    real_per_call: float
    calls_per_step: float

    @property
    def delta(self) -> float:
        return self.real_per_call - self.traced_per_call


def compare(traced_log: dict[str, list[int]], real_log: dict[str, list[int]], *,
            traced_steps: int, measured_bytes: int) -> tuple[list[OpDiff], list[str]]:
    """Op outputs whose bytes per call differ (significant ones only), and the ops that
    appear on one side only (the real run took another kernel: not correctable per op)."""
    traced, real = per_call(traced_log), per_call(real_log)
    diffs, one_sided = [], []
    for op in sorted(set(traced) | set(real)):
        if op not in traced or op not in real:
            calls, mean = traced.get(op) or real[op]
            if calls * mean / max(traced_steps, 1) >= MIN_OP_FRACTION * measured_bytes:
                one_sided.append(f"{op} ({'real' if op in real else 'trace'} only)")
            continue
        (tc, tb), (rc, rb) = traced[op], real[op]
        diff = OpDiff(op, tc, rc, tb, rb, tc / max(traced_steps, 1))
        if abs(diff.delta) < MIN_PER_CALL_BYTES:
            continue
        if abs(diff.delta) * diff.calls_per_step < MIN_OP_FRACTION * measured_bytes:
            continue
        diffs.append(diff)
    return diffs, one_sided


def _at_peak_by_op(tracker: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for block in tracker.live_at(tracker.peak_seq):
        if block.corrected_bytes:
            out[block.op] = out.get(block.op, 0) + block.corrected_bytes
    return out


# ------------------------------------------------------------------ traced allocation logs
@dataclass
class TracedLog:
    """What a calibration reads of one trace of a candidate."""

    peak_bytes: int
    """The tracker's peak (block-rounded live bytes)."""
    uses_blas: bool
    op_log: dict[str, list[int]]
    """``MemoryTracker.op_log``: ``"phase|aten.op#i"`` -> [new storages, bytes]."""
    steps: int
    """Training steps traced (``predict.trace.TRACE_STEPS``)."""
    at_peak: dict[str, int] = field(default_factory=dict)
    """A corrected trace: bytes each corrected op output adds at the peak
    (``_at_peak_by_op``); empty for a plain trace."""

    @classmethod
    def of(cls, tracker: Any, steps: int, corrected: bool) -> TracedLog:
        return cls(int(tracker.peak_bytes), bool(tracker.uses_blas),
                   {k: [int(n), int(b)] for k, (n, b) in tracker.op_log.items()}, steps,
                   _at_peak_by_op(tracker) if corrected else {})


LOG_DIR = "oplog"
LOG_STATS = {"hits": 0, "traced": 0}
"""Traced logs this process read from the trace cache and traced (tests read them)."""


def _log_path(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
              corrections: dict[str, int] | None) -> Path | None:
    """``<trace cache>/oplog/<key>.json`` of this trace (None: no active cache). The key is
    the trace cache's key of the candidate (spec, candidate, torch, device model, code), the
    device the fake tensors live on and the corrections."""
    from autofit.predict import cache as trace_cache

    cache = trace_cache.active()
    if cache is None:
        return None
    if model.kind == "cpu":
        device = "cpu"  # known without importing torch
    else:
        from autofit.predict.cuda_native import trace_device

        device = trace_device(model).type
    tags = json.dumps({"device": device, "corrections": corrections or {}}, sort_keys=True)
    key = f"{cache.key(spec, candidate, model)}-{hashlib.sha256(tags.encode()).hexdigest()[:16]}"
    return cache.directory / LOG_DIR / f"{key}.json"


def _read_log(path: Path | None) -> TracedLog | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        log = TracedLog(int(data["peak_bytes"]), bool(data["uses_blas"]),
                        {str(k): [int(n), int(b)] for k, (n, b) in data["op_log"].items()},
                        int(data["steps"]), {str(k): int(v) for k, v in (data.get("at_peak") or {}).items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable entry is a miss
    LOG_STATS["hits"] += 1
    return log


def _write_log(path: Path | None, log: TracedLog) -> None:
    if path is not None:
        from autofit.predict.cache import write_quietly

        write_quietly(path, json.dumps(asdict(log)))


def traced_log(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
               corrections: dict[str, int] | None = None) -> TracedLog:
    """The trace of ``candidate`` that a calibration compares with (``corrections``: the
    corrected trace), from the active trace cache when it holds one, else traced and kept."""
    path = _log_path(spec, candidate, model, corrections)
    found = _read_log(path)
    if found is not None:
        return found
    log = _trace_log(spec, candidate, model, corrections)
    _write_log(path, log)
    return log


def _trace_log(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
               corrections: dict[str, int] | None) -> TracedLog:
    from autofit.predict.trace import TRACE_STEPS, trace

    tracker, _, _ = trace(spec, candidate, model, steps=TRACE_STEPS,
                          corrections=corrections or None)
    LOG_STATS["traced"] += 1
    return TracedLog.of(tracker, TRACE_STEPS, bool(corrections))


class PendingTrace:
    """The plain trace a calibration of ``candidate`` will need, traced in a thread now (a
    probe trial runs in its own process meanwhile: the two overlap). ``get`` waits for it.

    Only while this process does nothing else with torch until ``get`` (the thread is the
    one tracing); nothing is started when the active trace cache already holds the log.
    """

    def __init__(self, spec: ExperimentSpec, candidate: Candidate, model: DeviceModel) -> None:
        import contextvars
        import threading

        self.candidate = candidate
        self.model_kind = model.kind
        self._path = _log_path(spec, candidate, model, None)
        self._log: TracedLog | None = _read_log(self._path) if self._path else None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self._log is None:
            context = contextvars.copy_context()  # the active trace cache, as the caller's
            self._thread = threading.Thread(target=context.run, args=(self._run, spec, model),
                                            name="autofit-calibration-trace", daemon=True)
            self._thread.start()

    def _run(self, spec: ExperimentSpec, model: DeviceModel) -> None:
        try:
            self._log = _trace_log(spec, self.candidate, model, None)
            _write_log(self._path, self._log)
        except BaseException as exc:  # noqa: BLE001 - raised again by get, in the caller
            self._error = exc

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def get(self) -> TracedLog:
        """The traced log (waits for the thread; raises what the trace raised)."""
        self.join()
        if self._error is not None:
            raise self._error
        assert self._log is not None
        return self._log


def calibrate(spec: ExperimentSpec, candidate: Candidate, model: DeviceModel,
              real_log: dict[str, list[int]], measured_bytes: int,
              store: CalibrationStore | None = None,
              measured_reserved: int | None = None, allocator_bytes: int | None = None,
              allocator_op: str = "", traced: TracedLog | None = None) -> Calibration:
    """Compare a real run's allocation log with a trace of the same candidate, refit the
    setting's corrections (added to ``store`` when given) and return its calibration.

    ``measured_bytes`` is the run's peak as the device counts it (CPU: tracked live bytes;
    CUDA: ``max_memory_allocated``; ``measured_reserved`` its ``max_memory_reserved``).
    ``allocator_bytes``: CPU, the run's allocator-view peak (``AllocatorView``), and
    ``allocator_op`` the op running at it. ``traced``: the plain trace of ``candidate``
    when already at hand (``PendingTrace``); else ``traced_log`` reads or traces it.
    """
    store = store if store is not None else CalibrationStore()
    key = setting_key(candidate, model.kind)
    cal = store.calibrations.get(key) or Calibration(key)
    x = x_of(spec, candidate)
    tracker = traced if traced is not None else traced_log(spec, candidate, model)
    traced_peak = model.allocated(tracker.peak_bytes, tracker.uses_blas)
    diffs, one_sided = compare(tracker.op_log, real_log, traced_steps=tracker.steps,
                               measured_bytes=measured_bytes)
    for diff in diffs:
        corr = cal.ops.get(diff.op) or OpCorrection(diff.op, phases=phases_of(real_log, diff.op))
        corr.probes = [p for p in corr.probes if p.x != x] + [OpProbe(
            candidate.batch_size, candidate.input_size, x, diff.calls_per_step,
            diff.traced_per_call, diff.real_per_call)]
        corr.refit()
        cal.ops[diff.op] = corr
    corrections = cal.corrections(x)
    if corrections:
        fixed = traced_log(spec, candidate, model, corrections)
        corrected_peak = model.allocated(fixed.peak_bytes, fixed.uses_blas)
        at_peak = fixed.at_peak
        for op, corr in cal.ops.items():
            corr.at_peak_bytes = at_peak.get(op, 0)
    else:
        corrected_peak = traced_peak
    cal.probes = [p for p in cal.probes if p.x != x] + [ProbeRecord(
        candidate.batch_size, candidate.input_size, x, int(measured_bytes), int(traced_peak),
        int(corrected_peak), int(measured_reserved) if measured_reserved else None)]
    messages = [cal.ops[d.op].describe() for d in diffs]
    reserved = [p for p in cal.probes if p.reserved_bytes and p.measured_bytes]
    if model.kind == "cuda" and reserved:
        cal.reserve_ratio = sum(p.reserved_bytes or 0 for p in reserved) \
            / sum(p.measured_bytes for p in reserved)
        modelled = model.reserved(int(corrected_peak - model.allocated(0, tracker.uses_blas)),
                                  tracker.uses_blas)
        messages.append(f"allocator reserve at {candidate.label()}: measured "
                        f"{cal.reserve_ratio:.3f} x allocated (device model: "
                        f"{modelled / max(corrected_peak, 1):.3f} x); calibrated for this setting")
    error = (measured_bytes - corrected_peak) / measured_bytes if measured_bytes else 0.0
    label = candidate.label()
    if abs(error) > UNEXPLAINED_THRESHOLD:
        cal.unexplained_slope = sum(p.measured_bytes - p.corrected_bytes for p in cal.probes) \
            / sum(p.x for p in cal.probes)
        why = f"; ops seen on one side only: {', '.join(one_sided)}" if one_sided else ""
        messages.append(
            f"probe at {label}: measured {_mb(measured_bytes)} vs "
            f"{_mb(corrected_peak)} traced{' after op corrections' if corrections else ''} "
            f"({error:+.1%}) and no op explains it{why}; using the measured slope")
    else:
        cal.unexplained_slope = 0.0
        messages.append(
            f"probe at {label}: measured {_mb(measured_bytes)}, trace {_mb(traced_peak)}"
            + (f", {_mb(corrected_peak)} after correction" if corrections else "")
            + f" ({error:+.1%})")
    if allocator_bytes:
        cal.allocator = [p for p in cal.allocator if p.x != x] + [AllocatorProbe(
            candidate.batch_size, candidate.input_size, x, int(measured_bytes),
            int(allocator_bytes), allocator_op)]
        cal.refit_scratch()
        excess = int(allocator_bytes) - int(measured_bytes)
        where = f"; the allocator's peak is inside {allocator_op}" if allocator_op else ""
        scratch = " (oneDNN scratch never passes dispatch)" \
            if "mkldnn" in allocator_op or "convolution" in allocator_op else ""
        if abs(excess) < MIN_OP_FRACTION * measured_bytes:
            messages.append(f"allocator view at {label}: {_mb(allocator_bytes)}, the tracked "
                            f"peak within {MIN_OP_FRACTION:.1%} (no scratch at the peak)")
        else:
            messages.append(
                f"allocator view at {label}: {_mb(allocator_bytes)}, "
                f"{'+' if excess >= 0 else '-'}{_mb(abs(excess))} "
                f"({excess / max(measured_bytes, 1):+.1%}) over the tracked "
                f"{_mb(measured_bytes)}{where}{scratch}; no op output explains it; corrected "
                "under cpu_limit: rlimit (added as a measured residual)")
    cal.messages = messages
    store.calibrations[key] = cal
    return cal


def calibrate_from_trial(spec: ExperimentSpec, result: Any, model: DeviceModel,
                         store: CalibrationStore,
                         pending: PendingTrace | None = None) -> Calibration | None:
    """Calibrate from a fitting trial that carries an allocation log (else None).
    ``pending``: the trial candidate's plain trace, started beside the trial."""
    if not getattr(result, "fits", False) or not getattr(result, "op_log", None) \
            or result.memory is None or not result.memory.peak_bytes:
        return None
    extra = getattr(result, "extra", None) or {}
    traced = pending.get() if pending is not None and pending.candidate == result.candidate \
        and pending.model_kind == model.kind else None
    return calibrate(spec, result.candidate, model, result.op_log, int(result.memory.peak_bytes),
                     store, measured_reserved=result.memory.reserved_bytes,
                     allocator_bytes=extra.get("allocator_peak_bytes"),
                     allocator_op=str(extra.get("allocator_peak_op") or ""), traced=traced)


def known_misreporting(op_log: dict[str, list[int]], spec: ExperimentSpec | None = None,
                       device_kind: str = "") -> list[str]:
    """Lines naming the ops of a trace whose fake kernels are known to misreport (and, under
    ``cpu_limit: rlimit`` on CPU, the ops whose scratch the trace cannot see)."""
    seen = {k.split("|", 1)[-1].split("#")[0] for k in op_log}
    known = dict(KNOWN_MISREPORTING)
    if spec is not None and allocator_limited(spec, device_kind):
        known.update(ALLOCATOR_SCRATCH)
    return [f"{op}: {why} (run with --calibrate to measure and correct it)"
            for op, why in known.items() if op in seen]
