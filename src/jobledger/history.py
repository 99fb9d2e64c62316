"""A job's story, told from its record: each attempt, and every move in order.

The store keeps only what a later move would overwrite (:class:`~jobledger.model.HistoryEntry`:
failed attempts, recoveries, restarts); the latest attempt is the row's own fields. This puts
the two together once, for ``jobledger show``, the API and the dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from jobledger.model import HistoryEvent, JobRecord, JobState, seconds_between


@dataclass(frozen=True)
class Attempt:
    """One run of the job's body: who ran it, when, and how it ended (``outcome`` is the
    history event that closed it, or the job's state for its latest run: ``started`` while it
    runs)."""

    number: int
    owner: str | None
    started_at: datetime | None
    ended_at: datetime | None
    outcome: str
    error: str | None = None

    @property
    def ran_for(self) -> float | None:
        return seconds_between(self.started_at, self.ended_at)


@dataclass(frozen=True)
class Step:
    """One moment of the timeline: what happened at ``at``, and a short word on it."""

    at: datetime
    what: str
    detail: str = ""


def attempts(record: JobRecord) -> list[Attempt]:
    """The job's attempts, oldest first: those the history kept, then its latest run if no
    entry closed it yet (it runs, succeeded, was cancelled or released)."""
    found = [
        Attempt(e.attempt, e.owner, e.started_at, e.at, e.event.value, e.error)
        for e in record.history
        if e.started_at is not None
    ]
    if record.started_at is not None and all(a.started_at != record.started_at for a in found):
        final = record.state.is_final
        found.append(
            Attempt(
                number=record.attempts,
                owner=record.owner,
                started_at=record.started_at,
                ended_at=record.finished_at if final else None,
                outcome=record.state.value,
                # the row's error is an earlier attempt's unless this one was cancelled
                error=record.error if record.state is JobState.CANCELLED else None,
            )
        )
    return found


def timeline(record: JobRecord) -> list[Step]:
    """Every moment the record and its history know of, in time order."""
    steps = [Step(record.created_at, "created")] if record.created_at else []
    if record.staged_at and record.staged_at != record.created_at:
        steps.append(Step(record.staged_at, "staged", "in the application's transaction"))
    if record.first_queued_at:
        steps.append(Step(record.first_queued_at, "queued"))
    for a in attempts(record):
        if a.started_at is not None:
            steps.append(Step(a.started_at, "started", f"attempt {a.number} on {a.owner or '?'}"))
    for e in record.history:
        steps.append(Step(e.at, e.event.value, _detail(e.event, e.to, e.owner, e.error)))
    closed = {e.at for e in record.history}
    if record.state.is_final and record.finished_at and record.finished_at not in closed:
        steps.append(Step(record.finished_at, record.state.value, first_line(record.error)))
    elif (
        record.state is JobState.QUEUED
        and record.queued_at
        and record.queued_at not in closed
        and record.queued_at != record.first_queued_at
    ):
        steps.append(Step(record.queued_at, "queued", "published again"))
    return sorted(steps, key=lambda s: s.at)


def _detail(event: HistoryEvent, to: JobState, owner: str | None, error: str | None) -> str:
    if event is HistoryEvent.RECOVERED:
        taken = "taken over by a redelivery" if to is JobState.STARTED else f"now {to.value}"
        return f"its instance {owner or '?'} died; {taken}"
    if event is HistoryEvent.RESTARTED:
        return "published again by a person"
    return first_line(error)


def first_line(text: str | None) -> str:
    """The line of an error that says what went wrong: a traceback's last line."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
