"""Benchmark: autofit ``tune`` against the anchors, Lightning's and accelerate's batch finders.

Usage::

    python scripts/bench_anchors.py              # mlp, resnet, vit, gpt, lightning (~10-13 min on 2 cores)
    python scripts/bench_anchors.py --quick      # mlp, gpt and lightning (~8 min)
    python scripts/bench_anchors.py --cases lightning   # only the Lightning-loop case (~5-9 min,
                                                 # most of it the ~108-trial true-max scan)
    python scripts/bench_anchors.py --markdown out/bench_anchors.md
    pip install -e .[bench]                      # lightning + accelerate (the anchors)

Issue targets (printed, never asserted): on every zoo config autofit uses <= 1/4 of Lightning
binsearch's real training steps; autofit's batch is >= Lightning's and is the true maximum
under the same margin; autofit never returns a batch it did not run. The cases where an
anchor returns an unrun or non-fitting batch are listed.

Contenders, each on CPU, fp32, same model, optimizer, loss and synthetic data (the zoo case's
spec, ``scripts/_zoo_cases.py``) and the same memory limit, budget x (1 - margin) =
``autofit.search.plan.plan_limits(spec).limit_bytes``:

* ``autofit``: ``autofit.search.tuner.run_search(spec)`` (in-memory study), ``steps_per_trial 3`` (each trial
  runs 2 warm-up + 3 timed steps in its own forked process) and ``verify_steps 10`` (the
  winner re-runs 2 + 10 steps). Its trials enforce the limit with
  ``autofit.memory.MemoryTracker(limit_bytes=...)``. A variant row, ``autofit lean``, runs
  ``steps_per_trial 1`` (2 warm-up + 1 = Lightning's 3 steps per trial) and ``verify_steps
  0``; it is not the row the targets are read from.
* ``Lightning power`` / ``Lightning binsearch``: ``Tuner(trainer).scale_batch_size(model,
  mode=..., steps_per_trial=3, init_val=2, max_trials=25)`` with the installed version's other
  defaults (binsearch then shrinks its answer by ``margin=0.05``), ``Trainer(accelerator="cpu",
  devices=1, max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
  enable_model_summary=False)``. A ``LightningModule`` wraps the zoo model; its
  ``train_dataloader`` reads ``self.batch_size``.
* ``accelerate``: ``accelerate.utils.find_executable_batch_size(starting_batch_size=128)``
  (accelerate's default start) around a function that builds model + optimizer and runs 3
  training steps from a ``DataLoader`` at the batch it is given; on OOM it retries at
  ``int(0.9 * batch)``.

Same budget for all. Each anchor runs in a fresh Python process (``--worker``), with the
wrapped model's parameters and buffers counted first and its whole search inside
``scripts/_anchor_budget.AllocatorBudgetTracker``: autofit's ``MemoryTracker`` (the same
live-tensor-byte accounting and limit as autofit's CPU trials), whose OOM is an
``AllocatorBudgetExceeded``, a subclass of autofit's ``BudgetExceeded`` (so a
``torch.OutOfMemoryError`` and a ``RuntimeError``) with one message argument that begins
"DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes; budget of L
bytes exceeded ...": the words PyTorch's CPU allocator uses when an allocation is refused,
which is what Lightning's ``is_oom_error`` and accelerate's ``should_reduce_batch_size``
look for on CPU. The tracker's own message ("CPU memory budget exceeded: ...") matches
neither, so without this an anchor would stop at its first OOM as if it had crashed. The
script checks both predicates against both errors at start-up and prints the result. The
anchors' own code is not patched; Lightning's trial function is wrapped only to record
which batch each trial ran and how it ended.

The budget emulates a device of that size, so it counts what would be device memory:

* a refused allocation is uncounted when the error is raised (``MemoryTracker`` sees op
  outputs after the op, so the storage that crossed the limit would otherwise stay counted
  while the traceback lives, and any allocation in the anchor's OOM handler would fail too);
* host-side work is outside it (``_anchor_budget.outside_budget``): making and collating
  samples (a map-style dataset that makes each sample when read; Lightning's loop also
  prefetches the next batch on the host) and Lightning's checkpoint save/restore around its
  search (``torch.load`` to the host, copied into the parameters in place). The batch's copy
  to the device is inside it: Lightning's ``transfer_batch_to_device`` hook and the accelerate
  loop clone the batch, as autofit's step makes its batch on the device.

Columns (one row per case x contender):

* ``trials``: real trials (Lightning: calls of its trial loop; accelerate: calls of the
  decorated function; autofit: ``TuneResult.real_trials``);
* ``steps``: training steps started, including a step that ran out of memory (Lightning:
  ``training_step`` calls; accelerate: batches taken by the loop; autofit: ``steps_run`` of
  each trial that fit, and warm-up + steps (2 + 3) for a trial that ran out of memory, an upper
  bound: an OOM trial's result says neither how many steps it ran nor in which it stopped;
  ``TuneResult.real_steps``, which counts those trials as 0, is given in the notes);
* ``wall s``: the search's wall time (anchors: ``Trainer`` construction + ``scale_batch_size``,
  or the decorated call; autofit: the ``tune()`` call, predictions and forked trial processes
  included; autofit's fork server is started before the clock, as the anchors' imports are);
  ``x autofit``: that over autofit's;
* ``returned``: the batch the tool returns; ``true max``: the largest batch that fits,
  from an exhaustive scan (``autofit.trials.run_trial`` at batch 1, 2, 3, ... with 2 warm-up
  steps and no timed steps, under the same limit, up to the first OOM and 2 more batches
  above it to check the boundary is monotone);
* ``ran?``: whether the tool ran the returned batch to completion in its own search (``yes``),
  only saw it run out of memory (``OOM``) or never ran it (``NO``);
* ``fits?``: whether the returned batch fits in the reference training step under the limit
  (from the scan; a batch outside the scan gets its own trial);
* ``own loop``: the largest batch that completed and the smallest that ran out of memory in
  tool's own trials. That boundary belongs to the tool's loop: the reference step keeps the
  model output referenced through backward (``out = model(x); loss = crit(out, y);
  loss.backward()``, as the accelerate loop here does), while Lightning's ``training_step``
  returns the loss and drops the output before backward, so Lightning's own boundary can sit
  above the true max (GPT: the logits).

The targets table reads the ``autofit`` row (not the variant): steps and trials over
Lightning binsearch's, autofit's batch against both Lightning modes' and the true max, and
whether autofit ran its batch.

The ``lightning`` case (its own section) is the user's LightningModule in Lightning's own loop
on both sides: ``configs/lightning.yaml`` (``LitClassifier``, 64 MiB, margin 0.10) as shipped.
autofit tunes it with ``run_search`` (its trials run Lightning's automatic-optimization step,
step kind ``lightning``); Lightning's ``BatchSizeFinder`` (``Tuner.scale_batch_size``, power
and binsearch) runs on the same ``LitClassifier`` built from the config's ``class_path`` /
``init_args``, unwrapped, with ``batch_size`` on a ``LightningDataModule``, under the same
limit and budget machinery as the zoo rows. The true max is the exhaustive scan of autofit's
Lightning-loop trial. The line under its table reads autofit's batch and trial count next to
Lightning binsearch's: the target is a batch >= Lightning's in fewer trials.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _early_threads() -> None:
    """Pin torch threads in this process and every child before torch is imported."""
    threads = "1"
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            threads = sys.argv[i + 1]
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    if threads != "0":
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = threads


_early_threads()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _zoo_cases import (  # noqa: E402
    BUDGETS,
    MARGIN,
    Report,
    case_names,
    machine_line,
    markdown_table,
    spec_of,
)

ROOT = Path(__file__).resolve().parent.parent
"""Per-case budgets (binary MiB) that put the largest fp32 batch at ~25-45. The mlp's peak is
in the optimizer step (parameters, gradients and AdamW state, ~21.3 MiB) and grows by only
~3 KiB per sample, so its budget is close to that floor."""
QUICK = ["mlp", "gpt"]
SEARCH = {"batch_size": {"min": 1, "max": 65536}, "precision": ["fp32"],
          "checkpoint_segments": [0], "steps_per_trial": 3, "warmup_steps": 2,
          "verify_steps": 10}
ANCHOR_STEPS = 3
LIGHTNING_INIT = 2
LIGHTNING_MAX_TRIALS = 25
ACCELERATE_START = 128
SCAN_WARMUP = 2
SCAN_ABOVE = 2
SCAN_CAP = 1024
WORKER_TIMEOUT_S = 600
LEAN = {**SEARCH, "steps_per_trial": 1, "verify_steps": 0}
"""The variant row: 2 warm-up + 1 step per trial (Lightning's 3 steps per trial), no verify."""
CONTENDERS = ["autofit", "lightning-power", "lightning-binsearch", "accelerate"]
LABELS = {"autofit": "autofit", "autofit-lean": "autofit lean (variant)",
          "lightning-power": "Lightning power", "lightning-binsearch": "Lightning binsearch",
          "accelerate": "accelerate"}


LIGHTNING_CASE = "lightning"
LIGHTNING_CONFIG = ROOT / "configs" / "lightning.yaml"
"""The Lightning-loop case: ``configs/lightning.yaml`` (``LitClassifier``) as shipped, tuned by
autofit in Lightning's loop and searched by Lightning's BatchSizeFinder on the same module."""
LIGHTNING_CONTENDERS = ["autofit", "lightning-power", "lightning-binsearch"]


def case_spec(name: str, search: dict[str, Any] | None = None) -> Any:
    if name == LIGHTNING_CASE:
        from autofit.spec import load_spec

        return load_spec(LIGHTNING_CONFIG)
    return spec_of(name, BUDGETS[name], margin=MARGIN, search=search or SEARCH)


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for mod in ("lightning", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - reported, the bench goes on
            out[mod] = f"not installed ({type(exc).__name__})"
    return out


# --------------------------------------------------------------------------- anchor side


def _synthetic(spec: Any) -> tuple[Any, Any, Any, Any]:
    """(model, dataset, collate_fn, loss_fn): the spec's model, host-side synthetic samples
    and their collate function (both outside the budget), the spec's loss."""
    import torch
    from _anchor_budget import outside_budget
    from torch.utils.data import default_collate

    from autofit.build import build_loss, build_model, make_input, make_target, model_output_tensor
    from autofit.candidate import Candidate

    one = Candidate(batch_size=1, input_size=spec.default_input_size)
    cpu = torch.device("cpu")
    net = build_model(spec, one.input_size)
    net.train()
    with torch.no_grad():  # output shape (for the targets), before any budget is in force
        out_shape = model_output_tensor(net(make_input(spec, one, cpu))).shape

    class Samples(torch.utils.data.Dataset):
        """Each sample made when read; the DataLoader's collate stacks them into the batch."""

        def __len__(self) -> int:
            return 1 << 24  # far above any batch: Lightning stops scaling at the dataset size

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            with outside_budget():
                return make_input(spec, one, cpu)[0], make_target(spec, out_shape, cpu)[0]

    def host_collate(samples: list[Any]) -> Any:
        with outside_budget():
            return default_collate(samples)

    return net, Samples(), host_collate, build_loss(spec)


def run_lightning(spec: Any, limit: int, mode: str) -> dict[str, Any]:
    import logging
    import warnings

    import lightning.pytorch as L
    from _anchor_budget import to_device
    from torch.utils.data import DataLoader

    from autofit.build import build_optimizer

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    net, data, collate, loss_fn = _synthetic(spec)
    counts = {"steps": 0}

    class Wrapped(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.batch_size = LIGHTNING_INIT

        def train_dataloader(self) -> DataLoader:
            return DataLoader(data, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

        def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
            return to_device(batch)  # the device copy of the batch, inside the budget

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            counts["steps"] += 1
            x, y = batch
            return loss_fn(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return build_optimizer(spec, self.net, "cpu")

    return _lightning_search(Wrapped(), limit, mode, counts)


def run_lightning_module(spec: Any, limit: int, mode: str) -> dict[str, Any]:
    """Lightning's BatchSizeFinder on the spec's own LightningModule (configs/lightning.yaml).

    The module is built as autofit builds it (``build_model``: ``class_path`` + ``init_args``)
    and is not wrapped or changed: the batch size lives on a ``LightningDataModule`` (where
    ``BatchSizeFinder`` looks for it when the module has none), whose ``train_dataloader``
    makes the spec's samples on the host and whose ``transfer_batch_to_device`` makes the
    counted device copy. ``training_step`` calls are counted through an instance attribute
    that calls the class's own method (the search removes the Trainer's callbacks).
    """
    import logging
    import warnings

    import lightning.pytorch as L
    import torch
    from _anchor_budget import outside_budget, to_device
    from torch.utils.data import DataLoader, Dataset, default_collate

    from autofit.batch import make_batch
    from autofit.build import build_model
    from autofit.candidate import Candidate

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    one = Candidate(batch_size=1, input_size=spec.default_input_size)
    cpu = torch.device("cpu")
    module = build_model(spec, one.input_size)
    module.train()

    class Samples(Dataset):
        """The spec's (x, y) samples, each made when read, on the host."""

        def __len__(self) -> int:
            return 1 << 24

        def __getitem__(self, index: int) -> Any:
            with outside_budget():
                return tuple(t[0] for t in make_batch(spec, one, cpu).value)

    def host_collate(samples: list[Any]) -> Any:
        with outside_budget():
            return default_collate(samples)

    class Data(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = LIGHTNING_INIT

        def train_dataloader(self) -> DataLoader:
            return DataLoader(Samples(), batch_size=self.batch_size, shuffle=False,
                              collate_fn=host_collate)

        def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
            return to_device(batch)

    counts = {"steps": 0}
    training_step = module.training_step  # the class's own, bound

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts["steps"] += 1
        return training_step(*args, **kwargs)

    # an instance attribute counts the calls; the search itself drops Trainer callbacks
    module.training_step = counted
    return _lightning_search(module, limit, mode, counts, datamodule=Data())


def _lightning_search(model: Any, limit: int, mode: str, counts: dict[str, int], *,
                      datamodule: Any = None) -> dict[str, Any]:
    """``Tuner(trainer).scale_batch_size`` (Lightning's BatchSizeFinder) under the budget."""
    import lightning.pytorch as L
    import lightning.pytorch.tuner.batch_size_scaling as bss
    from _anchor_budget import budget, outside_budget
    from lightning.pytorch.tuner import Tuner
    from lightning.pytorch.utilities.memory import is_oom_error

    trials: list[dict[str, Any]] = []
    holder = datamodule if datamodule is not None else model
    original = bss._try_loop_run

    def recorded(trainer: Any, params: Any) -> None:
        record: dict[str, Any] = {"batch": int(holder.batch_size),
                                  "status": "?", "steps": 0}
        trials.append(record)
        before = counts["steps"]
        try:
            original(trainer, params)
            record["status"] = "ok"
        except BaseException as exc:
            record["status"] = "oom" if is_oom_error(exc) else f"error {type(exc).__name__}"
            raise
        finally:
            record["steps"] = counts["steps"] - before

    bss._try_loop_run = recorded
    result: dict[str, Any] = {"trials": trials}
    with tempfile.TemporaryDirectory(prefix="bench-anchors-") as tmp:
        t0 = time.perf_counter()
        try:
            with budget(limit, model) as tracker:
                trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=ANCHOR_STEPS,
                                    logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False,
                                    default_root_dir=tmp)
                _host_checkpoints(trainer, outside_budget)
                found = Tuner(trainer).scale_batch_size(
                    model, datamodule=datamodule, mode=mode, steps_per_trial=ANCHOR_STEPS,
                    init_val=LIGHTNING_INIT, max_trials=LIGHTNING_MAX_TRIALS)
            result["returned"] = None if found is None else int(found)
        except BaseException as exc:  # noqa: BLE001 - reported in the table
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        result["wall_s"] = time.perf_counter() - t0
    result["steps"] = counts["steps"]
    result["tracker_ooms"] = tracker.ooms if "tracker" in locals() else None
    return result


def _host_checkpoints(trainer: Any, outside_budget: Any) -> None:
    """Lightning's checkpoint save/restore around the search: host memory on a GPU."""
    connector = trainer._checkpoint_connector
    save, restore = trainer.save_checkpoint, connector.restore

    def host_save(*args: Any, **kwargs: Any) -> Any:
        with outside_budget():
            return save(*args, **kwargs)

    def host_restore(*args: Any, **kwargs: Any) -> Any:
        with outside_budget():
            return restore(*args, **kwargs)

    trainer.save_checkpoint = host_save
    connector.restore = host_restore


def run_accelerate(spec: Any, limit: int, start: int) -> dict[str, Any]:
    import warnings

    from _anchor_budget import budget, to_device
    from accelerate.utils import find_executable_batch_size
    from accelerate.utils.memory import should_reduce_batch_size
    from torch.utils.data import DataLoader

    from autofit.build import build_model, build_optimizer

    warnings.filterwarnings("ignore")
    _, data, collate, loss_fn = _synthetic(spec)
    trials: list[dict[str, Any]] = []
    counts = {"steps": 0}

    @find_executable_batch_size(starting_batch_size=start)
    def train(batch_size: int) -> int:
        record: dict[str, Any] = {"batch": int(batch_size), "status": "?", "steps": 0}
        trials.append(record)
        try:
            net = build_model(spec, spec.default_input_size)
            net.train()
            optimizer = build_optimizer(spec, net, "cpu")
            loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
            for _, batch in zip(range(ANCHOR_STEPS), loader, strict=False):
                record["steps"] += 1
                counts["steps"] += 1
                x, y = to_device(batch)  # what accelerate's prepared DataLoader does
                out = net(x)
                loss = loss_fn(out, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            record["status"] = "ok"
            return batch_size
        except BaseException as exc:
            record["status"] = "oom" if should_reduce_batch_size(exc) else f"error {type(exc).__name__}"
            raise

    result: dict[str, Any] = {"trials": trials, "start": start}
    t0 = time.perf_counter()
    try:
        with budget(limit) as tracker:  # the model is built inside: its parameters count there
            found = train()
        result["returned"] = int(found)
    except BaseException as exc:  # noqa: BLE001 - reported in the table
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    result["wall_s"] = time.perf_counter() - t0
    result["steps"] = counts["steps"]
    result["tracker_ooms"] = tracker.ooms if "tracker" in locals() else None
    return result


def worker_main(kind: str, case: str) -> None:
    """Child process: run one anchor on one case, print one JSON line."""
    from autofit.search.plan import plan_limits

    spec = case_spec(case)
    limit = plan_limits(spec).limit_bytes
    try:
        if kind.startswith("lightning-") and case == LIGHTNING_CASE:
            result = run_lightning_module(spec, limit, kind.split("-", 1)[1])
        elif kind.startswith("lightning-"):
            result = run_lightning(spec, limit, kind.split("-", 1)[1])
        elif kind == "accelerate":
            result = run_accelerate(spec, limit, ACCELERATE_START)
        else:
            raise SystemExit(f"unknown anchor {kind!r}")
    except ImportError as exc:
        result = {"error": f"not installed: {exc}", "trials": [], "steps": 0, "wall_s": 0.0}
    result["limit_bytes"] = limit
    print("@@ANCHOR " + json.dumps(result), flush=True)


def run_anchor(kind: str, case: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--case", case]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                              env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {WORKER_TIMEOUT_S} s", "trials": [], "steps": 0,
                "wall_s": float(WORKER_TIMEOUT_S)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@ANCHOR "):
            return json.loads(line[len("@@ANCHOR "):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])[-400:]
    return {"error": f"worker exited {proc.returncode}: {tail}", "trials": [], "steps": 0,
            "wall_s": 0.0}


# --------------------------------------------------------------------------- autofit side


def run_autofit(spec: Any) -> dict[str, Any]:
    from autofit.search.tuner import run_search as tune
    from autofit.trials import run_trial

    trials: list[dict[str, Any]] = []
    warmup = spec.search.warmup_steps

    def runner(spec_: Any, candidate: Any, **kwargs: Any) -> Any:
        result = run_trial(spec_, candidate, **kwargs)
        steps = kwargs.get("steps")
        steps = spec_.search.steps_per_trial if steps is None else steps
        # an OOM trial reports steps_run 0 (autofit.worker sets it only on success): count
        # every step it would have run, an upper bound; a nonzero count is used as given
        started = result.steps_run if result.fits or result.steps_run else warmup + steps
        trials.append({"batch": candidate.batch_size, "status": "ok" if result.fits else
                       result.status.value, "steps": started, "steps_run": result.steps_run,
                       "verify": False, "result_id": id(result)})
        return result

    runner.out_of_process = True  # type: ignore[attr-defined]  # run_trial's own process
    out: dict[str, Any] = {"trials": trials}
    t0 = time.perf_counter()
    try:
        result = tune(spec, runner=runner)
        out["returned"] = result.best.result.candidate.batch_size if result.best else None
        out["predicted"] = result.settings[0].predicted_batch_size if result.settings else None
        out["self_reported_steps"] = result.real_steps
        out["predict_s"] = result.predict_s
        out["real_trials"] = result.real_trials
        out["purposes"] = [t.purpose for t in result.trials]
        # the verification is the trial whose record says so (on a CPU budget it runs 2 timed
        # steps, not verify_steps, so its step count cannot tell it from a search trial)
        verify_ids = {id(t.result) for t in result.trials if t.purpose.value == "verify"}
        for t in trials:
            t["verify"] = t["result_id"] in verify_ids
    except Exception as exc:  # noqa: BLE001 - reported in the table
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    out["wall_s"] = time.perf_counter() - t0
    out["steps"] = sum(t["steps"] for t in trials)
    for t in trials:
        t.pop("result_id", None)
    return out


def scan_true_max(spec: Any, limit: int, say: Any) -> dict[str, Any]:
    """Exhaustive: batch 1, 2, 3, ... until the first OOM, then SCAN_ABOVE more above it."""
    from autofit.candidate import Candidate
    from autofit.trials import run_trial

    fits: dict[int, bool] = {}
    t0 = time.perf_counter()

    def trial(batch: int) -> bool:
        cand = Candidate(batch_size=batch, input_size=spec.default_input_size)
        result = run_trial(spec, cand, limit_bytes=limit, steps=0, warmup_steps=SCAN_WARMUP)
        if result.status.value not in ("fits", "oom"):
            raise RuntimeError(f"scan trial at batch {batch} ended as {result.status.value}: "
                               f"{result.message}")
        fits[batch] = result.fits
        return result.fits

    batch = 1
    while batch <= SCAN_CAP and trial(batch):
        batch += 1
    first_oom = batch
    for extra in range(1, SCAN_ABOVE + 1):
        trial(first_oom + extra)
    monotone = not any(fits[first_oom + e] for e in range(1, SCAN_ABOVE + 1))
    say(f"  exhaustive scan: {len(fits)} trials, first OOM at batch {first_oom}"
        f"{'' if monotone else ' (NOT monotone above it)'}, {time.perf_counter() - t0:.1f} s")
    return {"true_max": first_oom - 1, "fits": fits, "trials": len(fits), "monotone": monotone,
            "wall_s": time.perf_counter() - t0, "trial": trial}


# --------------------------------------------------------------------------- report


def own_loop(trials: list[dict[str, Any]]) -> str:
    ok = [t["batch"] for t in trials if t["status"] == "ok"]
    oom = [t["batch"] for t in trials if t["status"] == "oom"]
    parts = []
    if ok:
        parts.append(f"ok <= {max(ok)}")
    if oom:
        parts.append(f"OOM >= {min(oom)}")
    return ", ".join(parts) or "-"


def ran_status(returned: int | None, trials: list[dict[str, Any]]) -> str:
    if returned is None:
        return "-"
    statuses = {t["status"] for t in trials if t["batch"] == returned}
    if "ok" in statuses:
        return "yes"
    if statuses:
        return "OOM"
    return "NO"


def fits_status(returned: int | None, scan: dict[str, Any]) -> str:
    if returned is None:
        return "-"
    fits = scan["fits"]
    if returned not in fits:
        if returned < scan["true_max"]:
            return "yes"
        scan["trial"](returned)
    return "yes" if fits[returned] else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK)}")
    parser.add_argument("--cases", nargs="+", choices=[*case_names(), LIGHTNING_CASE],
                        help=f"cases to run ({LIGHTNING_CASE}: configs/lightning.yaml in "
                             "Lightning's loop vs Lightning's BatchSizeFinder)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    parser.add_argument("--threads", default="1",
                        help="torch threads in every process (default 1; 0 = torch's own default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.case)
        return

    import torch
    from _anchor_budget import AllocatorBudgetExceeded, anchors_recognise

    from autofit.memory import BudgetExceeded
    from autofit.search.plan import plan_limits
    from autofit.trials import runner as trial_mod

    started = time.perf_counter()
    out = Report()

    def say(text: str) -> None:
        print(text, flush=True)

    names = args.cases or [*(QUICK if args.quick else case_names()), LIGHTNING_CASE]
    zoo = [n for n in names if n != LIGHTNING_CASE]
    vers = versions()
    out("# bench_anchors: autofit tune vs Lightning and accelerate batch-size finders")
    out()
    out(machine_line())
    out(f"lightning {vers['lightning']} | accelerate {vers['accelerate']} | torch threads per "
        f"process: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    out(f"cases: {', '.join(names)}; device cpu, fp32, margin {MARGIN}; every contender under the "
        "same limit budget x (1 - margin), counted by autofit's MemoryTracker (live tensor bytes, "
        "parameters and buffers first)")
    ours = AllocatorBudgetExceeded("DefaultCPUAllocator: can't allocate memory: you tried to "
                                   "allocate 4096 bytes; budget of 1024 bytes exceeded")
    plain = BudgetExceeded("CPU memory budget exceeded: 4096 live tensor bytes > limit 1024")
    r_ours, r_plain = anchors_recognise(ours), anchors_recognise(plain)
    out("anchors' OOM error: an allocator-style OOM raised by the same budget (a BudgetExceeded / "
        "torch.OutOfMemoryError whose message starts \"DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate N bytes; budget of L bytes exceeded\", the CPU "
        f"allocator's words): recognised as OOM by Lightning is_oom_error={r_ours['lightning']}, "
        f"accelerate should_reduce_batch_size={r_ours['accelerate']} (the tracker's own message "
        f"\"CPU memory budget exceeded\": {r_plain['lightning']}, {r_plain['accelerate']})")
    out(f"autofit: steps_per_trial {SEARCH['steps_per_trial']} (+{SEARCH['warmup_steps']} warm-up), "
        f"verify_steps {SEARCH['verify_steps']} (+{SEARCH['warmup_steps']}); Lightning: "
        f"steps_per_trial {ANCHOR_STEPS}, init_val {LIGHTNING_INIT}, max_trials "
        f"{LIGHTNING_MAX_TRIALS}, other defaults (binsearch margin 0.05); accelerate: "
        f"starting_batch_size {ACCELERATE_START}, {ANCHOR_STEPS} steps per try; true max: "
        f"exhaustive scan with run_trial ({SCAN_WARMUP} steps per batch)")
    out()

    trial_mod.prestart()  # autofit's fork server starts before the clock (anchors: imports)
    rows: list[list[Any]] = []
    summary: list[list[Any]] = []
    misses: list[str] = []
    targets: dict[str, list[bool]] = {"steps": [], "ge": [], "eq": [], "ran": []}
    for name in zoo:
        spec = case_spec(name)
        limit = plan_limits(spec).limit_bytes
        say(f"[{name}] budget {BUDGETS[name]}, limit {limit} bytes ({limit / 2**20:.3f} MiB)")
        results: dict[str, dict[str, Any]] = {}
        for kind in CONTENDERS:
            if kind == "autofit":
                results[kind] = run_autofit(spec)
            elif kind == "autofit-lean":
                results[kind] = run_autofit(case_spec(name, LEAN))
            else:
                results[kind] = run_anchor(kind, name)
            r = results[kind]
            say(f"  {LABELS[kind]}: {r.get('returned')} in {len(r['trials'])} trials, "
                f"{r['wall_s']:.1f} s {r.get('error', '')}")
        scan = scan_true_max(spec, limit, say)
        true_max = scan["true_max"]
        auto_wall = results["autofit"]["wall_s"] or float("nan")
        for kind in CONTENDERS:
            r = results[kind]
            returned = r.get("returned")
            ran = ran_status(returned, r["trials"])
            fits = fits_status(returned, scan)
            notes = []
            if kind.startswith("autofit"):
                verify = [t for t in r["trials"] if t["verify"]]
                seq = ", ".join(f"{t['batch']} {t['status'].replace('ok', 'fits')}"
                                + (" (verify)" if t["verify"] else "") for t in r["trials"])
                notes.append(f"trials {seq}")
                notes.append(f"predicted {r.get('predicted')} ({r.get('predict_s', 0):.1f} s); "
                             f"steps {r['steps'] - sum(t['steps'] for t in verify)} search"
                             + (f" + {sum(t['steps'] for t in verify)} verify" if verify else ""))
                if r.get("self_reported_steps") is not None and r["self_reported_steps"] != r["steps"]:
                    notes.append(f"real_steps says {r['self_reported_steps']}")
            elif kind == "lightning-binsearch" and returned is not None:
                ok = [t["batch"] for t in r["trials"] if t["status"] == "ok"]
                if ok and max(ok) != returned:
                    notes.append(f"search ended at {max(ok)}, x0.95 margin -> {returned}")
            elif kind == "accelerate":
                notes.append(f"start {r.get('start', ACCELERATE_START)}")
            n_oom = sum(1 for t in r["trials"] if t["status"] == "oom")
            if r.get("tracker_ooms") is not None and r["tracker_ooms"] != n_oom:
                notes.append(f"the budget raised {r['tracker_ooms']} OOMs, its trials saw {n_oom}")
            if r.get("error"):
                notes.append(f"ERROR {r['error']}")
            rows.append([name, LABELS[kind], len(r["trials"]), r["steps"], f"{r['wall_s']:.1f}",
                         f"{r['wall_s'] / auto_wall:.2f}x", returned if returned is not None else "-",
                         true_max, ran, fits, own_loop(r["trials"]), "; ".join(notes)])
            if not kind.startswith("autofit") and returned is not None and (ran != "yes" or fits != "yes"):
                misses.append(f"{name}: {LABELS[kind]} returned {returned} (true max {true_max}): "
                              f"ran? {ran}, fits? {fits}")
        a, lb, lp = results["autofit"], results["lightning-binsearch"], results["lightning-power"]
        a_search = a["steps"] - sum(t["steps"] for t in a["trials"] if t["verify"])
        ratio = a_search / lb["steps"] if lb["steps"] and not lb.get("error") else float("nan")
        all_ratio = a["steps"] / lb["steps"] if lb["steps"] and not lb.get("error") else float("nan")
        t_ratio = len(a["trials"]) / len(lb["trials"]) if lb["trials"] else float("nan")
        a_ret = a.get("returned")
        lmax = max([x.get("returned") or 0 for x in (lb, lp) if not x.get("error")], default=None)
        ge = a_ret is not None and lmax is not None and a_ret >= lmax
        eq = a_ret == true_max
        ran_ok = ran_status(a_ret, a["trials"]) == "yes"
        targets["steps"].append(ratio <= 0.25)
        targets["ge"].append(ge)
        targets["eq"].append(eq)
        targets["ran"].append(ran_ok)
        summary.append([name, BUDGETS[name], f"{limit / 2**20:.3f}", true_max, a_ret,
                        lp.get("returned", "-"), lb.get("returned", "-"),
                        results["accelerate"].get("returned", "-"),
                        f"{a_search} / {lb['steps']} = {ratio:.2f}", "yes" if ratio <= 0.25 else "NO",
                        f"{a['steps']} / {lb['steps']} = {all_ratio:.2f}",
                        f"{len(a['trials'])} / {len(lb['trials'])} = {t_ratio:.2f}",
                        "yes" if ge else "NO", "yes" if eq else "NO", "yes" if ran_ok else "NO",
                        f"{scan['trials']} ({scan['wall_s']:.0f} s)"
                        + ("" if scan["monotone"] else " NOT monotone")])

    if zoo:
        _zoo_report(out, zoo, rows, summary, targets, misses)
    if LIGHTNING_CASE in names:
        lightning_case(out, say)
    out(f"(bench wall time {time.perf_counter() - started:.0f} s)")
    out.write(args.markdown)
    trial_mod.shutdown()


def _zoo_report(out: Any, names: list[str], rows: list[list[Any]], summary: list[list[Any]],
                targets: dict[str, list[bool]], misses: list[str]) -> None:
    out("## per case and contender")
    out()
    out(markdown_table(["case", "contender", "trials", "steps", "wall s", "x autofit", "returned",
                        "true max", "ran?", "fits?", "own loop", "notes"], rows))
    out()
    out("own loop vs true max: the true max is the reference step's (autofit's TrainingJob: "
        "out = model(x); loss = crit(out, y); loss.backward(); step; zero_grad(set_to_none)). "
        "Lightning's loop differs both ways: it zeroes gradients after training_step and before "
        "backward, so the previous step's gradients are alive through the forward (more "
        "memory), and training_step returns the loss, so the model output is not held through "
        "backward (less memory, the logits on GPT). The accelerate loop here is the reference "
        "loop with a DataLoader.")
    out()
    out("## targets")
    out()
    out(markdown_table(["case", "budget", "limit MiB", "true max", "autofit", "L power",
                        "L binsearch", "accelerate", "search steps autofit / L binsearch", "<= 1/4?",
                        "all steps incl. verify / L binsearch", "trials autofit / L binsearch",
                        "autofit >= L?", "autofit == true max?", "autofit ran it?",
                        "scan trials"], summary))
    out()
    n = len(names)
    out(f"autofit search steps <= 1/4 of Lightning binsearch: {sum(targets['steps'])}/{n} "
        f"(search trials run 2 warm-up steps + 1 timed step; the verification run of "
        f"verify_steps + 2 steps comes on top, see the 'all steps' column); autofit >= "
        f"Lightning (both modes): {sum(targets['ge'])}/{n}; autofit == true max: "
        f"{sum(targets['eq'])}/{n}; autofit returned a batch it ran: {sum(targets['ran'])}/{n}")
    out()
    out("anchor answers that were never run to completion by the anchor, or do not fit:")
    for line in misses or ["(none)"]:
        out(f"- {line}")
    out()


def lightning_case(out: Any, say: Any) -> None:
    """configs/lightning.yaml: autofit's tune in Lightning's loop vs Lightning's BatchSizeFinder
    (power and binsearch) on the same LitClassifier, under the same limit."""
    from autofit.search.plan import plan_limits

    out(f"## Lightning's loop: {LIGHTNING_CONFIG.relative_to(ROOT)} (LitClassifier)")
    out()
    if versions()["lightning"].startswith("not installed"):
        line = f"skipped: lightning is {versions()['lightning']} (pip install lightning)"
        say(f"[{LIGHTNING_CASE}] {line}")
        out(line)
        out()
        return
    spec = case_spec(LIGHTNING_CASE)
    limit = plan_limits(spec).limit_bytes
    s = spec.search
    say(f"[{LIGHTNING_CASE}] budget {spec.memory.budget_text}, limit {limit} bytes "
        f"({limit / 2**20:.3f} MiB)")
    results: dict[str, dict[str, Any]] = {}
    for kind in LIGHTNING_CONTENDERS:
        results[kind] = run_autofit(spec) if kind == "autofit" else run_anchor(kind, LIGHTNING_CASE)
        r = results[kind]
        say(f"  {LABELS[kind]}: {r.get('returned')} in {len(r['trials'])} trials, "
            f"{r['wall_s']:.1f} s {r.get('error', '')}")
    scan = scan_true_max(spec, limit, say)
    true_max = scan["true_max"]
    auto_wall = results["autofit"]["wall_s"] or float("nan")
    rows = []
    for kind in LIGHTNING_CONTENDERS:
        r = results[kind]
        returned = r.get("returned")
        notes = []
        if kind == "autofit":
            seq = ", ".join(f"{t['batch']} {t['status'].replace('ok', 'fits')}"
                            + (" (verify)" if t["verify"] else "") for t in r["trials"])
            notes.append(f"trials {seq}")
            notes.append(f"predicted {r.get('predicted')} ({r.get('predict_s', 0):.1f} s)")
        elif kind == "lightning-binsearch" and returned is not None:
            ok = [t["batch"] for t in r["trials"] if t["status"] == "ok"]
            if ok and max(ok) != returned:
                notes.append(f"search ended at {max(ok)}, x0.95 margin -> {returned}")
        n_oom = sum(1 for t in r["trials"] if t["status"] == "oom")
        if r.get("tracker_ooms") is not None and r["tracker_ooms"] != n_oom:
            notes.append(f"the budget raised {r['tracker_ooms']} OOMs, its trials saw {n_oom}")
        if r.get("error"):
            notes.append(f"ERROR {r['error']}")
        rows.append([LABELS[kind], len(r["trials"]), r["steps"], f"{r['wall_s']:.1f}",
                     f"{r['wall_s'] / auto_wall:.2f}x", returned if returned is not None else "-",
                     true_max, ran_status(returned, r["trials"]), fits_status(returned, scan),
                     own_loop(r["trials"]), "; ".join(notes)])
    out(f"budget {spec.memory.budget_text} x (1 - {spec.memory.margin}) = limit {limit / 2**20:.3f} MiB "
        f"for every contender. autofit: `tune` of the config as shipped (step kind lightning: "
        f"training_step, zero_grad, backward, optimizer.step, with configure_optimizers()'s "
        f"AdamW + StepLR; steps_per_trial {s.steps_per_trial} + {s.warmup_steps} warm-up, "
        f"verify_steps {s.verify_steps}). Lightning: Tuner(trainer).scale_batch_size (its "
        f"BatchSizeFinder) on the same LitClassifier built from the config's class_path/"
        f"init_args, batch_size on a LightningDataModule, steps_per_trial {ANCHOR_STEPS}, "
        f"init_val {LIGHTNING_INIT}, max_trials {LIGHTNING_MAX_TRIALS}. true max: exhaustive "
        f"scan of autofit's Lightning-loop trial ({SCAN_WARMUP} steps per batch).")
    out()
    out(markdown_table(["contender", "trials", "steps", "wall s", "x autofit", "returned",
                        "true max", "ran?", "fits?", "own loop", "notes"], rows))
    out()
    a, lb = results["autofit"], results["lightning-binsearch"]
    a_ret, l_ret = a.get("returned"), lb.get("returned")
    ge = a_ret is not None and l_ret is not None and a_ret >= l_ret
    fewer = len(a["trials"]) < len(lb["trials"])
    out(f"autofit (Lightning's loop): batch {a_ret} in {len(a['trials'])} trials "
        f"({a['steps']} steps, verification included); Lightning BatchSizeFinder binsearch: "
        f"batch {l_ret} in {len(lb['trials'])} trials ({lb['steps']} steps); true max "
        f"{true_max}. autofit's batch >= Lightning's: {'yes' if ge else 'NO'}; fewer trials: "
        f"{'yes' if fewer else 'NO'}; scan {scan['trials']} trials ({scan['wall_s']:.0f} s)"
        + ("" if scan["monotone"] else ", NOT monotone"))
    out()


if __name__ == "__main__":
    main()
