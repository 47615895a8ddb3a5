"""Stage 1, predict: trace the training step on fake tensors and model the device.

``trace``/``estimate`` give one candidate's memory; ``predict_max_batch`` the largest batch
under a limit; ``device_model`` what the allocator adds on CUDA; ``profile`` where the memory
of one step goes and what each knob would save.

The names below are imported on first use (PEP 562): the trace cache, the device model and
the estimate types import no torch, so a cached answer is read without it. The trace
function is ``autofit.predict.trace.trace`` (a lazily imported package attribute would be
replaced by the submodule of the same name).
"""

from typing import TYPE_CHECKING, Any

_LAZY = {
    "autofit.predict.batch_curve": ("BatchCurve", "MaxBatchEstimate", "fit_line",
                                    "predict_max_batch"),
    "autofit.predict.device_model": ("CPU", "CUDA_DEFAULT", "DeviceModel", "device_model_for"),
    "autofit.predict.estimates": ("LayerRow", "MemoryEstimate"),
    "autofit.predict.trace": ("TRACE_STEPS", "estimate"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from autofit.predict.batch_curve import (
        BatchCurve,
        MaxBatchEstimate,
        fit_line,
        predict_max_batch,
    )
    from autofit.predict.device_model import CPU, CUDA_DEFAULT, DeviceModel, device_model_for
    from autofit.predict.estimates import LayerRow, MemoryEstimate
    from autofit.predict.trace import TRACE_STEPS, estimate


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'autofit.predict' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "CPU",
    "CUDA_DEFAULT",
    "TRACE_STEPS",
    "BatchCurve",
    "DeviceModel",
    "LayerRow",
    "MaxBatchEstimate",
    "MemoryEstimate",
    "device_model_for",
    "estimate",
    "fit_line",
    "predict_max_batch",
]
