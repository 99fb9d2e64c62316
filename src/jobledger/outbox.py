"""Staging: a job is accepted only if the caller's own database transaction commits.

:meth:`Outbox.stage` writes the job record as ``staged`` through the connection that holds the
caller's transaction (a SQLAlchemy Session or Connection, a Django ``transaction.atomic``
block, see :data:`holders`), so the job commits or rolls back with the business data, and
returns the job id at once. Nothing is published before the commit: a rolled-back job never
existed. After the outermost commit the process publishes what it staged right away and marks
it ``queued`` (the fast path, :meth:`Outbox.flush`); the relay (:mod:`jobledger.relay`)
publishes whatever the fast path missed: a crash between commit and publish, a broker outage.

The fast path reads the committed rows back through the ledger's own store and holds them
like a relay batch (:meth:`~jobledger.stores.base.Store.staged_batch`), so it publishes only
jobs that really committed (a job staged in a savepoint that rolled back is not there) and
never one a relay is publishing at the same moment. While the broker is down it stays out of
the way: after a failed publish it leaves the next ``breaker`` seconds of jobs to the relay
instead of making every commit wait on a dead broker.

The core sees a transaction only through :class:`~jobledger.staging.TransactionHolder`; the
adapters for SQLAlchemy (:mod:`jobledger.stores.staging`) and Django
(:mod:`jobledger.contrib.django`) register themselves in :data:`jobledger.staging.holders`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection

from jobledger.errors import JobLedgerError, PublishError, StagingError, UniqueKeyHeld
from jobledger.integrations.base import PublishBatch, Published, registry
from jobledger.model import JobRecord, JobState
from jobledger.staging import TransactionHolder, holders
from jobledger.stores.base import Store

log = logging.getLogger(__name__)

#: Seconds the fast path leaves jobs to the relay after a publish failed (the broker is down).
DEFAULT_BREAKER = 5.0

_ELSEWHERE = (
    "staged jobs would never be published; point JOBLEDGER_DATABASE_URL at the database your "
    "transactions write to"
)


class Outbox:
    """Stages jobs in callers' transactions and publishes them right after the commit.

    ``publish`` sends a batch (default: each job's integration from the registry); the fast
    path of a transaction that staged many jobs publishes them ``batch_size`` at a time.
    ``counters`` says what happened (``staged``, ``published``, ``left_to_relay``, and
    ``unique_held``: jobs not staged because an unfinished job held their unique key).
    """

    def __init__(
        self,
        store: Store,
        *,
        publish: PublishBatch = registry.publish_many,
        batch_size: int = 1000,
        breaker: float = DEFAULT_BREAKER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.publish = publish
        self.batch_size = batch_size
        self.breaker = breaker
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._open_at = 0.0  # the broker failed: the fast path waits until then

    def stage(self, record: JobRecord, using: object | None = None) -> str:
        """Stage ``record`` in the transaction of ``using`` (see :meth:`Holders.resolve`) and
        return its id. Without a transaction it is written through the ledger's own
        connection and published at once (:meth:`publish_now`). A record whose
        ``unique_key`` an unfinished job holds is not staged: that job's id is returned.
        :class:`StagingError` if it cannot be staged (a
        :class:`~jobledger.errors.StoreError` if that connection fails); nothing is written
        then."""
        record = dataclasses.replace(record, state=JobState.STAGED)
        holder = holders.resolve(using)
        if holder is None:
            return self.publish_now(record)
        self._check_database(holder)
        held_by = holder.insert(record)
        if held_by is not None:
            self.counters["unique_held"] += 1
            return held_by
        self.counters["staged"] += 1
        holder.after_commit(record.id, self.flush)
        return record.id

    def publish_now(self, record: JobRecord) -> str:
        """Write ``record`` staged through the ledger's own connection, then publish it at
        once (the fast path; the relay if the broker is down) and return its id: a job in the
        ledger before its message exists, which is what makes a unique publish atomic. A
        record whose ``unique_key`` an unfinished job holds writes and publishes nothing, and
        that job's id is returned."""
        record = dataclasses.replace(record, state=JobState.STAGED)
        try:
            created = self.store.create(record)
        except UniqueKeyHeld as held:
            self.counters["unique_held"] += 1
            return held.holder
        if not created:
            raise StagingError(f"job {record.id} exists already; staging needs a new job id")
        self.counters["staged"] += 1
        self.flush([record.id])
        return record.id

    def _check_database(self, holder: TransactionHolder) -> None:
        """Refuse a transaction on another database than the ledger's: its jobs would sit
        staged where no relay looks. The names are compared first (cheap, and enough for the
        usual mistake), then the ledger ids each database holds (two servers with a database
        of the same name). SQL stores say both; other stores cannot differ."""
        ledger = getattr(self.store, "database", None)
        if ledger is not None and holder.database is not None and holder.database != ledger:
            raise StagingError(
                f"the transaction writes to {holder.database} but the ledger is in {ledger}: "
                f"{_ELSEWHERE}"
            )
        ledger_id = getattr(self.store, "ledger_id", None)
        found = holder.ledger_id()  # first: it says if the transaction's database has no ledger
        if ledger_id is not None and found is not None:
            expected = ledger_id()
            if found != expected:
                raise StagingError(
                    f"the transaction writes to another database than the ledger's (ledger id "
                    f"{found[:8]}…, the ledger's {expected[:8]}…), though both are called "
                    f"{holder.database or ledger}: {_ELSEWHERE}"
                )

    def flush(self, job_ids: Collection[str]) -> Published:
        """The fast path: publish these committed staged jobs now and mark them queued. Never
        raises: what it cannot publish stays staged for the relay."""
        ids = list(dict.fromkeys(job_ids))
        done = Published()
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            if self.clock() < self._open_at:  # said when it opened: no line per commit
                self.counters["left_to_relay"] += len(ids) - start
                break
            part = self._flush_chunk(chunk)
            if part is None:
                continue
            if done.add(part):
                self._open_at = self.clock() + self.breaker
                handled = set(part.ids) | set(part.refused)
                self._leave([i for i in ids[start:] if i not in handled], f"{part.error}")
                break
        self.counters["published"] += len(done.ids)
        return done

    def _flush_chunk(self, ids: list[str]) -> Published | None:
        """One batch; None if the ledger failed (the relay will do it; the broker may be
        fine, so that opens no breaker)."""
        try:
            with self.store.staged_batch(limit=len(ids), ids=ids) as batch:
                done = self.publish(batch.records)
                batch.mark_queued(done.ids)
                batch.mark_refused(done.refused)
        except JobLedgerError as exc:
            self._leave(ids, f"the ledger failed: {exc}")
            return None
        except Exception as exc:  # runs in a commit hook: a bug must not fail the caller's commit
            log.exception("the outbox fast path failed")
            return Published(error=PublishError(f"publishing failed: {exc!r}"))
        for job_id, why in done.refused.items():
            log.error("job %s failed: the queue system refused its message (%s)", job_id, why)
        return done

    def _leave(self, ids: list[str], why: str) -> None:
        """Jobs the fast path does not publish: the relay will, after its grace."""
        if ids:
            self.counters["left_to_relay"] += len(ids)
            log.warning("%d staged jobs left to the relay: %s", len(ids), why)
