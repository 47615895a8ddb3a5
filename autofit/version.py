"""autofit's version: read from the installed package metadata (``pyproject.toml`` is the one
source)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("autofit")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
