"""What an RQ job carries for the ledger, and the job record it describes.

RQ has no message headers: a queue holds job ids, and every delivery of an id reads the job's
one hash. So the fencing generation and the republish reason live in the job's ``meta``
(:data:`GENERATION`, :data:`REPUBLISH`), written by each (re)publish before the id is pushed.
A stray second copy of an id therefore reads the *current* generation: it is told apart from
the run it duplicates by the record's state and owner (the claim guard), not by its number.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from rq.job import Job

from jobledger.errors import ConfigError
from jobledger.model import JobRecord, Republish
from jobledger.stores.rows import dump_json

log = logging.getLogger(__name__)

SYSTEM = "rq"
#: ``job.meta`` key: the publisher tracked this job (the worker claims only such jobs).
TRACKED = "jobledger_tracked"
#: ``job.meta`` key: the job's fencing generation at its latest publish (invariant 2).
GENERATION = "jobledger_generation"
#: ``job.meta`` key: why jobledger published the job again (a :class:`Republish` value).
REPUBLISH = "jobledger_republish"
#: ``job.meta`` keys jobledger owns (left out of the meta a republish passes on).
OWN_META = (TRACKED, GENERATION, REPUBLISH)
#: The ``create_job`` keywords a record keeps to publish the job again as it was.
JOB_OPTIONS = ("timeout", "result_ttl", "ttl", "failure_ttl", "description")


def is_tracked(job: Job) -> bool:
    return bool(job.meta.get(TRACKED))


def generation_of(job: Job) -> int | None:
    """The generation the job's hash carries (None: not published by jobledger's hooks)."""
    value = job.meta.get(GENERATION)
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        log.warning("job %s: ignored a malformed %s: %r", job.id, GENERATION, value)
        return None


def republish_of(job: Job) -> Republish | None:
    value = job.meta.get(REPUBLISH)
    try:
        return None if value is None else Republish(value)
    except ValueError:
        log.warning("job %s: ignored a malformed %s: %r", job.id, REPUBLISH, value)
        return None


def stamp(job: Job, generation: int = 0, reason: Republish | None = None) -> None:
    """Mark ``job`` tracked at ``generation`` (saved with the job by the enqueue that follows)."""
    job.meta[TRACKED] = True
    job.meta[GENERATION] = generation
    if reason is None:
        job.meta.pop(REPUBLISH, None)
    else:
        job.meta[REPUBLISH] = reason.value


def options_of(job: Job, scheduled_at: datetime | None = None) -> dict[str, Any]:
    """The options that publish ``job`` again without its code (invariant 10): its RQ
    keywords, its retries left and their intervals, at-front, its schedule (kept absolute)
    and the user's own meta."""
    options: dict[str, Any] = {
        name: getattr(job, name) for name in JOB_OPTIONS if getattr(job, name, None) is not None
    }
    if job.retries_left:
        options["retry"] = {"max": job.retries_left, "intervals": list(job.retry_intervals or [0])}
    if getattr(job, "enqueue_at_front", False):
        options["at_front"] = True
    if scheduled_at is not None:
        options["scheduled_at"] = scheduled_at.astimezone(timezone.utc).isoformat()
    meta = {k: v for k, v in job.meta.items() if k not in OWN_META}
    if meta:
        options["meta"] = meta
    return options


def record_of(job: Job, scheduled_at: datetime | None = None) -> JobRecord | None:
    """The ledger record ``job`` describes, or None if it cannot be published again by name
    (a bound method's instance, arguments JSON cannot hold): such a job is not tracked."""
    if job.instance is not None:
        log.warning("job %s calls a method of an instance: not tracked (use a function)", job.id)
        return None
    try:
        args, kwargs = list(job.args or ()), dict(job.kwargs or {})
        options = options_of(job, scheduled_at)
        dump_json([args, kwargs, options])
    except (ConfigError, TypeError, ValueError) as exc:
        log.warning("job %s (%s) is not tracked: %s", job.id, job.func_name, exc)
        return None
    return JobRecord(
        id=job.id,
        name=str(job.func_name),
        system=SYSTEM,
        queue=job.origin,
        args=args,
        kwargs=kwargs,
        options=options,
        generation=generation_of(job) or 0,
    )
