"""Benchmark: predicted peak memory (fake-tensor trace) vs the real training step.

Usage::

    python scripts/bench_estimate.py            # zoo x fp32/bf16/fp16 x 0/2 segments, step kinds
    python scripts/bench_estimate.py --quick    # fp32 only (~3 min on 2 cores)
    python scripts/bench_estimate.py --markdown out/bench_estimate.md
    python scripts/bench_estimate.py --only-step-kinds --quick   # step-kind rows, fp32 (~1 min)
    python scripts/bench_estimate.py --only-calibration          # probe-calibration rows (~4 min)

Issue targets (figures are printed, never asserted): predicted peak within 3% of the measured
real step for every row; ``estimate`` < 2 s per shipped config; it finishes for a > 1B-param
config without allocating that config's memory.

Columns of the main table (one row per case x precision x checkpoint segments, fixed batch):

* ``predicted``: ``autofit.predict.estimate(spec, candidate, CPU)``, run in this process on
  fake tensors (``trace s`` is its ``trace_time_s``).
* ``tracker``: the same ``TrainingJob`` on real CPU tensors for 3 steps under
  ``MemoryTracker`` with parameters and buffers tracked first (what the tests and the CPU
  trials measure); its ``peak_bytes``.
* ``profiler``: an independent measurement. A fresh ``TrainingJob`` runs the same 3 steps under
  ``torch.profiler.profile(activities=[CPU], profile_memory=True)``. The raw profiler records
  (``prof.profiler.kineto_results.events()``) contain one ``[memory]`` record per CPU allocator
  call, with ``nbytes()`` (> 0 allocation, < 0 free) and ``start_ns()``. (``prof.events()``
  folds most of these into the ops' ``cpu_memory_usage``, so its ``[memory]`` rows are only the
  allocations made outside any op and cannot give a peak.) The records are sorted by time and
  summed; the peak of that running sum is the most the steps had allocated at once. Tensors
  allocated before the profiler started (parameters and buffers, each storage once) are added;
  frees of such tensors are reported by the CPU allocator with 0 bytes, so they do not
  disturb the sum. This counts every c10 CPU allocation, including workspace buffers that are
  not tensor outputs (which ``MemoryTracker`` cannot see).
* ``RSS delta``: growth of the measuring process's ``ru_maxrss`` over building the job and
  the tracker's 3 steps. The process (forked fresh per row) first runs one untracked step at
  batch 1, frees it, calls ``malloc_trim`` and resets the high-water mark (Linux
  ``/proc/self/clear_refs`` = 5), so kernel code pages and thread pools are not counted.
  Includes params, malloc slack and oneDNN scratch buffers; page granularity.
* ``err``: (predicted - measured) / measured.
* ``naive``: ``naive_estimate_bytes`` (4 x params + 2 x leaf-module outputs).

Real steps run in processes forked from a helper forked at start-up, before this process
runs any torch op: OpenMP (the ATen CPU backend) is not fork-safe once its thread pool is
up, and the fake-tensor traces run in this process.

A second table, **step kinds**, proves each training step autofit can run besides its own
(``autofit/loops.py``) the same way: ``predicted`` and ``tracker`` as above (the tracker
measures ``TrainingJob.run_step`` of the spec's step kind in a forked process, what the CPU
trials run), ``profiler`` as above. Rows (batch ``--batch``, every precision of the run):

* ``hf`` and ``hf_trainer`` on ``configs/hf_gpt2.yaml`` (the same GPT-2, output held through
  backward vs freed before it: the pair printed under the table as "output held vs freed"),
  and on ``configs/hf_bert.yaml`` (shipped as ``hf_trainer``; ``hf`` with ``step`` removed);
* ``lightning``: ``configs/lightning.yaml`` (``LitClassifier``, Lightning's automatic
  optimization); ``lightning_manual``: ``LitClassifierManual`` below (the same network with
  ``automatic_optimization = False``: ``self.optimizers()``, ``manual_backward``, gradient
  clipping, ``opt.step()`` in its own ``training_step``);
* ``custom``: the ``resnet`` zoo case with ``step: custom_step.clip_ema_accum`` (examples/custom_step.py: two
  accumulated micro-batches, gradient clipping, an EMA copy of the weights);
  ``custom_forward``: the same case with ``step: bench_estimate.smoothed_forward`` (the user's
  forward and label-smoothed loss; autofit's backward and optimizer step).

Rows whose framework (``transformers``, ``lightning``) is not installed are skipped with the
reason printed. ``kind``: the step kind the real job ran (``TrainingJob.step_kind``).

A third table, **probe calibration** (``autofit.predict.calibrate``), one row per zoo case
(mlp, resnet, vit, gpt, and the workspace-heavy ``lstm`` LM, ``gru_s2s`` seq2seq, ``audio``
conv1d and full-width ``resnet18`` CIFAR) x fp32/bf16 (``--quick``: fp32), no checkpointing:
a real probe trial at
``--batch`` calibrates the setting (``calibrate.probe``, CPU allocator view on), then a real
trial at twice that batch, which the probe never saw, is the reference:

* ``trial MiB``: that trial's measured peak (the tracker's view, what ``cpu_limit: budget``
  counts); ``before`` / ``after``: the error of ``estimate`` at the check batch without and
  with the probe's calibration; ``corrected``: the op outputs the calibration corrected.
* ``allocator MiB``: the same check trial's CPU allocator peak (``calibrate.AllocatorView``:
  ``torch.profiler`` with ``profile_memory=True``, every c10 CPU allocation including oneDNN
  scratch that never passes dispatch); ``alloc +``: what it adds over the tracker;
  ``vs alloc``: the calibrated (tracker-view) prediction against it, ``rlimit``: the
  prediction of the same spec with ``cpu_limit: rlimit``, where the probe's allocator excess is
  added; ``at alloc peak``: the op running at the check trial's allocator peak.

The summary ends with ``estimate`` wall time for each shipped config (``configs/*.yaml``) at
``search.batch_size.min`` (largest input size, first precision and segment count, like
``autofit estimate``), with the CPU device model (CUDA_DEFAULT for ``device: cuda``
configs), measured in a fresh forked process: ``cold`` is the first call there, ``warm`` the
second; ``peak RSS`` is that process's ``ru_maxrss``, against the predicted peak it never
allocates.
"""

from __future__ import annotations

import argparse
import gc
import glob
import multiprocessing
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))  # custom_step.py
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # config warnings of the HF rows

import torch  # noqa: E402  - imported (never run) before the fork helper starts
from _zoo_cases import (  # noqa: E402
    Report,
    case,
    case_names,
    fmt_mib,
    machine_line,
    markdown_table,
    with_budget,
)

ROOT = Path(__file__).resolve().parent.parent
MEASURE_STEPS = 3
if __name__ == "__main__":  # `step: bench_estimate.<fn>` resolves to this running script
    sys.modules.setdefault("bench_estimate", sys.modules[__name__])


# --------------------------------------------------------------------------- user steps


def smoothed_forward(model: Any, batch_size: int, input_size: int, device: Any) -> Any:
    """A forward-only custom step: the user's own batch and label-smoothed loss."""
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    return torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)


def _lit_classifier_manual() -> Any:
    """``LitClassifier`` (configs/lit_classifier.py) with manual optimization."""
    configs = str(ROOT / "configs")
    if configs not in sys.path:
        sys.path.insert(0, configs)
    from lit_classifier import LitClassifier

    class LitClassifierManual(LitClassifier):
        """The same network; its training_step runs the whole step (clipping included)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            opt = self.optimizers()
            loss = torch.nn.functional.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
            opt.step()
            self.log("train_loss", loss)
            return loss

    LitClassifierManual.__module__ = "bench_estimate"
    return LitClassifierManual


def __getattr__(name: str) -> Any:  # Lightning is imported only when a row asks for it
    if name == "LitClassifierManual":
        cls = _lit_classifier_manual()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- fork helper


class ForkRunner:
    """Runs functions in processes forked from a helper that never ran a torch op."""

    def __init__(self) -> None:
        self._conn, server_conn = multiprocessing.Pipe()
        pid = os.fork()
        if pid == 0:  # the helper
            self._conn.close()
            _serve(server_conn)
        server_conn.close()
        self.pid = pid

    def call(self, fn: Any, *args: Any) -> Any:
        self._conn.send((fn, args))
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            self._conn.send(None)
            os.waitpid(self.pid, 0)
        except (OSError, ChildProcessError, BrokenPipeError):
            pass


def _serve(conn: Any) -> None:
    code = 0
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                break
            if request is None:
                break
            fn, args = request
            reader, writer = multiprocessing.Pipe(duplex=False)
            pid = os.fork()
            if pid == 0:  # one measurement
                reader.close()
                try:
                    out: tuple[bool, Any] = (True, fn(*args))
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    out = (False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}")
                writer.send(out)
                os._exit(0)
            writer.close()
            try:
                out = reader.recv()
            except EOFError:
                out = (False, "the measurement process died without a result")
            reader.close()
            os.waitpid(pid, 0)
            conn.send(out)
    except BaseException:  # noqa: BLE001
        code = 1
    finally:
        os._exit(code)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_and_reset_rss() -> bool:
    """Return freed heap to the OS and reset the RSS high-water mark (Linux: clear_refs 5)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- measurements


def measure_real(raw: dict[str, Any], cand: dict[str, Any], steps: int,
                 source: str = "<spec>") -> dict[str, Any]:
    """In a fresh process: tracker peak, RSS delta, profiler peak of ``steps`` real steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from autofit.candidate import Candidate
    from autofit.memory import MemoryTracker, PhaseHooks
    from autofit.spec import spec_from_dict
    from autofit.step import TrainingJob

    spec = spec_from_dict(raw, source)
    candidate = Candidate.from_dict(cand)
    cpu = torch.device("cpu")

    # one untracked warm-up step at batch 1 pages in the kernels' code and thread pools;
    # then the high-water mark is reset so the delta is the measured steps' own growth
    warm = TrainingJob(spec, candidate.with_batch(1), cpu)
    warm.run_step()
    del warm
    gc.collect()
    _trim_and_reset_rss()
    rss0 = _maxrss_bytes()
    tracker = MemoryTracker()
    job = TrainingJob(spec, candidate, cpu, hooks=PhaseHooks(tracker))
    for tensor in job.parameters_and_buffers():
        tracker.track(tensor, "params")
    t0 = time.perf_counter()
    with tracker:
        for _ in range(steps):
            job.run_step()
    step_s = (time.perf_counter() - t0) / steps
    rss1 = _maxrss_bytes()
    out = {"tracker_peak": tracker.peak_bytes, "tracker_phase": tracker.peak_phase,
           "tracker_step": tracker.peak_step, "rss_delta": rss1 - rss0, "step_s": step_s,
           "step_kind": job.step_kind.value}
    del job, tracker
    gc.collect()

    job = TrainingJob(spec, candidate, cpu)
    seen: set[int] = set()
    before = 0
    for tensor in job.parameters_and_buffers():
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            before += storage.nbytes()
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(devnull, 2)  # kineto prints profiler_start/stop lines on stderr
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(steps):
                job.run_step()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    records.sort(key=lambda r: r[0])  # stable: ties keep the recorded order
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    out.update(profiler_peak=before + peak, profiler_records=len(records))
    return out


def time_config(path: str) -> dict[str, Any]:
    """In a fresh process: cold and warm ``estimate`` of a shipped config, and peak RSS."""
    from autofit.candidate import Candidate
    from autofit.predict import estimate
    from autofit.predict.device_model import CPU, CUDA_DEFAULT
    from autofit.spec import load_spec

    spec = load_spec(path)
    model = CUDA_DEFAULT if spec.device.startswith("cuda") else CPU
    s = spec.search
    cand = Candidate(batch_size=s.batch_size.min, input_size=spec.input_sizes[-1],
                     precision=s.precisions[0], checkpoint_segments=s.checkpoint_segments[0])
    rss0 = _maxrss_bytes()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        est = estimate(spec, cand, model)
        times.append(time.perf_counter() - t0)
    return {"label": cand.label(), "device_kind": model.kind, "cold_s": times[0],
            "warm_s": times[1], "params": est.param_count, "peak": est.peak_bytes,
            "rss0": rss0, "rss": _maxrss_bytes()}


# --------------------------------------------------------------------------- main


def naive_estimate_bytes(spec: Any, candidate: Any) -> int:
    """The classic hand formula: params (+ grads + Adam's 2 states) + layer outputs x 2.

    As in torchstat-style calculators: sum every leaf module's output size from one forward,
    double it for backward, add 4x the parameter bytes. Kept for the benchmark comparison.
    """
    from torch._subclasses import FakeTensorMode

    from autofit.build import make_input
    from autofit.step import TrainingJob

    outputs = 0

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        nonlocal outputs
        if isinstance(output, torch.Tensor) and not list(module.children()):
            outputs += output.numel() * output.element_size()

    with FakeTensorMode(allow_non_fake_inputs=True):
        job = TrainingJob(spec, candidate, torch.device("cpu"), fake=True)
        params = sum(p.numel() * p.element_size() for p in job.model.parameters())
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            with torch.no_grad(), job.autocast():
                job.model(make_input(spec, candidate, torch.device("cpu")))
        finally:
            handle.remove()
    return 4 * params + 2 * outputs


def err_pct(pred: float, ref: float) -> float:
    return (pred - ref) / ref * 100.0 if ref else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fp32 rows only (< 2 min)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    parser.add_argument("--batch", type=int, default=8, help="batch size of every row (8)")
    parser.add_argument("--cases", default=",".join(case_names()),
                        help="comma-separated zoo cases (default: all)")
    parser.add_argument("--only-step-kinds", action="store_true",
                        help="only the step-kind table (hf, hf_trainer, lightning, ...)")
    parser.add_argument("--only-calibration", action="store_true",
                        help="only the probe-calibration table")
    parser.add_argument("--calibration-cases", default=",".join(CALIBRATION_CASES),
                        help="comma-separated cases of the probe-calibration table")
    parser.add_argument("--calibration-precisions", default="fp32,bf16",
                        help="precisions of the probe-calibration rows (fp32,bf16; --quick: fp32)")
    args = parser.parse_args()

    runner = ForkRunner()  # before any torch op runs here
    started = time.perf_counter()
    out = Report()
    try:
        _run(args, runner, out)
    finally:
        runner.close()
    out(f"\ntotal wall time: {time.perf_counter() - started:.1f} s")
    out.write(args.markdown)


def _run(args: argparse.Namespace, runner: ForkRunner, out: Report) -> None:
    from autofit.candidate import Candidate
    from autofit.predict import CPU, estimate
    from autofit.spec import spec_from_dict

    precisions = ["fp32"] if args.quick else ["fp32", "bf16", "fp16"]
    segments = [0, 2]
    if args.only_calibration:
        out("# bench_estimate: probe calibration")
        out()
        out(machine_line())
        out()
        _run_calibration(args, out)
        return
    names = [] if args.only_step_kinds else [n for n in args.cases.split(",") if n]
    out("# bench_estimate: predicted vs measured peak of one training step")
    out()
    out(machine_line())
    if names:
        out(f"rows: {', '.join(names)} x {'/'.join(precisions)} x segments {segments}, "
            f"batch {args.batch}; measured over {MEASURE_STEPS} real steps; MiB = 2**20 bytes")
    else:
        out(f"only the step-kind rows (--only-step-kinds): x {'/'.join(precisions)}, batch "
            f"{args.batch}; measured over {MEASURE_STEPS} real steps; MiB = 2**20 bytes")
    out()

    # warm the fake-tensor machinery once so the first row's trace time is not the cold start
    t0 = time.perf_counter()
    warm_spec = spec_from_dict(with_budget(case("mlp")))
    estimate(warm_spec, Candidate(batch_size=1, input_size=0), CPU)
    cold_first = time.perf_counter() - t0

    header = ["case", "prec", "seg", "predicted MiB", "tracker MiB", "err", "profiler MiB",
              "err vs prof", "RSS delta MiB", "trace s", "naive MiB", "naive err", "peak phase"]
    rows: list[list[Any]] = []
    errs_tracker: list[float] = []
    errs_prof: list[float] = []
    errs_naive: list[float] = []
    trace_times: list[float] = []
    for name in names:
        raw = with_budget(case(name))
        spec = spec_from_dict(raw, f"<{name}>")
        for precision in precisions:
            for seg in segments:
                cand = Candidate(batch_size=args.batch, input_size=spec.default_input_size,
                                 precision=precision, checkpoint_segments=seg)
                est = estimate(spec, cand, CPU)
                naive = naive_estimate_bytes(spec, cand)
                try:
                    real = runner.call(measure_real, raw, cand.to_dict(), MEASURE_STEPS)
                except RuntimeError as exc:
                    out(f"{name} {precision} seg={seg}: measurement failed: {str(exc).splitlines()[0]}")
                    continue
                e_t = err_pct(est.peak_bytes, real["tracker_peak"])
                e_p = err_pct(est.peak_bytes, real["profiler_peak"])
                e_n = err_pct(naive, real["tracker_peak"])
                errs_tracker.append(e_t)
                errs_prof.append(e_p)
                errs_naive.append(e_n)
                trace_times.append(est.trace_time_s)
                row = [name, precision, seg, fmt_mib(est.peak_bytes), fmt_mib(real["tracker_peak"]),
                       f"{e_t:+.2f}%", fmt_mib(real["profiler_peak"]), f"{e_p:+.2f}%",
                       fmt_mib(real["rss_delta"]), f"{est.trace_time_s:.2f}", fmt_mib(naive),
                       f"{e_n:+.1f}%",
                       f"{est.breakdown.peak_phase}/{real['tracker_phase']}"]
                rows.append(row)
                print(f"  {name:7s} {precision} seg={seg}: predicted {fmt_mib(est.peak_bytes)} MiB, "
                      f"tracker {fmt_mib(real['tracker_peak'])}, profiler "
                      f"{fmt_mib(real['profiler_peak'])} (real step {real['step_s']:.2f} s)",
                      flush=True)
    print(flush=True)
    if names:
        out(markdown_table(header, rows))
        out()
        out("peak phase: predicted/measured phase of the peak. err: (predicted - measured) / measured.")
        out()

    # ---- step kinds
    kind_errs = _run_step_kinds(args, runner, out, precisions)

    # ---- probe calibration
    cal_line = "" if args.only_step_kinds else _run_calibration(args, out)

    # ---- shipped configs
    configs = [] if args.only_step_kinds else sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
    cfg_rows = []
    cfg_summary = []
    for path in configs:
        try:
            r = runner.call(time_config, path)
        except RuntimeError as exc:
            out(f"{Path(path).name}: estimate failed: {str(exc).splitlines()[0]}")
            continue
        cfg_rows.append([Path(path).name, r["label"], r["device_kind"], f"{r['params'] / 1e6:,.1f}M",
                         fmt_mib(r["peak"]), f"{r['cold_s']:.2f}", f"{r['warm_s']:.2f}",
                         fmt_mib(r["rss"])])
        cfg_summary.append(f"{Path(path).stem} {r['cold_s']:.2f}/{r['warm_s']:.2f} s"
                           + (f" ({r['params'] / 1e9:.2f}B params, predicted "
                              f"{r['peak'] / 2**30:.1f} GiB, peak RSS {r['rss'] / 2**20:.0f} MiB)"
                              if r["params"] > 1e9 else ""))
    if configs:
        out("## estimate time per shipped config (batch = search.batch_size.min)")
        out()
        out(markdown_table(["config", "candidate", "model", "params", "predicted MiB", "cold s",
                            "warm s", "peak RSS MiB"], cfg_rows))
        out()
        out("cold: first estimate in a fresh process (torch and autofit imported); warm: second "
            "call. peak RSS: ru_maxrss of that process (it never allocates the predicted bytes).")
        out()

    def mx(values: list[float]) -> str:
        return f"{max(abs(v) for v in values):.2f}%" if values else "-"

    kinds_line = (f"step kinds: {len(kind_errs['tracker'])} rows, max |error| vs tracker "
                  f"{mx(kind_errs['tracker'])}, vs profiler {mx(kind_errs['profiler'])}; "
                  f"{sum(abs(v) < 3.0 for v in kind_errs['tracker'])}/{len(kind_errs['tracker'])} "
                  "within 3%")
    if not names:
        out(f"summary: {kinds_line}")
        return
    mean_naive = sum(abs(v) for v in errs_naive) / len(errs_naive) if errs_naive else float("nan")
    out(f"summary: {len(rows)} rows; max |error| vs tracker {mx(errs_tracker)}, "
        f"vs profiler {mx(errs_prof)}; naive formula mean |error| {mean_naive:.1f}% "
        f"(max {mx(errs_naive)}); trace time per row median "
        f"{sorted(trace_times)[len(trace_times) // 2] if trace_times else float('nan'):.2f} s "
        f"(first trace in this process {cold_first:.2f} s); {kinds_line}; {cal_line}; "
        "estimate cold/warm "
        "per config: " + "; ".join(cfg_summary))


CALIBRATION_CASES = ["mlp", "resnet", "vit", "gpt", "lstm", "gru_s2s", "audio", "resnet18"]


def _run_calibration(args: argparse.Namespace, out: Report) -> str:
    """The probe-calibration table (see the module docstring); returns its summary line."""
    import copy

    from autofit.candidate import Candidate
    from autofit.predict import CPU, estimate
    from autofit.predict import calibrate as calib
    from autofit.spec import spec_from_dict
    from autofit.trials.runner import run_trial, shutdown

    header = ["case", "prec", "probe>check batch", "trial MiB", "before", "after", "corrected",
              "allocator MiB", "alloc +", "vs alloc", "rlimit", "at alloc peak"]
    rows: list[list[Any]] = []
    before_errs, after_errs, rlimit_errs = [], [], []
    notes: list[str] = []
    names = [n for n in args.calibration_cases.split(",") if n]
    precisions = ["fp32"] if args.quick else [p for p in args.calibration_precisions.split(",") if p]
    for name, precision in ((n, p) for n in names for p in precisions):
        raw = with_budget(case(name))
        spec = spec_from_dict(raw, f"<{name}>")
        raw_r = copy.deepcopy(raw)
        raw_r["memory"] = {"cpu_limit": "rlimit"}
        spec_r = spec_from_dict(raw_r, f"<{name} rlimit>")
        probe_c = Candidate(batch_size=args.batch, input_size=spec.default_input_size,
                            precision=precision)
        check_c = probe_c.with_batch(2 * args.batch)
        t0 = time.perf_counter()
        before = estimate(spec, check_c, CPU)
        store = calib.CalibrationStore()
        cal, probe = calib.probe(spec, probe_c, CPU, store)
        check = run_trial(spec, check_c, steps=1, allocator_view=True)
        if cal is None or not check.fits or check.memory is None:
            why = probe.message if cal is None else check.message
            out(f"{name} {precision}: probe or check trial did not fit: {why}")
            continue
        with calib.using(store):
            after = estimate(spec, check_c, CPU)
            after_r = estimate(spec_r, check_c, CPU)
        measured = check.memory.peak_bytes
        alloc = int(check.extra.get("allocator_peak_bytes") or 0)
        e_b, e_a = err_pct(before.peak_bytes, measured), err_pct(after.peak_bytes, measured)
        e_r = err_pct(after_r.peak_bytes, alloc)
        before_errs.append(e_b)
        after_errs.append(e_a)
        rlimit_errs.append(e_r)
        corrected = ", ".join(
            f"{c.op}: {fmt_mib(c.probes[-1].traced_per_call)} traced vs "
            f"{fmt_mib(c.probes[-1].real_per_call)} MiB real per call at batch "
            f"{c.probes[-1].batch_size}" for c in cal.ops.values()) or "-"
        rows.append([name, precision, f"{args.batch}>{2 * args.batch}", fmt_mib(measured), f"{e_b:+.2f}%",
                     f"{e_a:+.2f}%", corrected, fmt_mib(alloc), f"{err_pct(alloc, measured):+.2f}%",
                     f"{err_pct(after.peak_bytes, alloc):+.2f}%", f"{e_r:+.2f}%",
                     check.extra.get("allocator_peak_op") or "-"])
        notes += [f"{name}: {m}" for m in cal.messages]
        print(f"  {name:8s} {precision} before {e_b:+.2f}% after {e_a:+.2f}% rlimit vs allocator {e_r:+.2f}% "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    shutdown()
    out(f"## probe calibration: probe at batch {args.batch}, checked at batch {2 * args.batch} "
        "(no checkpointing)")
    out()
    if rows:
        out(markdown_table(header, rows))
        out()
    out("before / after: (estimate - trial) / trial without / with the probe's calibration. "
        "alloc +: (allocator - trial) / trial. vs alloc: the calibrated prediction against the "
        "allocator view; rlimit: the prediction with cpu_limit: rlimit (probe's allocator excess "
        "added) against it.")
    out()
    out("probe messages:")
    out()
    for line in notes:
        out(f"- {line}")
    out()

    def mx(values: list[float]) -> str:
        return f"{max(abs(v) for v in values):.2f}%" if values else "-"

    line = (f"calibration: {len(rows)} rows, max |error| before {mx(before_errs)}, after "
            f"{mx(after_errs)} ({sum(abs(v) < 3.0 for v in after_errs)}/{len(after_errs)} within "
            f"3%), rlimit vs allocator {mx(rlimit_errs)}")
    out(line)
    out()
    return line


STEP_KIND_CONFIGS = {"hf_gpt2": "configs/hf_gpt2.yaml", "hf_bert": "configs/hf_bert.yaml",
                     "lightning": "configs/lightning.yaml"}


def step_kind_rows() -> list[dict[str, Any]]:
    """The step-kind rows: label, the kind expected, the spec dict, its source, or why skipped."""
    import importlib.util

    import yaml

    def config(name: str) -> tuple[dict[str, Any], str]:
        path = ROOT / STEP_KIND_CONFIGS[name]
        return yaml.safe_load(path.read_text(encoding="utf-8")), str(path)

    missing = {mod: f"{mod} is not installed (pip install {mod})"
               for mod in ("transformers", "lightning") if importlib.util.find_spec(mod) is None}
    rows: list[dict[str, Any]] = []
    for name, needs in (("hf_gpt2", "transformers"), ("hf_bert", "transformers"),
                        ("lightning", "lightning")):
        if needs in missing:
            rows.append({"case": name, "kind": "-", "skip": missing[needs]})
            continue
        raw, source = config(name)
        if name == "hf_gpt2":
            rows.append({"case": name, "kind": "hf", "raw": raw, "source": source})
            rows.append({"case": name, "kind": "hf_trainer", "raw": {**raw, "step": "hf_trainer"},
                         "source": source})
        elif name == "hf_bert":
            held = {k: v for k, v in raw.items() if k != "step"}
            rows.append({"case": name, "kind": "hf", "raw": held, "source": source})
            rows.append({"case": name, "kind": "hf_trainer", "raw": raw, "source": source})
        else:
            rows.append({"case": name, "kind": "lightning", "raw": raw, "source": source})
            manual = {**raw, "model": {**raw["model"],
                                       "class_path": "bench_estimate.LitClassifierManual"}}
            rows.append({"case": "lightning (manual)", "kind": "lightning_manual", "raw": manual,
                         "source": source})
    resnet = with_budget(case("resnet"), "64MiB")
    rows.append({"case": "resnet", "kind": "custom",
                 "raw": {**resnet, "step": "custom_step.clip_ema_accum"}, "source": "<resnet>"})
    rows.append({"case": "resnet", "kind": "custom_forward",
                 "raw": {**resnet, "step": "bench_estimate.smoothed_forward"},
                 "source": "<resnet>"})
    return rows


def _run_step_kinds(args: argparse.Namespace, runner: ForkRunner, out: Report,
                    precisions: list[str]) -> dict[str, list[float]]:
    """The step-kind table: predicted vs measured for every step kind but autofit's own."""
    from autofit.candidate import Candidate
    from autofit.predict import CPU, estimate
    from autofit.spec import spec_from_dict

    header = ["config", "step kind", "prec", "batch", "predicted MiB", "tracker MiB", "err",
              "profiler MiB", "err vs prof", "trace s", "peak phase"]
    rows: list[list[Any]] = []
    errs: dict[str, list[float]] = {"tracker": [], "profiler": []}
    measured: dict[tuple[str, str, str], tuple[int, int]] = {}
    skipped: list[str] = []
    for item in step_kind_rows():
        if "skip" in item:
            skipped.append(f"{item['case']}: skipped, {item['skip']}")
            print(f"  {item['case']}: skipped, {item['skip']}", flush=True)
            continue
        spec = spec_from_dict(item["raw"], item["source"])
        for precision in precisions:
            cand = Candidate(batch_size=args.batch, input_size=spec.default_input_size,
                             precision=precision, checkpoint_segments=0)
            try:
                est = estimate(spec, cand, CPU)
                real = runner.call(measure_real, item["raw"], cand.to_dict(), MEASURE_STEPS,
                                   item["source"])
            except Exception as exc:  # noqa: BLE001 - reported in the table's notes
                line = f"{item['case']} {item['kind']} {precision}: failed: {str(exc).splitlines()[0]}"
                skipped.append(line)
                print(f"  {line}", flush=True)
                continue
            kind = real["step_kind"]
            e_t = err_pct(est.peak_bytes, real["tracker_peak"])
            e_p = err_pct(est.peak_bytes, real["profiler_peak"])
            errs["tracker"].append(e_t)
            errs["profiler"].append(e_p)
            measured[(item["case"], kind, precision)] = (est.peak_bytes, real["tracker_peak"])
            rows.append([item["case"], kind if kind == item["kind"] else f"{kind} (expected "
                         f"{item['kind']})", precision, args.batch, fmt_mib(est.peak_bytes),
                         fmt_mib(real["tracker_peak"]), f"{e_t:+.2f}%",
                         fmt_mib(real["profiler_peak"]), f"{e_p:+.2f}%", f"{est.trace_time_s:.2f}",
                         f"{est.breakdown.peak_phase}/{real['tracker_phase']}"])
            print(f"  {item['case']:9s} {kind:16s} {precision}: predicted "
                  f"{fmt_mib(est.peak_bytes)} MiB, tracker {fmt_mib(real['tracker_peak'])}, "
                  f"profiler {fmt_mib(real['profiler_peak'])} (real step {real['step_s']:.2f} s)",
                  flush=True)
    out("## step kinds: predicted vs measured for each training step autofit proves")
    out()
    if rows:
        out(markdown_table(header, rows))
        out()
    for line in skipped:
        out(f"- {line}")
    if skipped:
        out()
    out("tracker: MemoryTracker over the step kind's real TrainingJob.run_step (what the CPU "
        "trials measure), in a forked process; err: (predicted - tracker) / tracker.")
    out()
    pairs = []
    for (name, kind, precision), (pred_held, real_held) in measured.items():
        if kind != "hf" or (name, "hf_trainer", precision) not in measured:
            continue
        pred_freed, real_freed = measured[(name, "hf_trainer", precision)]
        diff = real_held - real_freed
        pairs.append(f"- {name} {precision}, batch {args.batch}: output held (hf) "
                     f"{fmt_mib(real_held)} MiB vs freed (hf_trainer) {fmt_mib(real_freed)} MiB "
                     f"measured: holding the output costs {diff / 2**20:+.2f} MiB "
                     f"({err_pct(real_held, real_freed):+.1f}% over the freed step's peak); "
                     f"predicted {fmt_mib(pred_held)} vs {fmt_mib(pred_freed)} MiB "
                     f"({(pred_held - pred_freed) / 2**20:+.2f} MiB)")
    if pairs:
        out("output held vs freed (the same model, hf vs hf_trainer step):")
        out()
        for line in pairs:
            out(line)
        out()
    return errs


if __name__ == "__main__":
    main()
