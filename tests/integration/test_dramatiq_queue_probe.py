"""The Dramatiq integration counts what a real broker holds ready in a queue (the sweep's fact
for messages a broker lost), on Redis and RabbitMQ, and publishes a record back by actor name
without the actor's code."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from dramatiq import Broker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from jobledger.integrations.dramatiq.messages import GENERATION_OPTION, REPUBLISH_OPTION
from jobledger.integrations.dramatiq.publish import DramatiqPublisher
from jobledger.model import JobRecord, JobState, Republish
from jobledger.testing import wait_for

REDIS = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ = os.environ.get("JOBLEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    made: Broker = (
        RedisBroker(url=REDIS, namespace=f"jl-probe-{uuid.uuid4().hex[:8]}")
        if request.param == "redis"
        else RabbitmqBroker(url=RABBITMQ)
    )
    yield made
    made.close()


def test_a_record_is_published_by_actor_name_and_counted(broker: Broker) -> None:
    publisher = DramatiqPublisher(broker)  # no actor declared: a process without the code
    queue = f"jl-probe-{uuid.uuid4().hex[:10]}"
    assert publisher.ready_messages(queue) == 0  # a queue the broker does not have
    try:
        for n in range(3):
            record = JobRecord(
                id=f"{queue}-{n}", name="billing.charge", system="dramatiq", queue=queue,
                args=[n], options={"max_retries": 2}, generation=1,
            )  # fmt: skip
            publisher.publish(record, reason=Republish.RECOVERY)
        wait_for("the broker to count 3", lambda: publisher.ready_messages(queue) == 3)
        consumer = broker.consume(queue, timeout=1000)
        message = wait_for("a message", lambda: next(consumer))
        consumer.ack(message)
        consumer.close()
        assert message.actor_name == "billing.charge" and message.message_id == f"{queue}-0"
        assert message.args == (0,) and message.options["max_retries"] == 2
        assert message.options[GENERATION_OPTION] == 1
        assert message.options[REPUBLISH_OPTION] == "recovery"
    finally:
        broker.flush(queue)


def test_a_job_that_waits_for_a_delay_has_no_queue_to_count(broker: Broker) -> None:
    publisher = DramatiqPublisher(broker)
    plain = JobRecord(id="a", name="t", queue="q")
    delayed = JobRecord(id="b", name="t", queue="q", options={"eta": 1})
    retrying = JobRecord(id="c", name="t", queue="q", state=JobState.RETRYING)
    assert publisher.broker_queue(plain) == "q"
    assert publisher.broker_queue(delayed) is None
    assert publisher.broker_queue(retrying) is None


def test_ready_messages_says_none_when_the_broker_is_down() -> None:
    publisher = DramatiqPublisher(RedisBroker(url="redis://127.0.0.1:1/0"))
    assert publisher.ready_messages("any") is None
