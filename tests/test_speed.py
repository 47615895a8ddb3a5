"""Issue 17: fast answers. What is checked here is *what* runs (imports, traces, cache hits),
never how long it takes: timings live in scripts/bench_speed.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules_after(code: str) -> set[str]:
    probe = textwrap.dedent(code) + "\nimport sys\nprint('\\n'.join(sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    return set(out.stdout.split())


def test_cli_help_does_not_import_torch():
    mods = _modules_after("""
        import contextlib, io
        from autofit.cli import app
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            app(["--help"])
    """)
    assert "autofit.cli.app" in mods
    assert "torch" not in mods


def test_validate_of_a_bad_spec_does_not_import_torch(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: broken\nmodel: {_target_: autofit.zoo.mlp}\n"
                   "data: {kind: tensor, shape: [8], num_classes: 2}\n"
                   "optimiser: {_target_: torch.optim.SGD}\n")
    mods = _modules_after(f"""
        import contextlib, io
        from autofit.cli import app
        err = io.StringIO()
        with contextlib.suppress(SystemExit), contextlib.redirect_stderr(err):
            app(["validate", {str(bad)!r}])
        assert "did you mean 'optimizer'" in err.getvalue(), err.getvalue()
    """)
    assert "autofit.spec" in mods
    assert "torch" not in mods


def test_lazy_package_still_exports_everything():
    import autofit
    import autofit.export.tuned  # noqa: F401  the subpackage must not shadow the function

    for name in autofit.__all__:
        assert getattr(autofit, name) is not None, name
    assert callable(autofit.export) and autofit.export.__module__ == "autofit.api"
