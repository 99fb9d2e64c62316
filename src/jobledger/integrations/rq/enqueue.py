"""The way in at enqueue: RQ has no publish signal, so tracked queues record their jobs.

:class:`Queue` (or any queue :func:`install` was given) stamps each job it creates as tracked
at generation 0 and writes its ``queued`` record before the job reaches Redis: every
enqueue path goes through ``create_job`` (``enqueue``, ``enqueue_call``, ``enqueue_at`` /
``enqueue_in``, ``enqueue_many``, a ``Retry`` kept in the job), and a job made by hand
(``Job.create`` then ``enqueue_job``/``schedule_job``) is stamped and recorded there. Caller-
given ids are the record's ids. An enqueue that raises after the record was written leaves
it ``cancelled`` with the error, as the caller was told. A job's orphan policy is its meta's
``on_orphan`` (``queue.enqueue(charge, 7, meta={"on_orphan": "fail"})``), else
``JOBLEDGER_ON_ORPHAN``; a misspelt one fails the enqueue before anything is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import rq
from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job

from jobledger.config import Settings
from jobledger.errors import StagingError, StoreError
from jobledger.integrations.rq.integration import RQIntegration, integration_for
from jobledger.integrations.rq.marks import orphan_policy, stamp
from jobledger.stores import Store

log = logging.getLogger(__name__)


class TrackedQueue(rq.Queue):
    """An RQ queue whose jobs the ledger tracks (a mixin when made by :func:`install`)."""

    @property
    def jobledger(self) -> RQIntegration:
        return integration_for(self.connection)

    def create_job(self, *args: Any, **kwargs: Any) -> Job:
        job = super().create_job(*args, **kwargs)
        stamp(job)
        orphan_policy(job, self.jobledger.settings.on_orphan)  # misspelt: raise before the push
        return job

    def enqueue_job(self, job: Job, *args: Any, **kwargs: Any) -> Job:
        self._track(job)
        try:
            return super().enqueue_job(job, *args, **kwargs)
        except Exception as exc:
            self.jobledger.runtime.outcomes.unpublished(job.id, exc)
            raise

    def schedule_job(self, job: Job, datetime: datetime, *args: Any, **kwargs: Any) -> Job:
        self._track(job, datetime)
        try:
            return super().schedule_job(job, datetime, *args, **kwargs)
        except Exception as exc:
            self.jobledger.runtime.outcomes.unpublished(job.id, exc)
            raise

    def enqueue_many(self, job_datas: Any, *args: Any, **kwargs: Any) -> list[Job]:
        # the jobs are made and pushed inside: record them once they exist
        jobs: list[Job] = super().enqueue_many(job_datas, *args, **kwargs)
        for job in jobs:
            self._track(job)
        return jobs

    def _track(self, job: Job, scheduled_at: datetime | None = None) -> None:
        stamp(job)
        job.origin = self.name
        self.jobledger.record(job, scheduled_at)

    def enqueue(self, f: Any, *args: Any, unique_key: str | None = None, **kwargs: Any) -> Job:
        """``rq.Queue.enqueue``; with ``unique_key``, while an unfinished job holds the key
        nothing is enqueued and that job is returned (see :meth:`RQIntegration.publish_unique`;
        a handle with only its id while the relay has yet to enqueue it). A unique job takes
        the options a staged one does. A ledger that is down cannot say who holds the key:
        the job is enqueued as without one (at least once beats never) and marked
        unrecorded, its record written later without the key."""
        if unique_key is None:
            return super().enqueue(f, *args, **kwargs)
        call = self.parse_args(f, *args, **kwargs)._asdict()
        named = {"timeout", "description", "result_ttl", "ttl", "failure_ttl"}
        beyond = sorted(
            k
            for k, v in call.items()
            if v and k not in named | {"func", "args", "kwargs", "job_id"}
        )
        if beyond:
            raise StagingError(
                f"option(s) {', '.join(beyond)} cannot be given with unique_key; a unique RQ "
                "job takes job_id, job_timeout, description, result_ttl, ttl, failure_ttl"
            )
        options = {k: call[k] for k in named if call[k] is not None}
        try:
            job_id = self.jobledger.publish_unique(
                call["func"], call["args"], call["kwargs"], queue=self.name,
                job_id=call["job_id"], unique_key=unique_key, **options,
            )  # fmt: skip
        except StoreError as exc:
            log.warning("unique key %r not checked, the ledger is unavailable: %s", unique_key, exc)
            return super().enqueue(f, *args, **kwargs)
        try:
            return Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return Job(job_id, connection=self.connection)

    def enqueue_staged(
        self,
        f: Any,
        *args: Any,
        using: object | None = None,
        job_id: str | None = None,
        **options: Any,
    ) -> str:
        """``enqueue``, staged in the transaction of ``using`` (or the open one): the job is
        enqueued only once that transaction commits (see :meth:`RQIntegration.stage`, which
        takes ``unique_key`` too)."""
        return self.jobledger.stage(
            f, args, options.pop("kwargs", None), queue=self.name, job_id=job_id, using=using,
            **options,
        )  # fmt: skip


class Queue(TrackedQueue):
    """``rq.Queue`` with every job tracked: ``Queue("default", connection=redis)``."""


_tracked_classes: dict[type[rq.Queue], type[rq.Queue]] = {}


def install(
    queue_or_connection: rq.Queue | Redis,
    settings: Settings | None = None,
    *,
    store_factory: Callable[[], Store] | None = None,
) -> RQIntegration:
    """Track the jobs of ``queue_or_connection`` and register the integration (restart,
    recovery, the relay). Given a queue (of any ``rq.Queue`` class), that queue is tracked
    from now on; given a connection, queues of :class:`Queue` on it are, and the integration
    publishes through it."""
    connection = (
        queue_or_connection.connection
        if isinstance(queue_or_connection, rq.Queue)
        else queue_or_connection
    )
    integration = integration_for(connection, settings, store_factory=store_factory)
    if isinstance(queue_or_connection, rq.Queue):
        cls = type(queue_or_connection)
        if not issubclass(cls, TrackedQueue):
            tracked = _tracked_classes.get(cls)
            if tracked is None:
                tracked = _tracked_classes[cls] = type(
                    f"Tracked{cls.__name__}", (TrackedQueue, cls), {}
                )
            queue_or_connection.__class__ = tracked
    return integration
