"""What a running tune tells its caller: one event type per thing that happens.

A caller passes one callable, ``on_event(event)``, and matches on the event's type:
``TrialStarted`` (a trial is about to run), ``TrialFinished`` (its record, resumed ones
included), ``Note`` (a line of progress or a decision worth telling). The CLI prints them;
a notebook can collect them; the search itself never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from autofit.candidate import Candidate
from autofit.choices import Purpose

if TYPE_CHECKING:
    from autofit.search.results import TrialRecord


@dataclass(frozen=True)
class TuneEvent:
    """Base of every event."""


@dataclass(frozen=True)
class Note(TuneEvent):
    """A line of progress: a prediction, a pruned setting, a step-down and why."""

    message: str


@dataclass(frozen=True)
class TrialStarted(TuneEvent):
    """A real trial is about to run (not sent for a trial answered from the study)."""

    candidate: Candidate
    purpose: Purpose


@dataclass(frozen=True)
class TrialFinished(TuneEvent):
    """A trial's record: run now, or loaded from the study (``record.resumed``)."""

    record: TrialRecord


class EventHandler(Protocol):
    """``on_event``: called with each event, in order, from the tuning thread."""

    def __call__(self, event: TuneEvent) -> None: ...


Emit = Callable[[TuneEvent], None]


def emitter(on_event: EventHandler | None) -> Emit:
    """The handler, or one that drops every event."""
    if on_event is None:
        return lambda event: None
    return on_event
