"""One root exception for autofit; everything a user can cause derives from it.

The CLI turns an ``AutofitError`` into one line per problem on stderr and exit code 2;
anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class AutofitError(Exception):
    """Root of every error autofit raises on purpose."""

    exit_code = 2

    @property
    def problems(self) -> list[str]:
        return [str(self)]


class SpecError(AutofitError):
    """The experiment spec is invalid. Holds every problem found, one line each."""

    def __init__(self, problems: list[str], source: str | None = None, *,
                 unread: bool = False) -> None:
        self._problems = list(problems)
        self.source = source
        self.unread = unread
        """The file is not a spec mapping (missing, unreadable, not YAML, empty, not a
        mapping): nothing in it was checked."""
        super().__init__("\n".join(self._problems))

    @property
    def problems(self) -> list[str]:
        return list(self._problems)


class BuildError(AutofitError):
    """Building the model, optimizer, batch or step from a valid spec failed."""


class TrialError(AutofitError):
    """A trial failed for a reason that is not 'too big' (user code error, crash, hang)."""


class SearchError(AutofitError):
    """The search cannot produce an answer (e.g. nothing fits even at the smallest setting)."""


class OutputDirError(AutofitError):
    """The output directory is in use, exists without --resume/--force, or is locked."""


class TuneFailed(AutofitError):
    """A tune ended without an answer. ``partial`` keeps every trial that finished.

    ``cause`` is the autofit error that stopped it (a ``TrialError``, a ``SearchError`` for
    "nothing fits", ...); its problems are this error's problems. ``partial`` is a
    ``TuneResult`` with ``best=None`` (``None`` only when it failed before planning).
    """

    def __init__(self, cause: AutofitError, partial: Any = None) -> None:
        self.cause = cause
        self.partial = partial
        super().__init__(str(cause))

    @property
    def problems(self) -> list[str]:
        return self.cause.problems


class TuneInterrupted(TuneFailed):
    """Ctrl-C or SIGTERM during a tune; ``partial`` keeps every trial that finished."""

    exit_code = 130

    def __init__(self, partial: Any = None) -> None:
        super().__init__(AutofitError("interrupted"), partial)
