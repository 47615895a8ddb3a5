"""Stage 4's front end, the ``autofit`` command: parse, call ``autofit.api``, print.

``app`` holds the commands, ``common`` the consoles, error printing and signal handling,
``report`` the tables, ``profile`` the profile command and its tables.
"""

from autofit.cli.app import app, main

__all__ = ["app", "main"]
