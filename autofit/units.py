"""Byte quantities: parse "24GB" / "16GiB" and print both decimal and binary forms.

Decimal units (kB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB)
powers of 1024, as in IEC 80000-13. GPU vendors quote decimal "GB" for some cards and
binary sizes for others, so output always labels which one it shows.
"""

from __future__ import annotations

import math
import re

_DECIMAL = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int | float) -> int:
    """Parse ``"24GB"`` (decimal), ``"16GiB"`` (binary) or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '24GB' or '16GiB', got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"size must be a finite number >= 0, got {value!r}")
        return int(value)
    match = _PATTERN.match(str(value))
    if not match:
        raise ValueError(f"expected a size like '24GB' or '16GiB', got {value!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    scale = 1 if unit in ("", "b") else _DECIMAL.get(unit) or _BINARY.get(unit)
    if scale is not None:
        total = number * scale
        if not math.isfinite(total):
            raise ValueError(f"size {value!r} is too large")
        return int(total)
    raise ValueError(
        f"unknown unit {match.group(2)!r} in {value!r}; use kB/MB/GB/TB (decimal) or KiB/MiB/GiB/TiB (binary)"
    )


def _format(num_bytes: float, base: int, units: tuple[str, ...]) -> str:
    value = float(num_bytes)
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= base
    raise AssertionError("unreachable")


def format_binary(num_bytes: float) -> str:
    """``1.50 GiB``: powers of 1024."""
    return _format(num_bytes, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def format_decimal(num_bytes: float) -> str:
    """``1.61 GB``: powers of 1000."""
    return _format(num_bytes, 1000, ("B", "kB", "MB", "GB", "TB"))


def format_bytes(num_bytes: float) -> str:
    """Both forms, binary first: ``1.50 GiB (1.61 GB)``."""
    return f"{format_binary(num_bytes)} ({format_decimal(num_bytes)})"
