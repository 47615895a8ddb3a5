"""Shared pieces of the export package: its error type and the text helpers every file uses.

Nothing here knows about results or batch plans (comment blocks, YAML / JSON dumping, name
slugs, reading a text file with one-line errors), so every other module of
``autofit.export`` can import this one without an import cycle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from autofit.errors import AutofitError


class ExportError(AutofitError):
    """Export cannot read its input or produce a file (bad results.json or tuned.yaml, an
    impossible world size, an invalid train command). One line per problem (``problems``)."""

    def __init__(self, *problems: str) -> None:
        self._problems = [str(problem) for problem in problems] or ["export failed"]
        super().__init__("\n".join(self._problems))

    @property
    def problems(self) -> list[str]:
        return list(self._problems)


def comment(lines: Sequence[str]) -> str:
    """``# ``-prefixed lines (a multi-line item becomes several comment lines)."""
    out = []
    for line in lines:
        for part in str(line).splitlines() or [""]:
            out.append(f"# {part}".rstrip())
    return "\n".join(out) + "\n"


def dump_yaml(data: Any) -> str:
    """Block-style YAML in insertion order (the order a human reads the file in)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_json(data: Any) -> str:
    """Indented JSON in insertion order, with a final newline."""
    return json.dumps(data, indent=2, sort_keys=False) + "\n"


def slugify(name: str, fallback: str = "autofit") -> str:
    """A file- and job-name-safe form: lowercase letters, digits, '.', '_' and '-'."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower())
    slug = re.sub(r"-{2,}", "-", slug).strip("-.")
    return slug or fallback


def read_text(path: Path, expected: str) -> str:
    """The UTF-8 text of ``path``; one-line ``ExportError`` when it is missing or unreadable.

    ``expected`` names the file in messages, e.g. ``"a results.json file"``.
    """
    if not path.exists():
        raise ExportError(f"{path}: file not found (write it with `autofit tune`)")
    if path.is_dir():
        raise ExportError(f"{path}: is a directory, expected {expected}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: cannot read: {' '.join(str(exc).split())}") from None
