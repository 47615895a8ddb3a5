"""A minimal plain-PyTorch training loop driven by an autofit ``tuned.yaml``: adapt it.

``autofit tune exp.yaml`` writes ``tuned.yaml`` (the spec pinned to the configuration that
fit, plus an ``autofit_tuned`` section) and launch scripts (``torchrun.sh``,
``submit_slurm.sh``, ``submit_lsf.sh``) that run ``output.train_command``, by default
``train.py --config tuned.yaml``. To launch this file, set in the spec::

    output:
      train_command: examples/train.py --config tuned.yaml

This script reads the tuned values with ``autofit.load_tuned``, builds the
spec's model, optimizer and loss with ``autofit.build``, and runs ``--steps`` optimizer steps,
each accumulating ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size``
samples under the tuned precision (autocast; a GradScaler for fp16) and activation
checkpointing. The data are synthetic (``autofit.build.make_input`` / ``make_target``):
replace ``batches`` with your data loader. Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins
the process group from the environment and wraps the model in DistributedDataParallel;
otherwise it runs as one process. Run it directly with::

    python examples/train.py --config tuned/tuned.yaml --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from autofit.build import (
    apply_checkpointing,
    build_loss,
    build_model,
    build_optimizer,
    import_object,
    make_input,
    make_target,
    model_output_tensor,
)
from autofit.candidate import Candidate
from autofit.choices import Precision
from autofit.errors import AutofitError
from autofit.export.tuned import TunedConfig, load_tuned
from autofit.spec import ExperimentSpec, spec_from_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.environ.get("AUTOFIT_TUNED_YAML", "tuned.yaml"),
                        help="tuned.yaml written by `autofit tune` (default: $AUTOFIT_TUNED_YAML "
                             "or tuned.yaml)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps to run (default 2)")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda (default: the spec's device; auto = cuda if available)")
    return parser.parse_args(argv)


def setup_distributed(device_name: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); joins the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:  # MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE come from torchrun
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, init_method="env://")
    return device, rank, world


def batches(spec: ExperimentSpec, cfg: TunedConfig, device: torch.device) -> Iterator[torch.Tensor]:
    """Synthetic micro-batches of the tuned shape: replace with your data loader."""
    candidate = Candidate(batch_size=cfg.micro_batch_size, input_size=cfg.input_size,
                          precision=Precision(cfg.precision),
                          checkpoint_segments=cfg.checkpoint_segments)
    while True:
        yield make_input(spec, candidate, device)


def micro_step_loss(spec: ExperimentSpec, model: nn.Module, x: torch.Tensor, cfg: TunedConfig,
                    device: torch.device, loss_fn: Any, user_step: Any) -> torch.Tensor:
    """Forward and loss of one micro-batch (under the caller's autocast)."""
    if user_step is not None:  # spec `step:`: the user's own step function computes the loss
        return user_step(model, cfg.micro_batch_size, cfg.input_size, device)
    output = model(x)
    target = None
    if spec.loss != "model":  # synthetic targets shaped like the output
        target = make_target(spec, model_output_tensor(output).shape, device)
    return loss_fn(output, target)


def train(cfg: TunedConfig, spec: ExperimentSpec, steps: int, device: torch.device, rank: int,
          world: int) -> None:
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(spec, cfg.input_size)
    model = apply_checkpointing(model, cfg.checkpoint_segments, spec.model.blocks).train()
    optimizer = build_optimizer(spec, model, device.type)
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        model = ddp
    loss_fn = build_loss(spec)
    user_step = import_object(spec.step, "step") if spec.step else None
    dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None
    scaler = torch.amp.GradScaler(device.type) if cfg.uses_grad_scaler else None
    accumulation = cfg.gradient_accumulation_steps
    data = batches(spec, cfg, device)
    for step in range(1, steps + 1):
        total = 0.0
        for micro in range(accumulation):
            last = micro == accumulation - 1
            # DDP: all-reduce the gradients only on the last micro-batch of the step
            sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
            autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                        else contextlib.nullcontext())
            with sync:
                with autocast:
                    loss = micro_step_loss(spec, model, next(data), cfg, device, loss_fn,
                                           user_step) / accumulation
                (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss.detach())
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}/{steps}: loss {total:.4f} (micro-batch {cfg.micro_batch_size} x "
                  f"{accumulation} accumulation x {world} process(es) = "
                  f"{cfg.micro_batch_size * accumulation * world} samples)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_tuned(args.config)
        spec = spec_from_dict(cfg.spec, source=args.config)
        device, rank, world = setup_distributed(args.device or spec.device)
        try:
            if rank == 0:
                print(f"{args.config}: micro-batch {cfg.micro_batch_size}, gradient accumulation "
                      f"{cfg.gradient_accumulation_steps}, {cfg.precision}, checkpoint segments "
                      f"{cfg.checkpoint_segments}, on {device} (tuned for world size "
                      f"{cfg.world_size}, global batch {cfg.global_batch_size})", flush=True)
            if rank == 0 and world != cfg.world_size:
                print(f"warning: {world} process(es) running, tuned.yaml plans for "
                      f"{cfg.world_size}: the global batch is "
                      f"{cfg.micro_batch_size * cfg.gradient_accumulation_steps * world}, "
                      f"not {cfg.global_batch_size}", file=sys.stderr, flush=True)
            train(cfg, spec, args.steps, device, rank, world)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    except AutofitError as exc:  # bad tuned.yaml, spec or model: one line per problem
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
