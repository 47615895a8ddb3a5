"""The device a job runs on: which one, what it is, and how its memory is capped and read.

One place for what the planner, the trial process and ``profile --real`` all need:
``resolve_device`` ('auto' -> cuda or cpu), ``device_info`` (the record every result
carries), and the CUDA set-up and peak read-out around a measured run.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from autofit.choices import LimitKind

DEVICES = "auto, cpu, cuda or cuda:N"
"""The devices autofit runs on and models (a spec's ``device``, ``--device``)."""


def is_device(value: object) -> bool:
    """Is ``value`` one of ``DEVICES``?"""
    return isinstance(value, str) and (value in ("auto", "cpu", "cuda") or (
        value.startswith("cuda:") and value[5:].isdigit()))


def check_device(device: str | None, what: str = "--device") -> None:
    """Refuse a device override autofit does not run on (None: the spec's own)."""
    from autofit.errors import SpecError

    if device is not None and not is_device(device):
        raise SpecError([f"{what}: must be {DEVICES}, got {device!r}"])


def resolve_device(spec_device: str) -> str:
    """auto -> cuda if available, else cpu."""
    if spec_device != "auto":
        return spec_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_total_bytes() -> int:
    """Physical memory of this machine (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def vm_size_bytes() -> int:
    """This process's virtual address space (``VmSize``), the base of an RLIMIT_AS cap."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_name() -> str:
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: str, *, detailed: bool = False) -> dict[str, Any]:
    """What results record about a device: kind (cpu | cuda), name, total bytes, versions.

    ``detailed`` adds the build, Python, host and (CUDA) compute capability. A CUDA device on
    a machine without CUDA is described as modelled, with total bytes 0.
    """
    import torch

    kind = "cuda" if device.startswith("cuda") else "cpu"
    info: dict[str, Any] = {"kind": kind, "torch": torch.__version__.split("+")[0],
                            "cuda": torch.version.cuda}
    if detailed:
        info.update(torch_build=torch.__version__, python=platform.python_version(),
                    host=platform.node())
    if kind == "cuda" and not torch.cuda.is_available():
        info.update(name="(no CUDA device here: modelled)", total_bytes=0)
    elif kind == "cuda":
        props = torch.cuda.get_device_properties(cuda_device(device))
        info.update(name=props.name, total_bytes=int(props.total_memory))
        if detailed:
            info["capability"] = f"{props.major}.{props.minor}"
    else:
        info.update(name=cpu_name(), total_bytes=cpu_total_bytes())
    return info


def cuda_device(name: str) -> Any:
    """``torch.device`` with an index (``set_device`` and the memory counters want one)."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def prepare_cuda(device: Any, limit_bytes: int | None = None) -> LimitKind:
    """Select ``device``, cap its allocator at ``limit_bytes`` (when below the card), clear the
    cache and the peak counters. Returns the kind of limit in force."""
    import torch

    torch.cuda.set_device(device)
    torch.cuda.synchronize(device)
    kind = LimitKind.CUDA_DEVICE
    total = torch.cuda.get_device_properties(device).total_memory
    if limit_bytes is not None and limit_bytes < total:
        # caps the caching allocator's reserved bytes: one GPU emulates a smaller one
        # (the CUDA context and non-PyTorch memory are outside this cap)
        torch.cuda.set_per_process_memory_fraction(limit_bytes / total, device)
        kind = LimitKind.CUDA_FRACTION
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return kind


def cuda_peaks(device: Any) -> tuple[int, int]:
    """(``max_memory_allocated``, ``max_memory_reserved``) since ``prepare_cuda``."""
    import torch

    torch.cuda.synchronize(device)
    return (int(torch.cuda.max_memory_allocated(device)),
            int(torch.cuda.max_memory_reserved(device)))


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (``/sys/fs/cgroup/cpu.max``), at least 1. ``os.cpu_count()`` counts the machine's."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as quota_file:
            quota, period = quota_file.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) // max(int(period), 1))
    except (OSError, ValueError):
        pass
    return max(1, cpus)
