"""Record builders and readers the shipped suites share (and ``tests/contract`` reuses)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from jobledger.model import JobRecord, JobState, to_datetime
from jobledger.query import JobQuery
from jobledger.stores.base import Store

#: How far a time the store stamped may be from ``store.now()`` read around the call.
CLOCK_SLACK = 5.0


def job(job_id: str, **fields: Any) -> JobRecord:
    """A record with a task name, for tests that care about other fields."""
    fields.setdefault("name", "tasks.example")
    return JobRecord(id=job_id, **fields)


def started(job_id: str, owner: str, **fields: Any) -> JobRecord:
    """A record ``started`` by ``owner``, at its first attempt."""
    return job(job_id, state=JobState.STARTED, owner=owner, attempts=1, **fields)


def dt(epoch: float) -> datetime:
    """The aware datetime of epoch seconds, as records carry times."""
    moment = to_datetime(epoch)
    assert moment is not None
    return moment


def epoch(moment: datetime | None) -> float:
    """Epoch seconds of a time a record must carry."""
    assert moment is not None
    return moment.timestamp()


def ids(records: Iterable[JobRecord]) -> set[str]:
    return {record.id for record in records}


def all_ids(store: Store, query: JobQuery | None = None) -> set[str]:
    """Every id ``query`` selects (default: every job), read through paging."""
    return ids(store.iter_jobs(query or JobQuery()))
