"""Stage 1, predict: trace the training step on fake tensors and model the device.

``trace``/``estimate`` give one candidate's memory; ``predict_max_batch`` the largest batch
under a limit; ``device_model`` what the allocator adds on CUDA; ``profile`` where the memory
of one step goes and what each knob would save.
"""

from autofit.predict.batch_curve import BatchCurve, MaxBatchEstimate, fit_line, predict_max_batch
from autofit.predict.device_model import CPU, CUDA_DEFAULT, DeviceModel, device_model_for
from autofit.predict.trace import TRACE_STEPS, LayerRow, MemoryEstimate, estimate, trace

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
    "trace",
]
