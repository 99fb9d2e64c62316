"""What an RQ job carries for the ledger, and the job record and delivery it describes.

RQ has no message headers: a queue holds job ids, and every delivery of an id reads the job's
one hash. The publisher's mark (:data:`TRACKED`) and the job's orphan policy live in its
``meta``; the fencing generation, the republish reason and the unrecorded mark are fields of
the hash of their own (:data:`FIELDS`), written by each (re)publish before the id is pushed.
Not in ``meta``: a body calling ``job.save_meta()`` writes back the meta it loaded, which
after a republish would carry an older generation and make the new delivery look stale.
A stray second copy of an id reads the *current* generation: it is told apart from the run
it duplicates by the record's state and owner (the claim guard), not by its number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from rq.job import Job

from jobledger.errors import ConfigError
from jobledger.model import ORPHAN_OPTION, JobRecord, OrphanPolicy, Republish
from jobledger.runtime.guard import Delivery
from jobledger.stores.rows import dump_json

log = logging.getLogger(__name__)

SYSTEM = "rq"
#: ``job.meta`` key: the publisher tracked this job (the worker claims only such jobs).
TRACKED = "jobledger_tracked"
#: ``job.meta`` key: what the job becomes if its worker dies while it runs (an
#: :class:`~jobledger.model.OrphanPolicy` value: ``meta={"on_orphan": "fail"}``); unset: the
#: publisher's ``JOBLEDGER_ON_ORPHAN``.
ORPHAN = ORPHAN_OPTION
#: Job hash field: the job's fencing generation at its latest publish (absent: 0, a first
#: publish; invariant 2).
GENERATION = "jobledger_generation"
#: Job hash field: why jobledger published the job again (a :class:`Republish` value).
REPUBLISH = "jobledger_republish"
#: Job hash field: the ledger could not take the job's record at enqueue; the worker that
#: receives it journals the record.
UNRECORDED = "jobledger_unrecorded"
#: The hash fields above, in the order :func:`delivery_of` reads them.
FIELDS = (GENERATION, REPUBLISH, UNRECORDED)
#: The ``create_job`` keywords a record keeps to publish the job again as it was.
JOB_OPTIONS = ("timeout", "result_ttl", "ttl", "failure_ttl", "description")


def is_tracked(job: Job) -> bool:
    return bool(job.meta.get(TRACKED))


def stamp(job: Job) -> None:
    """Mark ``job`` tracked (saved with the job by the enqueue that follows)."""
    job.meta[TRACKED] = True


def orphan_policy(job: Job, default: OrphanPolicy) -> OrphanPolicy:
    """The job's own orphan policy (its meta's ``on_orphan``), else ``default``.
    :class:`ConfigError` naming the job for one no policy has."""
    named = job.meta.get(ORPHAN)
    if named is None:
        return default
    try:
        return OrphanPolicy.parse(named)
    except ConfigError as exc:
        raise ConfigError(f"job {job.id} ({job.func_name}): meta {ORPHAN}: {exc}") from None


def options_of(
    job: Job, scheduled_at: datetime | None = None, policy: OrphanPolicy = OrphanPolicy.REQUEUE
) -> dict[str, Any]:
    """The options that publish ``job`` again without its code (invariant 10): its RQ
    keywords, its retries left and their intervals, at-front, its schedule (kept absolute),
    its dependencies, the user's own meta and its orphan policy (the default needs none)."""
    options: dict[str, Any] = {
        name: getattr(job, name) for name in JOB_OPTIONS if getattr(job, name, None) is not None
    }
    if job.retries_left:
        options["retry"] = {"max": job.retries_left, "intervals": list(job.retry_intervals or [0])}
    if getattr(job, "enqueue_at_front", False):
        options["at_front"] = True
    if scheduled_at is not None:
        options["scheduled_at"] = scheduled_at.astimezone(timezone.utc).isoformat()
    if job._dependency_ids:
        options["depends_on"] = {
            "jobs": list(job._dependency_ids),
            "allow_failure": bool(job.allow_dependency_failures),
        }
    meta = {k: v for k, v in job.meta.items() if k != TRACKED}
    if meta:
        options["meta"] = meta
    if policy is not OrphanPolicy.REQUEUE:
        options[ORPHAN_OPTION] = policy.value
    return options


def record_of(
    job: Job,
    scheduled_at: datetime | None = None,
    *,
    policy: OrphanPolicy = OrphanPolicy.REQUEUE,
    generation: int = 0,
) -> JobRecord | None:
    """The ledger record ``job`` describes, or None if it cannot be published again by name
    (a bound method's instance, arguments JSON cannot hold): such a job is not tracked."""
    if job.instance is not None:
        log.warning("job %s calls a method of an instance: not tracked (use a function)", job.id)
        return None
    try:
        args, kwargs = list(job.args or ()), dict(job.kwargs or {})
        options = options_of(job, scheduled_at, policy)
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
        generation=generation,
    )


def delivery_of(
    job: Job, fields: Sequence[bytes | str | None], policy: OrphanPolicy
) -> tuple[Delivery, bool] | None:
    """What this delivery of ``job`` says (its hash's :data:`FIELDS` as read now), and
    whether its record is unrecorded; None for a job jobledger does not track."""
    generation, reason, unrecorded = (_text(value) for value in fields)
    record = record_of(job, policy=policy, generation=_generation(job, generation))
    if record is None:
        return None
    return Delivery(record, record.generation, _republish(job, reason)), bool(unrecorded)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _generation(job: Job, value: str | None) -> int:
    try:
        return 0 if value is None else int(value)
    except ValueError:
        log.warning("job %s: ignored a malformed %s: %r", job.id, GENERATION, value)
        return 0


def _republish(job: Job, value: str | None) -> Republish | None:
    try:
        return Republish(value) if value else None
    except ValueError:
        log.warning("job %s: ignored a malformed %s: %r", job.id, REPUBLISH, value)
        return None
