"""The ledger's rows as plain values, and what each write puts in them: shared by every store.

The SQL store and the in-memory store keep a job as the same row (arguments as JSON text, times
as epoch seconds) and build it, change it and read it back through these functions, so a
transition, a default timestamp or an argument search means the same thing in both. The
functions that write take the store's "now" and its "add one" as values of any type: a float
and ``+ 1`` in memory, a SQL expression in the database.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from jobledger.errors import ConfigError
from jobledger.model import (
    FINAL_STATES,
    HISTORY_ERROR_MAX_LENGTH,
    HISTORY_KEPT,
    DurationStats,
    HistoryEntry,
    HistoryEvent,
    Instance,
    InstanceState,
    JobRecord,
    JobState,
    bound_error,
    nearest_rank,
    to_datetime,
    to_epoch,
)
from jobledger.query import JobQuery, match_needles
from jobledger.stores.base import KEEP, DurationKind, Transition

V = TypeVar("V")

#: The phase timestamp a job entering each state is stamped with (``retrying`` has no phase of
#: its own: the queue's retry waits in ``updated_at``, the time of the job's last move).
PHASE_STAMP: Mapping[JobState, str] = {
    JobState.STAGED: "staged_at",
    JobState.QUEUED: "queued_at",
    JobState.STARTED: "started_at",
    JobState.RETRYING: "updated_at",
    JobState.SUCCEEDED: "finished_at",
    JobState.FAILED: "finished_at",
    JobState.DEAD: "finished_at",
    JobState.CANCELLED: "finished_at",
}

_ONLY_STAGED = frozenset({JobState.STAGED})

#: The moves that append to a job's history besides recoveries and restarts: the failures.
#: Claims and successes (the hot path) append nothing.
_HISTORY_TARGETS = {
    JobState.RETRYING: HistoryEvent.RETRYING,
    JobState.FAILED: HistoryEvent.FAILED,
    JobState.DEAD: HistoryEvent.DEAD,
}

#: The row fields a history entry is made of: a store that read them compares them in the
#: write that appends the entry, so the entry is of the row it changes.
HISTORY_INPUTS = ("state", "owner", "started_at", "attempts", "history")

#: The row field that holds a job's ``unique_key`` while the job holds it (it is not final):
#: set at creation, emptied by the move to a final state (:func:`transition_values`), so the
#: key is freed in the compare-and-set that ends the job. Every store refuses a second job
#: whose key another's ``unique_hold`` has (SQL: a unique index; NULLs never collide).
UNIQUE_HOLD = "unique_hold"

#: The row fields the argument search looks in (``match``).
SEARCH_FIELDS = ("args", "kwargs", "tags")


def dump_json(value: Any) -> str:
    """``value`` as the JSON text a row keeps (non-ASCII kept as is, so a search sees it)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"job arguments must be JSON-serializable: {exc}") from None


def record_to_row(record: JobRecord) -> dict[str, Any]:
    """The row of ``record`` as given: JSON texts and epoch seconds, None where it has no time."""
    return {
        "id": record.id,
        "system": record.system,
        "name": record.name,
        "queue": record.queue,
        "args": dump_json(record.args),
        "kwargs": dump_json(record.kwargs),
        "tags": dump_json(record.tags),
        "options": dump_json(record.options),
        "state": record.state.value,
        "owner": record.owner,
        "attempts": record.attempts,
        "recoveries": record.recoveries,
        "restarts": record.restarts,
        "generation": record.generation,
        "recent_recoveries": dump_json(list(record.recent_recoveries)),
        "history": dump_json([_entry_to_json(e) for e in record.history]),
        "error": record.error,
        "created_at": to_epoch(record.created_at),
        "staged_at": to_epoch(record.staged_at),
        "first_queued_at": to_epoch(record.first_queued_at),
        "queued_at": to_epoch(record.queued_at),
        "started_at": to_epoch(record.started_at),
        "finished_at": to_epoch(record.finished_at),
        "recovered_at": to_epoch(record.recovered_at),
        "updated_at": to_epoch(record.updated_at),
        "unique_key": record.unique_key,
        UNIQUE_HOLD: None if record.state.is_final else record.unique_key,
    }


def creation_row(record: JobRecord, now: object) -> dict[str, Any]:
    """The row :meth:`Store.create` inserts: the record's own times kept, the missing ones
    defaulted to ``now``. The job entered its state at that state's phase time, so
    ``updated_at`` (what ``older_than`` measures) defaults to it, not to the insert time."""
    row: dict[str, Any] = record_to_row(record)
    if row["created_at"] is None:
        row["created_at"] = now
    stamp = PHASE_STAMP[record.state]
    if row[stamp] is None:
        row[stamp] = now
    if row["updated_at"] is None:
        row["updated_at"] = row[stamp]
    if record.state is JobState.QUEUED and row["first_queued_at"] is None:
        row["first_queued_at"] = row["queued_at"]
    return row


def transition_values(
    change: Transition,
    at: V,
    *,
    increment: Callable[[str], V],
    if_empty: Callable[[str], V],
) -> dict[str, Any]:
    """The fields a won ``change`` writes (see :class:`~jobledger.stores.base.Transition`).

    ``at`` is the moment of the move; ``increment(field)`` is the field plus one and
    ``if_empty(field)`` the field's value, or ``at`` where it has none.
    """
    values: dict[str, Any] = {"state": change.to.value, "updated_at": at}
    if not change.to.is_final and change.expect & FINAL_STATES:
        values["finished_at"] = None  # a restarted job is not finished: no stale finish time
    values[PHASE_STAMP[change.to]] = at
    if change.to.is_final:
        values[UNIQUE_HOLD] = None  # the key is free once the job ends: in this very move
    if change.to is JobState.QUEUED:
        values["first_queued_at"] = if_empty("first_queued_at")
        values["owner"] = None
    elif change.to is JobState.STAGED:
        values["owner"] = None
    elif change.to is JobState.STARTED:
        values["owner"] = change.owner
        values["attempts"] = increment("attempts")
        # a staged job a worker claims before its relay marked it queued was published anyway
        values["queued_at"] = if_empty("queued_at")
        values["first_queued_at"] = if_empty("first_queued_at")
    elif change.expect == _ONLY_STAGED:
        values["owner"] = None  # a staged job's owner is only ever a relay's lease
    if change.reason == "recovery":
        values["recoveries"] = increment("recoveries")
        values["recovered_at"] = at
    elif change.reason == "restart":
        values["restarts"] = increment("restarts")
    if change.recent_recoveries is not None:
        values["recent_recoveries"] = dump_json(list(change.recent_recoveries))
    if change.generation is not None:
        values["generation"] = change.generation
    if change.error is not KEEP:
        values["error"] = change.error
    return values


def history_event(change: Transition) -> HistoryEvent | None:
    """What ``change`` adds to the job's history, or None if it adds nothing (a claim, a
    success: the hot path writes no history)."""
    if change.reason == "recovery":
        return HistoryEvent.RECOVERED
    if change.reason == "restart":
        return HistoryEvent.RESTARTED
    return _HISTORY_TARGETS.get(change.to)


def history_after(row: Mapping[Any, Any], change: Transition, at: float) -> str:
    """The history text of ``row`` (its :data:`HISTORY_INPUTS` before the move) once ``change``
    is written at ``at``: one entry appended, the oldest dropped past :data:`HISTORY_KEPT`."""
    event = history_event(change)
    if event is None:
        raise ValueError(f"a move to {change.to.value} adds no history")
    running = row["state"] == JobState.STARTED.value
    error = change.error if isinstance(change.error, str) else None
    entry = HistoryEntry(
        event=event,
        at=datetime.fromtimestamp(at, tz=timezone.utc),
        came_from=JobState(row["state"]),
        to=change.to,
        attempt=row["attempts"],
        owner=row["owner"] if running else None,
        started_at=to_datetime(row["started_at"]) if running else None,
        error=bound_error(error, HISTORY_ERROR_MAX_LENGTH),
    )
    entries = [*json.loads(row["history"] or "[]"), _entry_to_json(entry)]
    return dump_json(entries[-HISTORY_KEPT:])


def _entry_to_json(entry: HistoryEntry) -> dict[str, Any]:
    return {
        "event": entry.event.value,
        "at": to_epoch(entry.at),
        "from": entry.came_from.value,
        "to": entry.to.value,
        "attempt": entry.attempt,
        "owner": entry.owner,
        "started_at": to_epoch(entry.started_at),
        "error": entry.error,
    }


def _entry_from_json(data: Mapping[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        event=HistoryEvent(data["event"]),
        at=datetime.fromtimestamp(data["at"], tz=timezone.utc),
        came_from=JobState(data["from"]),
        to=JobState(data["to"]),
        attempt=int(data["attempt"]),
        owner=data.get("owner"),
        started_at=to_datetime(data.get("started_at")),
        error=data.get("error"),
    )


def record_from_row(row: Mapping[Any, Any]) -> JobRecord:
    """The :class:`JobRecord` a stored row holds (new objects: nothing shared with the row)."""
    return JobRecord(
        id=row["id"],
        system=row["system"],
        name=row["name"],
        queue=row["queue"],
        args=json.loads(row["args"]),
        kwargs=json.loads(row["kwargs"]),
        tags=json.loads(row["tags"]),
        options=json.loads(row["options"]),
        state=JobState(row["state"]),
        owner=row["owner"],
        attempts=row["attempts"],
        recoveries=row["recoveries"],
        restarts=row["restarts"],
        generation=row["generation"],
        recent_recoveries=tuple(json.loads(row["recent_recoveries"] or "[]")),
        history=tuple(_entry_from_json(e) for e in json.loads(row["history"] or "[]")),
        error=row["error"],
        created_at=to_datetime(row["created_at"]),
        staged_at=to_datetime(row["staged_at"]),
        first_queued_at=to_datetime(row["first_queued_at"]),
        queued_at=to_datetime(row["queued_at"]),
        started_at=to_datetime(row["started_at"]),
        finished_at=to_datetime(row["finished_at"]),
        recovered_at=to_datetime(row["recovered_at"]),
        updated_at=to_datetime(row["updated_at"]),
        unique_key=row.get("unique_key"),
    )


def instance_from_row(row: Mapping[Any, Any], age: float, ttl: float) -> Instance:
    """The :class:`Instance` a stored row holds, ``age`` seconds after its last heartbeat."""
    return Instance(
        name=row["name"],
        nonce=row["nonce"],
        hostname=row["hostname"],
        pid=row["pid"],
        queues=tuple(json.loads(row["queues"])),
        state=InstanceState(row["state"]),
        started_at=to_datetime(row["started_at"]),
        heartbeat_at=to_datetime(row["heartbeat_at"]),
        heartbeat_age=max(0.0, age),
        alive=age <= ttl,
        holding=tuple((str(i), int(g)) for i, g in json.loads(row.get("holding") or "[]")),
        stats=json.loads(row.get("stats") or "{}"),
    )


def instance_beat_values(instance: Instance) -> dict[str, Any]:
    """What a heartbeat writes on the instance's row besides the time."""
    return {
        "state": instance.state.value,
        "queues": dump_json(list(instance.queues)),
        "holding": dump_json([list(h) for h in instance.holding]),
        "stats": dump_json(dict(instance.stats)),
    }


def duration_start(kind: DurationKind) -> str:
    """The field a duration of ``kind`` starts at (it ends at ``finished_at``)."""
    if kind not in ("queued", "started"):
        raise ConfigError(f"duration kind must be 'queued' or 'started', not {kind!r}")
    return "queued_at" if kind == "queued" else "started_at"


def row_test(query: JobQuery, now: float) -> Callable[[Mapping[str, Any]], bool]:
    """``query`` as a test of one row (``now``: the store's clock), with the meaning
    :meth:`SQLStore._where` gives it: the memory store's selection, and the Redis store's for
    id lists and regular expressions."""
    fields: list[tuple[str, frozenset[str]]] = [
        ("state", frozenset(s.value for s in query.states)),
        ("queue", query.queues),
        ("name", query.names),
        ("system", query.systems),
        ("id", query.ids),
        ("owner", query.owners),
        ("unique_key", query.unique_keys),
    ]
    wanted = [(name, values) for name, values in fields if values]
    oldest = None if query.older_than is None else now - query.older_than
    newest = None if query.newer_than is None else now - query.newer_than
    text = text_test(query.match, query.regex)

    def test(row: Mapping[str, Any]) -> bool:
        if any(row[name] not in values for name, values in wanted):
            return False
        if oldest is not None and not row["updated_at"] <= oldest:
            return False
        if newest is not None and not row["updated_at"] > newest:
            return False
        if query.recovered and not row["recoveries"] > 0:
            return False
        return text is None or any(text(row[name]) for name in SEARCH_FIELDS)

    return test


def text_test(needle: str | None, regex: bool) -> Callable[[str], bool] | None:
    """The argument search of :meth:`SQLStore._match`: a Python ``re.search`` (what SQLite
    uses too), or a literal, case-sensitive substring test of every needle."""
    if needle is None:
        return None
    if regex:
        pattern = re.compile(needle)
        return lambda stored: pattern.search(stored) is not None
    needles = match_needles(needle)
    return lambda stored: any(n in stored for n in needles)


def stats_by_name(by_name: Mapping[str, list[float]]) -> list[DurationStats]:
    """p50/p95/max (nearest rank) of each task name's durations, by name, for the stores
    that gather the durations themselves (the SQL store asks the database)."""
    result: list[DurationStats] = []
    for name, seconds in sorted(by_name.items()):
        seconds.sort()
        count = len(seconds)
        p50, p95 = (seconds[nearest_rank(p, count)] for p in (0.5, 0.95))
        result.append(DurationStats(name, count, p50, p95, seconds[-1]))
    return result
