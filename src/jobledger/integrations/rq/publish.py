"""The way back: a job record published onto its RQ queue again by function name.

No task code is imported (invariant 10): RQ keeps the function as a dotted name, which a job
made from a string is. First the job leaves the lists and registries where an earlier
message or run left it (queue, intermediate queue, started, failed, scheduled), so RQ's own
cleanup does not later fail a job jobledger has put back and ``rq info`` counts it once, as
queued, and its hash takes the record's generation and the republish reason
(:data:`~jobledger.integrations.rq.marks.FIELDS`); then its hash is written anew (status
queued) and its id pushed, or deferred again behind the dependencies it was enqueued with
that have not finished (RQ enqueues it once they have; one that finished or that Redis no
longer holds does not hold it back).
(One transaction cannot hold both: RQ's enqueue watches keys in the pipeline it is given.)
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.job import Dependency
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from jobledger.errors import PublishError
from jobledger.integrations.rq.marks import (
    GENERATION,
    JOB_OPTIONS,
    REPUBLISH,
    UNRECORDED,
    stamp,
)
from jobledger.model import JobRecord, Republish


def publish(connection: Redis, record: JobRecord, reason: Republish | None = None) -> None:
    """Enqueue ``record`` on its queue with its id; :class:`PublishError` if Redis did not
    take it. A job scheduled for later (``enqueue_at``/``enqueue_in``) is scheduled again
    for the same moment; one whose moment passed is queued now."""
    queue = Queue(record.queue, connection=connection)
    options = record.options
    try:
        job = queue.create_job(
            record.name,
            args=record.args,
            kwargs=record.kwargs,
            job_id=record.id,
            meta=dict(options.get("meta") or {}),
            retry=_retry(options.get("retry")),
            depends_on=_depends_on(options.get("depends_on")),
            **{k: options[k] for k in JOB_OPTIONS if options.get(k) is not None},
        )
        stamp(job)
        at = _scheduled_at(options)
        with connection.pipeline() as pipe:
            forget_runs(queue, record.id, pipe)
            pipe.hset(job.key, GENERATION, record.generation)
            if reason is None:
                pipe.hdel(job.key, REPUBLISH)
            else:
                pipe.hset(job.key, REPUBLISH, reason.value)
            pipe.hdel(job.key, UNRECORDED)
            pipe.execute()
        if at is not None:
            queue.schedule_job(job, at)
        else:
            queue.enqueue_job(job, at_front=bool(options.get("at_front")))
    except (RedisError, OSError) as exc:
        raise PublishError(f"rq could not enqueue job {record.id} ({record.name}): {exc}") from exc


def forget_runs(queue: Queue, job_id: str, pipe: Any) -> None:
    """Take ``job_id`` out of where its earlier messages and runs left it: the queue and the
    intermediate queue (a worker that died between taking it and starting it), so the
    republished id is queued once; StartedJobRegistry (entries ``<job id>:<execution id>``),
    FailedJobRegistry and ScheduledJobRegistry."""
    started = StartedJobRegistry(queue=queue)
    stale = [
        entry
        for entry in queue.connection.zrange(started.key, 0, -1)
        if _job_id_of(entry) == job_id
    ]
    if stale:
        pipe.zrem(started.key, *stale)
    FailedJobRegistry(queue=queue).remove(job_id, pipeline=pipe)
    ScheduledJobRegistry(queue=queue).remove(job_id, pipeline=pipe)  # type: ignore[no-untyped-call]
    pipe.lrem(queue.key, 0, job_id)
    pipe.lrem(queue.intermediate_queue_key, 0, job_id)


def _job_id_of(entry: Any) -> str:
    text = entry.decode() if isinstance(entry, bytes) else entry
    return text.rsplit(":", 1)[0] if ":" in text else text


def _retry(value: Any) -> Retry | None:
    if not isinstance(value, dict) or not value.get("max"):
        return None
    return Retry(max=int(value["max"]), interval=list(value.get("intervals") or [0]))


def _depends_on(value: Any) -> Dependency | None:
    if not isinstance(value, dict) or not value.get("jobs"):
        return None
    return Dependency(jobs=list(value["jobs"]), allow_failure=bool(value.get("allow_failure")))


def _scheduled_at(options: dict[str, Any]) -> datetime | None:
    text = options.get("scheduled_at")
    if not text:
        return None
    at = datetime.fromisoformat(str(text))
    return at if at > datetime.now(timezone.utc) else None
