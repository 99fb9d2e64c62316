"""Plain-JSON views of ledger objects, shared by the CLI's ``--json`` and the HTTP API."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Any

from jobledger.history import Attempt, attempts
from jobledger.manager import ActionReport
from jobledger.model import (
    DurationStats,
    HistoryEntry,
    Instance,
    JobRecord,
    JobState,
    OutboxStats,
    QueueStats,
)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "value") and isinstance(value.value, str):  # a str enum
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def _ran(run: HistoryEntry | Attempt) -> dict[str, Any]:
    """A history entry or an attempt, with how long the attempt ran (``ran_for``)."""
    data = {f.name: _plain(getattr(run, f.name)) for f in fields(run)}
    data["ran_for"] = run.ran_for
    return data


def job_to_dict(record: JobRecord) -> dict[str, Any]:
    """Every field of the record, times as ISO 8601 UTC, its two durations, and ``runs``: its
    attempts, oldest first (see :func:`jobledger.history.attempts`)."""
    data = {f.name: _plain(getattr(record, f.name)) for f in fields(record)}
    data["history"] = [_ran(e) for e in record.history]
    data["runs"] = [_ran(a) for a in attempts(record)]
    data["queued_to_finished"] = record.queued_to_finished
    data["started_to_finished"] = record.started_to_finished
    return data


def instance_to_dict(instance: Instance) -> dict[str, Any]:
    data = {f.name: _plain(getattr(instance, f.name)) for f in fields(instance)}
    data["id"] = instance.id
    return data


def queue_stats_to_dict(stats: QueueStats) -> dict[str, Any]:
    return {
        "queue": stats.queue,
        "counts": {state.value: count for state, count in sorted(stats.counts.items())},
        "total": stats.total,
        "oldest_queued_age": stats.oldest_queued_age,
        "oldest_staged_age": stats.oldest_staged_age,
    }


def stats_to_dict(queues: list[QueueStats]) -> dict[str, Any]:
    """``jobledger stats --json`` and ``GET /api/stats``: per queue, totals and the outbox."""
    outbox = OutboxStats.of(queues)
    return {
        "queues": [queue_stats_to_dict(q) for q in queues],
        "totals": {s.value: sum(q.counts.get(s, 0) for q in queues) for s in JobState},
        "outbox": {"backlog": outbox.backlog, "oldest_staged_age": outbox.oldest_staged_age},
    }


def duration_stats_to_dict(stats: DurationStats) -> dict[str, Any]:
    return {f.name: getattr(stats, f.name) for f in fields(stats)}


def report_to_dict(report: ActionReport) -> dict[str, Any]:
    """What a restart, cancel or prune did, job by job."""
    return {
        "action": report.action,
        "dry_run": report.dry_run,
        "done": report.done,
        "skipped": report.skipped,
        "failed": report.failed,
    }


def format_seconds(seconds: float | None) -> str:
    """A short human duration: ``850ms``, ``42s``, ``12m5s``, ``3h2m``, ``4d3h``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            rest = (whole % size) // sub_size
            return f"{whole // size}{unit}{rest}{sub}" if rest else f"{whole // size}{unit}"
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if secs else f"{minutes}m"
