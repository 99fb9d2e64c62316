"""The Celery integration counts what a real broker holds ready in a queue (the sweep's fact
for messages a broker lost): Redis and RabbitMQ."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

from jobledger.config import Settings
from jobledger.integrations.celery import CeleryIntegration
from jobledger.model import JobRecord
from jobledger.testing import MemoryStore, wait_for

REDIS = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ = os.environ.get("JOBLEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(params=[REDIS, RABBITMQ], ids=["redis", "rabbitmq"])
def app(request: pytest.FixtureRequest) -> Iterator[Celery]:
    yield Celery("probe", broker=request.param, set_as_current=False)


def test_ready_messages_counts_what_waits_in_a_queue(app: Celery) -> None:
    integration = CeleryIntegration(app, Settings(), store=MemoryStore())
    queue = f"jl-probe-{uuid.uuid4().hex[:10]}"
    assert integration.ready_messages(queue) == 0  # a queue the broker does not have
    try:
        for n in range(3):
            app.send_task("probe.task", args=[n], queue=queue)
        wait_for("the broker to count 3", lambda: integration.ready_messages(queue) == 3)
    finally:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            channel.queue_delete(queue)


def test_a_job_routed_through_an_exchange_has_no_broker_queue_to_count(app: Celery) -> None:
    integration = CeleryIntegration(app, Settings(), store=MemoryStore())
    plain = JobRecord(id="a", name="t", queue="q")
    routed = JobRecord(id="b", name="t", queue="q", options={"exchange": "media"})
    assert integration.broker_queue(plain) == "q"
    assert integration.broker_queue(routed) is None


def test_ready_messages_says_none_when_the_broker_is_down() -> None:
    app = Celery(
        "probe",
        broker="redis://127.0.0.1:1/0",
        set_as_current=False,
        broker_connection_timeout=1,
        broker_connection_retry=False,
    )
    app.conf.broker_transport_options = {"max_retries": 0}
    integration = CeleryIntegration(app, Settings(), store=MemoryStore())
    assert integration.ready_messages("any") is None
