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

The core sees a transaction only through :class:`TransactionHolder`; the adapters for
SQLAlchemy (:mod:`jobledger.stores.staging`) and Django (:mod:`jobledger.contrib.django`)
register themselves here.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Protocol

from jobledger.errors import JobLedgerError, PublishError, StagingError
from jobledger.integrations.base import PublishBatch, Published, registry
from jobledger.model import JobRecord, JobState
from jobledger.stores.base import Store

log = logging.getLogger(__name__)

#: Seconds the fast path leaves jobs to the relay after a publish failed (the broker is down).
DEFAULT_BREAKER = 5.0

_ELSEWHERE = (
    "staged jobs would never be published; point JOBLEDGER_DATABASE_URL at the database your "
    "transactions write to"
)

#: Publishes the ids staged in one transaction, once, after it committed.
Flush = Callable[[list[str]], object]


class TransactionHolder(Protocol):
    """A caller's open transaction that jobs can be staged in."""

    #: Which database the transaction writes to, as ``backend:name``, or None if unknown:
    #: checked against the ledger's, since jobs staged elsewhere would never be published.
    database: str | None

    def insert(self, record: JobRecord) -> None:
        """Write ``record`` (state ``staged``, times from the database clock) through the
        caller's connection, inside its transaction; :class:`StagingError` if it cannot (no
        ledger tables in that database, a closed or failed transaction), with nothing
        written."""

    def after_commit(self, job_id: str, flush: Flush) -> None:
        """See that ``flush`` is called with ``job_id`` after the outermost transaction commits,
        and never if it rolls back. Several ids staged in one transaction may reach one call."""

    def ledger_id(self) -> str | None:
        """The ledger id stored in the transaction's database (see
        :data:`jobledger.stores.schema.LEDGER_ID`), or None if it has none."""


def hand_over(committed: Iterable[tuple[str, Flush]]) -> None:
    """Give the ids a transaction staged, once it committed, to their fast paths: one call per
    outbox (holders collect the pairs :meth:`TransactionHolder.after_commit` was given)."""
    by_flush: dict[Flush, list[str]] = {}
    for job_id, flush in committed:
        by_flush.setdefault(flush, []).append(job_id)
    for flush, ids in by_flush.items():
        flush(ids)


#: Turns what a caller passed as ``using=`` into a holder; None when it is not its kind.
Adapter = Callable[[object], "TransactionHolder | None"]
#: The holder of the transaction open in this thread right now, if its framework has one
#: (a Django ``atomic`` block); None when there is none.
Ambient = Callable[[], "TransactionHolder | None"]


class Holders:
    """The adapters that find a transaction holder; one per framework. :data:`holders` is the
    process's, and the SQLAlchemy and Django adapters add themselves to it when loaded."""

    #: Adapter modules loaded on first use, each only if its framework is importable.
    BUILTIN = (("sqlalchemy", "jobledger.stores.staging"), ("django", "jobledger.contrib.django"))

    def __init__(self) -> None:
        self._adapters: list[Adapter] = []
        self._ambient: list[Ambient] = []
        self._bound: contextvars.ContextVar[object | None] = contextvars.ContextVar(
            "jobledger_staging_in", default=None
        )
        self._loaded = False
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # apart from _lock: the modules loaded call register()

    def register(self, adapter: Adapter, ambient: Ambient | None = None) -> None:
        with self._lock:
            if adapter not in self._adapters:
                self._adapters.append(adapter)
            if ambient is not None and ambient not in self._ambient:
                self._ambient.append(ambient)

    @contextlib.contextmanager
    def bound(self, using: object) -> Iterator[None]:
        """Within the block, :meth:`resolve` without ``using`` stages through ``using``."""
        token = self._bound.set(using)
        try:
            yield
        finally:
            self._bound.reset(token)

    def resolve(self, using: object | None = None) -> TransactionHolder | None:
        """The holder ``using`` names; without it, the one bound by :meth:`bound` or the
        framework transaction open in this thread. None: no transaction, so the ledger's own
        connection stages (and commits at once). :class:`StagingError` for a ``using`` no
        adapter knows."""
        self._load_builtin()
        explicit = using if using is not None else self._bound.get()
        if explicit is None:
            for ambient in list(self._ambient):
                found = ambient()
                if found is not None:
                    return found
            return None
        for adapter in list(self._adapters):
            holder = adapter(explicit)
            if holder is not None:
                return holder
        raise StagingError(
            f"cannot stage a job in {type(explicit).__name__} {explicit!r}: pass a SQLAlchemy "
            "Session or Connection, or a Django database alias inside transaction.atomic "
            "(with 'jobledger.contrib.django' in INSTALLED_APPS), or leave using= out to stage "
            "through the ledger's own connection"
        )

    def _load_builtin(self) -> None:
        """Import the adapters of the frameworks this process has, once; a thread staging
        meanwhile waits for them rather than finding none."""
        if self._loaded:
            return
        with self._loading:
            if self._loaded:
                return
            for framework, module in self.BUILTIN:
                try:
                    importlib.import_module(framework)
                except ImportError:
                    continue
                importlib.import_module(module)
            self._loaded = True


#: The process's transaction-holder adapters.
holders = Holders()


def staging_in(using: object) -> contextlib.AbstractContextManager[None]:
    """Stage every job staged in this block (and thread, or task) through ``using`` (a Session,
    a Connection, a Django alias) without passing it to each call."""
    return holders.bound(using)


class Outbox:
    """Stages jobs in callers' transactions and publishes them right after the commit.

    ``publish`` sends a batch (default: each job's integration from the registry); the fast
    path of a transaction that staged many jobs publishes them ``batch_size`` at a time.
    ``counters`` says what happened (``staged``, ``published``, ``left_to_relay``).
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
        connection and published at once. :class:`StagingError` if it cannot be staged (a
        :class:`~jobledger.errors.StoreError` if that connection fails); nothing is written
        then."""
        record = dataclasses.replace(record, state=JobState.STAGED)
        holder = holders.resolve(using)
        if holder is None:
            if not self.store.create(record):
                raise StagingError(f"job {record.id} exists already; staging needs a new job id")
            self.counters["staged"] += 1
            self.flush([record.id])
            return record.id
        self._check_database(holder)
        holder.insert(record)
        self.counters["staged"] += 1
        holder.after_commit(record.id, self.flush)
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
