# mypy: disable-error-code="import-untyped"
"""A Celery task message and the job record it describes, both ways.

The headers jobledger adds to a message (tracked, enqueue time, generation, republish reason,
restart, unrecorded) and the ``send_task`` keywords that publish a message again as it was
(invariant 10).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from jobledger.integrations.celery.staging import SYSTEM
from jobledger.model import JobRecord, Republish

log = logging.getLogger(__name__)

#: Message header with the client's enqueue time (epoch seconds); Celery messages carry none.
ENQUEUED_HEADER = "jobledger_enqueued_at"
#: Message header saying the publisher tracked the job.
TRACKED_HEADER = "jobledger_tracked"
#: Message header of a restart's publish: only such a delivery may start a failed or dead job
#: (for workers from before generations; a current worker reads the generation).
RESTART_HEADER = "jobledger_restart"
#: Message header with the job's fencing generation at this publish (invariant 2).
GENERATION_HEADER = "jobledger_generation"
#: Message header saying why jobledger published the job again (a :class:`Republish` value).
REPUBLISH_HEADER = "jobledger_republish"
#: Set on a message whose record the ledger could not take at publish (it was down): the
#: worker that receives it writes the record.
UNRECORDED_HEADER = "jobledger_unrecorded"
#: The publish options a record keeps, all that a republish passes on (``send_task``
#: keywords; ``link``/``link_error``/``chain``/``chord`` are the message's embed).
REPUBLISH_OPTIONS = (
    "exchange",
    "routing_key",
    "priority",
    "eta",
    "expires",
    "retries",
    "time_limit",
    "soft_time_limit",
    "link",
    "link_error",
    "chain",
    "chord",
)
#: Where ``send_task`` keywords are found in a message's embed (``body[2]``).
EMBED_OPTIONS = {"callbacks": "link", "errbacks": "link_error", "chain": "chain", "chord": "chord"}


def generation_of(value: object) -> int | None:
    """A message's generation header as an int (None: published before generations)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value))
    except (TypeError, ValueError):
        log.warning("ignored a malformed %s header: %r", GENERATION_HEADER, value)
        return None


def republish_of(value: object) -> Republish | None:
    try:
        return None if value is None else Republish(value)
    except ValueError:
        log.warning("ignored a malformed %s header: %r", REPUBLISH_HEADER, value)
        return None


def republish_options(
    body: Any,
    exchange: Any,
    routing_key: str | None,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``send_task`` keywords that publish this message again as it was (invariant 10):
    route, priority, eta (kept absolute, so a restart does not run a delayed job at once),
    expiry, retries so far, time limits and the embed (callbacks, errbacks, chain, chord)."""
    options: dict[str, Any] = {}
    exchange_name = getattr(exchange, "name", exchange)
    if exchange_name:  # a non-default exchange: keep the route; else the queue says it all
        options.update(exchange=exchange_name, routing_key=routing_key)
    hard, soft = [*(headers.get("timelimit") or ()), None, None][:2]
    found = {
        "priority": properties.get("priority"),
        "eta": headers.get("eta"),
        "expires": headers.get("expires"),
        "retries": headers.get("retries"),
        "time_limit": hard,
        "soft_time_limit": soft,
    }
    embed = body[2] if isinstance(body, (tuple, list)) and len(body) >= 3 else None
    if isinstance(embed, Mapping):
        found.update({option: embed.get(key) for key, option in EMBED_OPTIONS.items()})
    options.update({k: v for k, v in found.items() if v})
    return options


def queue_name(declare: list[Any] | None, routing_key: str | None) -> str:
    """The queue a published message goes to: the first declared, else its routing key."""
    for entity in declare or ():
        name = getattr(entity, "name", None)
        if name:
            return str(name)
    return routing_key or "celery"


def delivered_record(
    *,
    job_id: str,
    name: str,
    queue: str,
    args: Any,
    kwargs: Any,
    headers: Mapping[str, Any],
    options: dict[str, Any],
) -> JobRecord:
    """The record a delivery describes (its generation and the options to publish it again),
    for a claim that finds no record (the ledger was down at publish) and for putting the job
    back."""
    enqueued = headers.get(ENQUEUED_HEADER)
    queued_at = datetime.fromtimestamp(float(enqueued), tz=timezone.utc) if enqueued else None
    return JobRecord(
        id=job_id,
        name=name,
        system=SYSTEM,
        queue=queue,
        args=list(args or ()),
        kwargs=dict(kwargs or {}),
        queued_at=queued_at,
        first_queued_at=queued_at,
        generation=generation_of(headers.get(GENERATION_HEADER)) or 0,
        options=options,
    )
