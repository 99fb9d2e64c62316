"""Helpers the contract tests share: fast setup, deadlines instead of sleeps, record builders."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, TypeVar

from jobledger.model import JobRecord, JobState, to_datetime
from jobledger.query import JobQuery
from jobledger.stores.base import Store
from jobledger.stores.redis import RedisStore
from jobledger.stores.rows import creation_row
from jobledger.stores.schema import jobs
from jobledger.stores.sql import SQLStore

T = TypeVar("T")

#: How far a time the store stamped may be from ``store.now()`` read around the call.
CLOCK_SLACK = 5.0


def job(job_id: str, **fields: Any) -> JobRecord:
    """A record with a task name, for tests that care about other fields."""
    fields.setdefault("name", "tasks.example")
    return JobRecord(id=job_id, **fields)


def dt(epoch: float) -> datetime:
    moment = to_datetime(epoch)
    assert moment is not None
    return moment


def epoch(moment: datetime | None) -> float:
    assert moment is not None
    return moment.timestamp()


def bulk_create(store: Store, records: Iterable[JobRecord]) -> None:
    """Insert many records fast: straight into the ``jobs`` table for a SQL store (as
    :meth:`Store.create` would write them), pipelined on Redis, one by one otherwise. Setup
    only: tests assert through the Store API."""
    records = list(records)
    if isinstance(store, RedisStore):
        assert store.create_many(records) == len(records)
        return
    if not isinstance(store, SQLStore):
        for record in records:
            assert store.create(record)
        return
    now = store.now()
    rows = [creation_row(record, now) for record in records]
    with store.engine.begin() as conn:
        for start in range(0, len(rows), 2000):
            conn.execute(jobs.insert(), rows[start : start + 2000])


def ids(records: Iterable[JobRecord]) -> set[str]:
    return {record.id for record in records}


def all_ids(store: Store, query: JobQuery | None = None) -> set[str]:
    return ids(store.iter_jobs(query or JobQuery()))


def started(job_id: str, owner: str, **fields: Any) -> JobRecord:
    return job(job_id, state=JobState.STARTED, owner=owner, attempts=1, **fields)
