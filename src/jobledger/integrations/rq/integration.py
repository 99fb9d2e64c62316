"""The RQ integration as the core sees it: publish, count a queue, record at enqueue, stage;
everything queue-agnostic is its :class:`~jobledger.runtime.worker.WorkerRuntime`'s.

One per Redis connection (:func:`integration_for`), registered as the process's ``rq``
integration so that restart, recovery and the relay publish RQ jobs through it.
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job
from rq.registry import DeferredJobRegistry, ScheduledJobRegistry

from jobledger.config import Settings
from jobledger.errors import JobLedgerError, StagingError
from jobledger.integrations.base import Published, publish_one_by_one, registry
from jobledger.integrations.rq import publish as _publish
from jobledger.integrations.rq.marks import (
    JOB_OPTIONS,
    SYSTEM,
    UNRECORDED,
    orphan_policy,
    record_of,
)
from jobledger.model import JobRecord, JobState, Republish
from jobledger.pending import CreateWrite
from jobledger.runtime.worker import WorkerRuntime
from jobledger.stores import Store

log = logging.getLogger(__name__)


class RQIntegration:
    """The ledger's side of RQ on one Redis connection. Build it with :func:`install`."""

    system = SYSTEM

    def __init__(
        self,
        connection: Redis,
        settings: Settings,
        *,
        store_factory: Callable[[], Store] | None = None,
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.runtime = WorkerRuntime(self, settings, store_factory=store_factory, wrappers=("rq",))

    # -- the way back ---------------------------------------------------------------------
    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        _publish.publish(self.connection, record, reason)

    def publish_many(self, records: Sequence[JobRecord]) -> Published:
        return publish_one_by_one(self.publish, records)

    # -- QueueProbe ---------------------------------------------------------------------
    def broker_queue(self, record: JobRecord) -> str | None:
        return record.queue

    def ready_messages(self, queue: str) -> int | None:
        """Jobs Redis holds for ``queue`` that no worker took yet: queued ids, and the
        scheduled (a retry's interval, ``enqueue_at``) and deferred ones, which a sweep must
        not judge lost either. None if Redis cannot be reached."""
        q = Queue(queue, connection=self.connection)
        try:
            scheduled = ScheduledJobRegistry(queue=q)  # type: ignore[no-untyped-call]
            return q.count + scheduled.count + DeferredJobRegistry(queue=q).count
        except RedisError as exc:
            log.debug("cannot count the jobs in RQ queue %s: %s", queue, exc)
            return None

    # -- the way in: at enqueue ---------------------------------------------------------
    def record(self, job: Job, scheduled_at: Any = None) -> bool:
        """Write ``job``'s queued record (with its orphan policy: a misspelt one raises
        :class:`~jobledger.errors.ConfigError` before anything is written). A ledger that is
        down costs a warning and a counter, never the enqueue (invariant 7): the job's hash
        is marked :data:`~jobledger.integrations.rq.marks.UNRECORDED`, so the worker that
        receives it journals the record, and this process writes it once the ledger is back.
        False if the job is not tracked (see :func:`record_of`)."""
        policy = orphan_policy(job, self.settings.on_orphan)
        record = record_of(job, scheduled_at, policy=policy)
        if record is None:
            return False
        try:
            self.runtime.store.create(record)  # False: it exists (a retry, a republish)
        except JobLedgerError as exc:
            self.runtime.count("publish_unrecorded")
            log.warning("job %s (%s) enqueued but not recorded yet: %s", job.id, record.name, exc)
            self.connection.hset(job.key, UNRECORDED, 1)
            self.runtime.pending.add(CreateWrite(record))
        return True

    def close(self) -> None:
        """Leave the registry, stop replaying pending writes and close this process's
        stores (tests; a process done with this connection)."""
        registry.unregister(self.system, self)
        with _lock:
            if _by_connection.get(self.connection) is self:
                del _by_connection[self.connection]
        self.runtime.close()

    def stage(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str = "default",
        job_id: str | None = None,
        using: object | None = None,
        unique_key: str | None = None,
        **options: Any,
    ) -> str:
        """Stage a call of ``func`` in the transaction of ``using`` (a SQLAlchemy Session or
        Connection, a Django alias; default: the bound or open one, else the ledger's own
        connection, committed at once) and return its job id. It is enqueued on ``queue``
        right after the commit, or by the relay. ``options`` are ``create_job``'s
        (``timeout``, ``result_ttl``, ``ttl``, ``failure_ttl``, ``description``);
        :class:`StagingError` for any other. With ``unique_key``, while an unfinished job
        holds the key nothing is staged and that job's id is returned."""
        record = self._staged(func, args, kwargs, queue, job_id, unique_key, options)
        return self.runtime.outbox.stage(record, using)

    def publish_unique(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        *,
        queue: str,
        job_id: str | None,
        unique_key: str,
        **options: Any,
    ) -> str:
        """``enqueue(..., unique_key=...)``: the record, holding the key, is written before
        the job exists in RQ, then enqueued at once (:meth:`Outbox.publish_now`); the id of
        the job enqueued, or of the unfinished job that holds the key (nothing enqueued).
        :class:`~jobledger.errors.StoreError` if the ledger cannot say who holds the key."""
        record = self._staged(func, args, kwargs, queue, job_id, unique_key, options)
        return self.runtime.outbox.publish_now(record)

    def _staged(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        queue: str,
        job_id: str | None,
        unique_key: str | None,
        options: Mapping[str, Any],
    ) -> JobRecord:
        """The staged record of a call (see :meth:`stage`)."""
        unknown = sorted(set(options) - set(JOB_OPTIONS))
        if unknown:
            raise StagingError(
                f"option(s) {', '.join(unknown)} cannot be staged; a staged RQ job takes "
                f"{', '.join(JOB_OPTIONS)}"
            )
        name = func if isinstance(func, str) else f"{func.__module__}.{func.__qualname__}"
        if "<locals>" in name or "." not in name:
            raise StagingError(f"{name!r} is no importable function name")
        job = Job.create(
            name, args=list(args or ()), kwargs=dict(kwargs or {}), connection=self.connection,
            id=job_id or str(uuid.uuid4()), origin=queue, **options,
        )  # fmt: skip
        record = record_of(job)
        if record is None:
            raise StagingError(f"{name}: its arguments cannot be kept as JSON")
        return replace(record, state=JobState.STAGED, unique_key=unique_key)


_by_connection: weakref.WeakKeyDictionary[Redis, RQIntegration] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def integration_for(
    connection: Redis,
    settings: Settings | None = None,
    *,
    store_factory: Callable[[], Store] | None = None,
) -> RQIntegration:
    """The integration of ``connection``, made and registered on first use (from the
    ``JOBLEDGER_*`` settings unless given; ``store_factory`` opens each process's ledger)."""
    with _lock:
        found = _by_connection.get(connection)
        if found is None:
            found = _by_connection[connection] = RQIntegration(
                connection, settings or Settings.from_env(), store_factory=store_factory
            )
            registry.register(found)
        return found
