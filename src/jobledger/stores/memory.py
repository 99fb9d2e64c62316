"""The ledger in a Python dict: the Store seam for users' unit tests (and jobledger's own).

:class:`MemoryStore` keeps the same rows as the SQL store (arguments as JSON text, times as epoch
seconds) and builds, changes and reads them through the same helpers
(:mod:`jobledger.stores.rows`, :mod:`jobledger.query`), so a test that passes against it means
what it would mean against a database; ``tests/contract`` runs it through the same suite. One
lock serializes every call, which gives compare-and-set the same one-winner guarantee. Its
``clock`` plays the database's clock: inject a manual one to move time (heartbeat TTLs, lock
expiry, ages) without sleeping.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from jobledger.errors import UniqueKeyHeld
from jobledger.model import (
    DurationStats,
    Instance,
    JobRecord,
    JobState,
    QueueStats,
)
from jobledger.query import (
    Cursor,
    JobQuery,
    Page,
    check_page_size,
    finished_query,
    page_of,
    prunable_states,
)
from jobledger.stores.base import (
    ANY,
    DEFAULT_LEASE,
    LEASE_PREFIX,
    DurationKind,
    LeasedBatch,
    StagedBatch,
    Store,
    Transition,
    _Sentinel,
    holding,
)
from jobledger.stores.rows import (
    UNIQUE_HOLD,
    creation_row,
    duration_start,
    history_after,
    history_event,
    instance_beat_values,
    instance_from_row,
    record_from_row,
    row_test,
    stats_by_name,
    transition_values,
)

Row = dict[str, Any]


class MemoryStore(Store):
    """The whole ledger in memory, thread-safe, judged on ``clock`` (epoch seconds).

    Nothing survives the object; :meth:`migrate` and :meth:`close` do nothing. Records handed in
    or out are copies, so a test that mutates a record's arguments does not change the ledger.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, Row] = {}
        #: (created_at, id) of every job, ascending: the index keyset pages walk, newest first.
        self._order: list[tuple[float, str]] = []
        #: unique key → the unfinished job that holds it (its row's ``unique_hold``).
        self._holds: dict[str, str] = {}
        self._instances: dict[str, Row] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._jobs)} jobs)"

    # -- schema and connection -------------------------------------------------------------
    def migrate(self) -> None:
        """Nothing to create: the dicts are the schema."""

    def close(self) -> None:
        """Nothing to release."""

    def now(self) -> float:
        return float(self.clock())

    # -- jobs ------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> bool:
        with self._lock:
            if record.id in self._jobs:
                return False
            row = creation_row(record, self.now())
            hold = row[UNIQUE_HOLD]
            if hold is not None:
                if hold in self._holds:
                    raise UniqueKeyHeld(hold, self._holds[hold])
                self._holds[hold] = record.id
            self._jobs[record.id] = row
            bisect.insort(self._order, _position_key(row))
            return True

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._jobs.get(job_id)
            return None if row is None else record_from_row(row)

    def transition(self, job_id: str, change: Transition) -> bool:
        with self._lock:
            row = self._jobs.get(job_id)
            if row is None or not _expected(
                row, change.expect, change.expect_owner, change.expect_generation
            ):
                return False
            at = self.now() if change.at is None else float(change.at)
            values = transition_values(
                change,
                at,
                increment=lambda name: row[name] + 1,
                if_empty=lambda name: at if row[name] is None else row[name],
            )
            if history_event(change) is not None:
                values["history"] = history_after(row, change, at)
            if UNIQUE_HOLD in values:
                self._free(row)
            row.update(values)
            return True

    def delete(
        self,
        job_id: str,
        expect: frozenset[JobState],
        expect_owner: str | _Sentinel | None = ANY,
        expect_generation: int | None = None,
    ) -> bool:
        with self._lock:
            row = self._jobs.get(job_id)
            if row is None or not _expected(row, expect, expect_owner, expect_generation):
                return False
            self._remove(job_id)
            return True

    def query(self, query: JobQuery, *, limit: int, cursor: str | None = None) -> Page[JobRecord]:
        rows = self._page(query, limit, cursor)
        return page_of(rows, limit, record_from_row, _position)

    def count(self, query: JobQuery) -> int:
        with self._lock:
            return sum(1 for _ in self._matching(query))

    def queue_stats(self) -> list[QueueStats]:
        with self._lock:
            now = self.now()
            counts: dict[str, dict[JobState, int]] = {}
            oldest: dict[tuple[str, str], float] = {}
            for row in self._jobs.values():
                state = JobState(row["state"])
                by_state = counts.setdefault(row["queue"], {})
                by_state[state] = by_state.get(state, 0) + 1
                for pending, stamp in (
                    (JobState.QUEUED, "queued_at"),
                    (JobState.STAGED, "staged_at"),
                ):
                    if state is pending and row[stamp] is not None:
                        key = (row["queue"], stamp)
                        oldest[key] = min(oldest.get(key, row[stamp]), row[stamp])

        def lag(queue: str, stamp: str) -> float | None:
            found = oldest.get((queue, stamp))
            return None if found is None else max(0.0, now - found)

        return [
            QueueStats(queue, by_state, lag(queue, "queued_at"), lag(queue, "staged_at"), now)
            for queue, by_state in sorted(counts.items())
        ]

    def durations(
        self, query: JobQuery, kind: DurationKind, *, limit: int, cursor: str | None = None
    ) -> Page[tuple[JobRecord, float]]:
        start = duration_start(kind)
        rows = self._page(finished_query(query), limit, cursor, _has(start, "finished_at"))
        return page_of(
            rows, limit, lambda r: (record_from_row(r), r["finished_at"] - r[start]), _position
        )

    def duration_stats(self, query: JobQuery, kind: DurationKind) -> list[DurationStats]:
        start = duration_start(kind)
        has_both = _has(start, "finished_at")
        by_name: dict[str, list[float]] = {}
        with self._lock:
            for row in self._matching(finished_query(query)):
                if has_both(row):
                    by_name.setdefault(row["name"], []).append(row["finished_at"] - row[start])
        return stats_by_name(by_name)

    def prune(self, query: JobQuery, *, batch_size: int = 1000) -> int:
        check_page_size(batch_size)
        states = prunable_states(query)
        if not states:
            return 0
        narrowed = query.narrowed(states=states)
        removed = 0
        while True:
            with self._lock:
                batch = [
                    row["id"] for row in itertools.islice(self._matching(narrowed), batch_size)
                ]
                for job_id in batch:
                    self._remove(job_id)
            removed += len(batch)
            if len(batch) < batch_size:
                return removed

    # -- the outbox ------------------------------------------------------------------------
    @contextlib.contextmanager
    def staged_batch(
        self,
        *,
        limit: int,
        older_than: float = 0.0,
        ids: Collection[str] | None = None,
        systems: Collection[str] | None = None,
        lease: float = DEFAULT_LEASE,
    ) -> Iterator[StagedBatch]:
        check_page_size(limit)
        token = f"{LEASE_PREFIX}{secrets.token_hex(8)}"
        with self._lock:
            now = self.now()
            found = sorted(
                (
                    row
                    for row in self._jobs.values()
                    if row["state"] == JobState.STAGED.value
                    and (row["owner"] is None or row["updated_at"] <= now - lease)
                    and (older_than <= 0 or row["updated_at"] <= now - older_than)
                    and (ids is None or row["id"] in ids)
                    and (systems is None or row["system"] in systems)
                ),
                key=lambda row: (row["updated_at"], row["id"]),
            )[:limit]
            records = [record_from_row(row) for row in found]
            for row in found:
                row.update(owner=token, updated_at=now)
        with holding(records, functools.partial(self._end_lease, token)) as batch:
            yield batch

    def _end_lease(self, token: str, batch: LeasedBatch) -> None:
        for job_id, change in batch.moves(token):
            self.transition(job_id, change)
        with self._lock:
            for record in batch.records:
                row = self._jobs.get(record.id)
                if (
                    row is not None
                    and row["state"] == JobState.STAGED.value
                    and row["owner"] == token
                ):
                    row.update(owner=None, updated_at=row["staged_at"] or row["updated_at"])

    # -- instances -------------------------------------------------------------------------
    def heartbeat(self, instance: Instance) -> None:
        with self._lock:
            now = self.now()
            row = self._instances.get(instance.id)
            if row is None:
                row = self._instances[instance.id] = {
                    "id": instance.id,
                    "name": instance.name,
                    "nonce": instance.nonce,
                    "hostname": instance.hostname,
                    "pid": instance.pid,
                    "started_at": now,
                }
            row.update(instance_beat_values(instance), heartbeat_at=now)

    def deregister(self, instance_id: str) -> bool:
        with self._lock:
            return self._instances.pop(instance_id, None) is not None

    def instances(self, ttl: float) -> list[Instance]:
        with self._lock:
            now = self.now()
            rows = sorted(self._instances.values(), key=lambda r: (r["name"], r["started_at"]))
            return [instance_from_row(r, now - r["heartbeat_at"], ttl) for r in rows]

    def is_alive(self, instance_id: str, ttl: float) -> bool:
        with self._lock:
            return self._alive(instance_id, self.now() - ttl)

    def orphans(self, ttl: float, *, limit: int = 1000) -> list[JobRecord]:
        with self._lock:
            since = self.now() - ttl
            found = [
                row
                for row in self._jobs.values()
                if row["state"] == JobState.STARTED.value and not self._alive(row["owner"], since)
            ]
            found.sort(key=lambda r: (r["started_at"], r["id"]))
            return [record_from_row(r) for r in found[:limit]]

    def _alive(self, instance_id: str | None, since: float) -> bool:
        """True if the instance is registered and beat at or after ``since`` (lock held)."""
        row = None if instance_id is None else self._instances.get(instance_id)
        return row is not None and row["heartbeat_at"] >= since

    # -- locks -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, token: str, ttl: float) -> bool:
        with self._lock:
            now = self.now()
            held = self._locks.get(name)
            if held is not None and held[0] != token and not held[1] < now:
                return False
            self._locks[name] = (token, now + ttl)
            return True

    def release_lock(self, name: str, token: str) -> bool:
        with self._lock:
            held = self._locks.get(name)
            if held is None or held[0] != token:
                return False
            del self._locks[name]
            return True

    # -- selection -------------------------------------------------------------------------
    def _page(
        self,
        query: JobQuery,
        limit: int,
        cursor: str | None,
        extra: Callable[[Row], bool] | None = None,
    ) -> list[Row]:
        """Copies of ``limit`` + 1 rows newest first after ``cursor`` (the extra row says: more
        follow), as the SQL store's keyset page."""
        check_page_size(limit)
        after = None if cursor is None else Cursor.decode(cursor)
        with self._lock:
            test = row_test(query, self.now())
            end = len(self._order)
            if after is not None:
                end = bisect.bisect_left(self._order, (after.created_at, after.id))
            rows: list[Row] = []
            for position in range(end - 1, -1, -1):
                row = self._jobs[self._order[position][1]]
                if test(row) and (extra is None or extra(row)):
                    rows.append(dict(row))
                    if len(rows) > limit:
                        break
            return rows

    def _remove(self, job_id: str) -> None:
        """Forget a job and its place in the order (lock held)."""
        row = self._jobs.pop(job_id)
        self._free(row)
        del self._order[bisect.bisect_left(self._order, _position_key(row))]

    def _free(self, row: Row) -> None:
        """Free the unique key the job holds, if any (lock held)."""
        if row[UNIQUE_HOLD] is not None:
            del self._holds[row[UNIQUE_HOLD]]

    def _matching(self, query: JobQuery) -> Iterable[Row]:
        """The rows ``query`` selects, in no order (the lock must be held while iterating)."""
        test = row_test(query, self.now())
        return (row for row in self._jobs.values() if test(row))

    # -- for tests ---------------------------------------------------------------------------
    def records(self) -> list[JobRecord]:
        """Every job, newest first: a snapshot for assertions."""
        return list(self.iter_jobs(JobQuery()))


def _expected(
    row: Row,
    expect: frozenset[JobState],
    owner: str | _Sentinel | None,
    generation: int | None = None,
) -> bool:
    """The compare of compare-and-set: the row is in one of ``expect``, held by ``owner``
    and (when given) at ``generation``."""
    if JobState(row["state"]) not in expect:
        return False
    if generation is not None and row["generation"] != generation:
        return False
    return owner is ANY or row["owner"] == owner


def _has(*names: str) -> Callable[[Row], bool]:
    return lambda row: all(row[name] is not None for name in names)


def _position_key(row: Mapping[str, Any]) -> tuple[float, str]:
    return (row["created_at"], row["id"])


def _position(row: Row) -> Cursor:
    return Cursor(float(row["created_at"]), row["id"])


__all__ = ["MemoryStore"]
