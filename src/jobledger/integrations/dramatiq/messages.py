"""A Dramatiq message as a ledger record, and a record as a message again (invariant 10).

Everything the way back needs is in the message itself: actor name, queue, args, kwargs and
options, so a record rebuilds the message by actor *name* without the actor's code. jobledger's
own markers travel in ``message.options`` (Dramatiq encodes them with the message, keeps them
across its own retries, and passes unknown options through untouched).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from dramatiq import Message
from dramatiq.common import q_name

from jobledger.model import JobRecord, JobState, Republish

log = logging.getLogger(__name__)

SYSTEM = "dramatiq"

#: Option saying the publisher tracked the job (a worker without the actor's ``tracked``
#: option still guards it).
TRACKED_OPTION = "jobledger_tracked"
#: Option with the job's fencing generation at this publish (invariant 2).
GENERATION_OPTION = "jobledger_generation"
#: Option saying why jobledger published the job again (a :class:`Republish` value).
REPUBLISH_OPTION = "jobledger_republish"
#: Option saying the ledger could not take the record at publish: the worker that receives
#: the message journals it, so a message then lost with that worker leaves a record to recover.
UNRECORDED_OPTION = "jobledger_unrecorded"
#: Record option: when a delayed job is due (epoch milliseconds, as Dramatiq's ``eta``).
ETA_OPTION = "eta"
#: Options one enqueue sets and the next must not inherit: the Redis broker's per-enqueue id,
#: the delay's eta (kept as :data:`ETA_OPTION` of the first publish only), what Retries notes
#: about the last failure, and jobledger's own markers (written at each publish).
_TRANSIENT = frozenset(
    {
        "redis_message_id",
        "eta",
        "traceback",
        "requeue_timestamp",
        TRACKED_OPTION,
        GENERATION_OPTION,
        REPUBLISH_OPTION,
        UNRECORDED_OPTION,
    }
)
_RESTARTED = frozenset({JobState.FAILED, JobState.DEAD})


def generation_of(options: Mapping[str, Any]) -> int | None:
    """The message's generation (None: published without jobledger's markers)."""
    value = options.get(GENERATION_OPTION)
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value))
    except ValueError:
        log.warning("ignored a malformed %s option: %r", GENERATION_OPTION, value)
        return None


def republish_of(options: Mapping[str, Any]) -> Republish | None:
    value = options.get(REPUBLISH_OPTION)
    try:
        return None if value is None else Republish(value)
    except ValueError:
        log.warning("ignored a malformed %s option: %r", REPUBLISH_OPTION, value)
        return None


def kept_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a record keeps to publish the message again as it was (``max_retries``,
    ``time_limit``, ``pipe_target``, ``on_success``..., a first delay's eta)."""
    kept = {k: v for k, v in options.items() if k not in _TRANSIENT}
    if options.get("eta") is not None and "retries" not in options:
        kept[ETA_OPTION] = int(options["eta"])  # a delayed first publish: keep when it is due
    return kept


def record_of(
    message: Any, extra: Mapping[str, Any] | None = None, *, stamped: bool = True
) -> JobRecord:
    """The record a message (or a worker's message proxy) describes; ``extra`` options (the
    actor's orphan policy) are recorded with it. ``stamped``: its enqueue time is the
    message's timestamp (for a claim that finds no record: the ledger was down at publish);
    else the ledger's clock stamps it."""
    moment = datetime.fromtimestamp(int(message.message_timestamp) / 1000, tz=timezone.utc)
    first = moment if stamped else None
    return JobRecord(
        id=str(message.message_id),
        name=str(message.actor_name),
        system=SYSTEM,
        queue=q_name(str(message.queue_name)),
        args=list(message.args),
        kwargs=dict(message.kwargs),
        options={**kept_options(message.options), **(extra or {})},
        queued_at=first,
        first_queued_at=first,
        generation=generation_of(message.options) or 0,
    )


def message_of(
    record: JobRecord, reason: Republish | None, now_ms: float | None = None
) -> tuple[Message[Any], int | None]:
    """The message that publishes ``record`` again (same id, actor name, queue, arguments and
    options, the record's generation and ``reason`` as markers) and its delay in milliseconds
    (None: due now). A restart of a failed job starts its retries afresh."""
    options = {k: v for k, v in record.options.items() if k != ETA_OPTION}
    if record.state in _RESTARTED:
        options.pop("retries", None)
    options[TRACKED_OPTION] = True
    options[GENERATION_OPTION] = record.generation
    if reason is not None:
        options[REPUBLISH_OPTION] = reason.value
    first = record.first_queued_at or record.queued_at
    timestamp = int(first.timestamp() * 1000) if first else int(time.time() * 1000)
    message: Message[Any] = Message(
        queue_name=record.queue,
        actor_name=record.name,
        args=tuple(record.args),
        kwargs=dict(record.kwargs),
        options=options,
        message_id=record.id,
        message_timestamp=timestamp,
    )
    eta = record.options.get(ETA_OPTION)
    now = time.time() * 1000 if now_ms is None else now_ms
    delay = int(eta - now) if isinstance(eta, (int, float)) and eta > now else None
    return message, delay
