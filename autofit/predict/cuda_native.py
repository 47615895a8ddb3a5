"""CUDA-native traces: a CUDA target traced on fake *CUDA* tensors where this torch can.

On fake CUDA tensors the trace runs what the GPU runs: CUDA autocast's casts, SDPA's backend
choice (flash / memory-efficient instead of CPU attention) and the cuDNN ops, so the +8 to
+12 % of bf16 GPT-2 traced on fake CPU tensors goes away. The device model still adds what
no trace sees (cuBLAS workspace, the allocator's reserve).

Whether it needs a device (measured with torch 2.13):

* CPU build: no. It cannot run at all: building a model on fake CUDA tensors fails in
  ``uniform_`` ("PyTorch is not linked with support for cuda devices"), and a fake CUDA
  backward aborts the process, uncatchably. The CPU-traced path with its device model is
  the fallback there, always.
* CUDA build without a visible device: not settled. Creating fake CUDA tensors initialises
  CUDA in older releases (pytorch/pytorch#122109; newer ones return a no-op device guard,
  #160532), and SDPA's backend choice and cuDNN query the device's properties, so ``auto``
  does not try it; ``AUTOFIT_CUDA_TRACE=native`` forces it (on a CUDA build only).
* CUDA build with a device: ``auto`` traces natively. Nothing is allocated on the card:
  fake tensors hold no memory.

``AUTOFIT_CUDA_TRACE``: ``auto`` (default) | ``native`` | ``cpu`` (always the fallback).
"""

from __future__ import annotations

import os

import torch

from autofit.predict.device_model import DeviceModel

ENV = "AUTOFIT_CUDA_TRACE"
MODES = ("auto", "native", "cpu")


def cuda_build() -> bool:
    """Is this torch built with CUDA (whether or not a device is visible)?"""
    return torch.version.cuda is not None and torch.backends.cuda.is_built()


def native(model: DeviceModel) -> bool:
    """Trace this device model's target on fake CUDA tensors?"""
    if model.kind != "cuda" or not cuda_build():
        return False
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode == "cpu":
        return False
    if mode == "native":
        return True
    return torch.cuda.is_available()


def trace_device(model: DeviceModel) -> torch.device:
    """The device of the fake tensors a trace for ``model`` runs on."""
    return torch.device("cuda") if native(model) else torch.device("cpu")
