# mypy: disable-error-code="import-untyped"
"""The way back for Celery: publish a job record again by task name, no task code needed
(invariant 10), one job or a batch through one broker connection; and the broker's queue
depth, for the lost-message sweep (:class:`~jobledger.integrations.base.QueueProbe`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from amqp.exceptions import IrrecoverableChannelError, NotFound
from celery import Celery
from celery.exceptions import QueueNotFound
from kombu.exceptions import ContentDisallowed, EncodeError

from jobledger.errors import MessageRefused, PublishError
from jobledger.integrations.base import Published
from jobledger.integrations.celery.messages import (
    GENERATION_HEADER,
    REPUBLISH_HEADER,
    REPUBLISH_OPTIONS,
    RESTART_HEADER,
    TRACKED_HEADER,
)
from jobledger.model import JobRecord, JobState, Republish

log = logging.getLogger(__name__)

_RESTARTED = frozenset({JobState.FAILED, JobState.DEAD})
#: What Celery raises for a message it refuses itself, every time: no such queue, arguments its
#: serializer cannot encode. Only these fail the job; anything else (a broker down, full, read
#: only, refusing access) is an outage the relay waits out, since failing a whole backlog for
#: it would be wrong.
_REFUSALS = (QueueNotFound, EncodeError, ContentDisallowed)
#: Publishes of jobs that are in the ledger already (relay, recovery, restart) try the broker
#: once more after a connection error, then leave the job to the next relay pass or sweep.
_REPUBLISH_RETRY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 0.5,
}


class _ChannelClosed(Exception):
    """The AMQP broker closed a batch's channel over one of its messages."""


class CeleryPublisher:
    """Publishes job records through ``app``'s producers."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._batch = threading.local()  # set while a batch publishes (staged jobs)

    @property
    def in_batch(self) -> bool:
        """True while this thread publishes a batch of staged jobs, which the ledger has:
        the publish hook records nothing for them."""
        return bool(getattr(self._batch, "active", False))

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        """Send the job again with its id, name, args, kwargs, queue and options, and its
        generation and ``reason`` in headers. A failed or dead job's message also says it is a
        restart, for workers from before generations."""
        self._send(record, reason=reason)

    def publish_many(self, records: Sequence[JobRecord]) -> Published:
        """Publish in order through one broker connection; stop at the first refusal.

        An AMQP broker answers a bad message (to an exchange that does not exist) by closing
        the channel, later, and drops what follows on it without a word; so each batch ends
        with a round trip on its channel. If the channel was closed, nothing of the batch
        counts as sent, and it goes again one message at a time: a message whose exchange does
        not exist is refused alone (the others may arrive twice; the claim guard runs them
        once); any other closing reason (access refused) stops the batch as an outage."""
        try:
            return self._publish_batch(records)
        except _ChannelClosed as exc:
            log.warning(
                "the broker closed the channel during a batch (%s): sending it again one job "
                "at a time",
                exc.__cause__,
            )
        done = Published()
        for record in records:
            try:
                part = self._publish_batch([record])
            except _ChannelClosed as exc:
                if not isinstance(exc.__cause__, NotFound):  # access refused...: not this job's
                    done.error = PublishError(f"the broker closed the channel: {exc.__cause__}")
                    break
                done.refused[record.id] = f"the broker closed the channel: {exc.__cause__}"
                continue
            if done.add(part):
                break
        return done

    def _publish_batch(self, records: Sequence[JobRecord]) -> Published:
        done = Published()
        try:
            with self.app.producer_or_acquire() as producer:
                for record in records:
                    try:
                        self._send(record, producer)
                    except MessageRefused as exc:
                        done.refused[record.id] = str(exc)
                        continue
                    done.ids.append(record.id)
                _round_trip(producer)
        except _ChannelClosed:
            raise
        except PublishError as exc:
            if isinstance(exc.__cause__, IrrecoverableChannelError):  # closed over an earlier one
                raise _ChannelClosed() from exc.__cause__
            done.error = exc
        except Exception as exc:  # acquiring the connection failed
            done.error = PublishError(f"celery could not reach the broker: {exc}")
        return done

    def _send(
        self, record: JobRecord, producer: Any = None, *, reason: Republish | None = None
    ) -> None:
        options = {
            k: record.options[k] for k in REPUBLISH_OPTIONS if record.options.get(k) is not None
        }
        headers: dict[str, Any] = {TRACKED_HEADER: True, GENERATION_HEADER: record.generation}
        if reason is not None:
            headers[REPUBLISH_HEADER] = reason.value
        if record.state in _RESTARTED:
            headers[RESTART_HEADER] = True
        # Only a staged job's publish skips the record at publish: a recovery's or restart's
        # keeps it, whose timing the own-redelivery grace of claims was tuned against (skipping
        # it there made the poison-pill e2e test lose its last message in 3 runs of 6).
        self._batch.active = producer is not None
        try:
            self.app.send_task(
                record.name,
                args=record.args,
                kwargs=record.kwargs,
                task_id=record.id,
                queue=record.queue,
                headers=headers,
                producer=producer,
                retry_policy=_REPUBLISH_RETRY,
                **options,
            )
        except Exception as exc:
            refusal = MessageRefused if isinstance(exc, _REFUSALS) else PublishError
            raise refusal(f"celery did not take job {record.id} ({record.name}): {exc}") from exc
        finally:
            self._batch.active = False

    @staticmethod
    def broker_queue(record: JobRecord) -> str | None:
        """Where the job's message waits: its queue, unless it was routed through a named
        exchange, whose bindings this process does not know."""
        return None if record.options.get("exchange") else record.queue

    def ready_messages(self, queue: str) -> int | None:
        """Messages the broker holds ready in ``queue``: kombu's own count on its virtual
        transports (Redis, including priority lists), a passive declare on AMQP; 0 for a queue
        the broker does not have; None if it cannot tell."""
        try:
            with self.app.connection_for_read() as connection:
                channel = connection.default_channel
                size = getattr(channel, "_size", None)  # kombu's virtual transports
                if size is not None:
                    return int(size(queue))
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except NotFound:
            return 0
        except Exception as exc:
            log.debug("cannot count the messages in queue %s: %s", queue, exc)
            return None


def _round_trip(producer: Any) -> None:
    """On AMQP, wait for the broker to answer on the producer's channel: a channel it closed
    over a message of ours raises here (and the pool revives the channel for the next use)."""
    if getattr(producer.connection.transport, "driver_type", None) != "amqp":
        return
    try:
        producer.channel.exchange_declare("amq.direct", "direct", passive=True)
    except IrrecoverableChannelError as exc:
        raise _ChannelClosed() from exc
