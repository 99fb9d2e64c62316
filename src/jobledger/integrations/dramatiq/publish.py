"""The way back: publish a job record onto its Dramatiq queue again, and count a queue.

Restart, recovery and the relay publish by actor *name* (invariant 10): the message is rebuilt
from the record and enqueued on the broker directly, its queue declared first, so a process
without the actor's code (a supervisor, another service's worker) can do it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from dramatiq import Broker

from jobledger.errors import PublishError
from jobledger.integrations.base import Published, publish_one_by_one
from jobledger.integrations.dramatiq.messages import ETA_OPTION, SYSTEM, message_of
from jobledger.model import JobRecord, JobState, Republish

log = logging.getLogger(__name__)


class DramatiqPublisher:
    """The :class:`~jobledger.integrations.base.Integration` of one Dramatiq broker, and its
    :class:`~jobledger.integrations.base.QueueProbe` on the Redis and RabbitMQ brokers."""

    system = SYSTEM

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        """Enqueue the job again: same message id, actor name, queue, args and options, its
        generation and ``reason`` in the options, and what is left of a first delay.
        :class:`PublishError` if the broker did not take it."""
        message, delay = message_of(record, reason)
        try:
            self.broker.declare_queue(record.queue)
            self.broker.enqueue(message, delay=delay)
        except Exception as exc:
            raise PublishError(
                f"dramatiq did not take job {record.id} ({record.name}): {exc!r}"
            ) from exc

    def publish_many(self, records: Sequence[JobRecord]) -> Published:
        """One by one (a Dramatiq broker has no batch enqueue); stops at the first refusal."""
        return publish_one_by_one(self.publish, records)

    # -- QueueProbe ---------------------------------------------------------------------------
    def broker_queue(self, record: JobRecord) -> str | None:
        """Where the job's message waits: its queue, unless it waits for a delay (a retry's
        backoff, a first publish's eta) in the delay queue, whose messages a worker holds in
        memory until due; such a job is never judged lost."""
        if record.state is JobState.RETRYING or record.options.get(ETA_OPTION) is not None:
            return None
        return record.queue

    def ready_messages(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` and not yet fetched by a worker: the length of its
        Redis list, or a passive declare's count on RabbitMQ (0 for a queue it lacks). None
        for another broker, or one that cannot be reached."""
        try:
            client = getattr(self.broker, "client", None)
            if client is not None and hasattr(self.broker, "namespace"):
                return int(client.llen(f"{self.broker.namespace}:{queue}"))
            if hasattr(self.broker, "get_queue_message_counts"):
                return _rabbitmq_ready(self.broker, queue)
        except Exception as exc:
            log.debug("cannot count the messages in queue %s: %r", queue, exc)
        return None


def _rabbitmq_ready(broker: Any, queue: str) -> int:
    """A passive declare on the broker's channel of this thread; a queue RabbitMQ lacks
    closes that channel, which is dropped so the next call opens another."""
    from pika.exceptions import ChannelClosedByBroker  # type: ignore[import-untyped]

    try:
        return int(broker.channel.queue_declare(queue, passive=True).method.message_count)
    except ChannelClosedByBroker as exc:
        del broker.channel
        if exc.reply_code == 404:
            return 0
        raise
