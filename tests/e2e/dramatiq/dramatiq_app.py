"""The Dramatiq broker module the end-to-end tests run in real ``dramatiq`` worker processes
(and publish from): ``dramatiq dramatiq_app``.

Each actor writes a row per phase to the test's execution log (a SQLite file), with the
worker's instance name, its process id and the time, so a test can count how often each job
ran; ``e2e.work``, ``e2e.hangs_first_time`` and ``e2e.fails_first_time`` are the integration
contract's (:mod:`jobledger.testing.contract.integration`). The broker (``E2E_BROKER``: a
Redis or AMQP URL) and the queue (``E2E_QUEUE``) come from the environment; Redis keys live
under a namespace of the test's own.
"""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq import Broker
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from jobledger.config import Settings
from jobledger.integrations.dramatiq import LedgerMiddleware, install
from jobledger.model import JobRecord, Republish
from jobledger.testing.executions import FIRST_FAILURE, ExecutionLog, record_run


def starts(job_id: str) -> int:
    return len(ExecutionLog.from_env().executions(job_id))


def make_broker(url: str, queue: str) -> Broker:
    if url.startswith("redis"):
        return RedisBroker(url=url, namespace=f"jl-{queue}")
    return RabbitmqBroker(url=url, confirm_delivery=True)


def make_app(url: str, queue: str, settings: Settings) -> tuple[Broker, LedgerMiddleware]:
    """The broker with jobledger installed and the test actors declared on ``queue``."""
    broker = make_broker(url, queue)
    broker.add_middleware(CurrentMessage())
    middleware = install(broker, settings)

    def current_id() -> str:
        message = CurrentMessage.get_current_message()
        assert message is not None
        return str(message.message_id)

    @dramatiq.actor(
        broker=broker, actor_name="e2e.work", queue_name=queue, tracked=True, max_retries=0
    )
    def work(n: int, seconds: float = 0.0) -> None:
        record_run(current_id(), "start")
        time.sleep(seconds)
        record_run(current_id(), "done")

    @dramatiq.actor(
        broker=broker, actor_name="e2e.hangs_first_time", queue_name=queue, tracked=True
    )
    def hangs_first_time(n: int) -> None:
        record_run(current_id(), "start")
        if starts(current_id()) == 1:
            time.sleep(120)  # until the test kills this worker process
        record_run(current_id(), "done")

    @dramatiq.actor(
        broker=broker,
        actor_name="e2e.fails_first_time",
        queue_name=queue,
        tracked=True,
        max_retries=0,
    )
    def fails_first_time(n: int) -> None:
        record_run(current_id(), "start")
        if starts(current_id()) == 1:
            raise ValueError(f"job {n} {FIRST_FAILURE}")
        record_run(current_id(), "done")

    @dramatiq.actor(
        broker=broker,
        actor_name="e2e.flaky", queue_name=queue, tracked=True, max_retries=3, min_backoff=10,
        max_backoff=50,
    )  # fmt: skip
    def flaky(failures: int) -> None:
        record_run(current_id(), "start")
        if starts(current_id()) <= failures:
            raise ValueError(f"failure {starts(current_id())}")
        record_run(current_id(), "done")

    @dramatiq.actor(broker=broker, actor_name="e2e.untracked", queue_name=queue, max_retries=0)
    def untracked(n: int) -> None:
        record_run(current_id(), "untracked")

    @dramatiq.actor(
        broker=broker,
        actor_name="e2e.slow",
        queue_name=queue,
        tracked=True,
        max_retries=0,
        time_limit=500,
    )
    def slow() -> None:
        record_run(current_id(), "start")
        time.sleep(5)

    publish = middleware.publisher.publish

    def counted_publish(record: JobRecord, *, reason: Republish | None = None) -> None:
        """Every publish by a recoverer (recovery, restart) leaves a row in the runs table."""
        publish(record, reason=reason)
        record_run(record.id, "published")

    middleware.publisher.publish = counted_publish  # type: ignore[method-assign]
    return broker, middleware


if os.environ.get("E2E_WORKER") == "1":  # imported by ``dramatiq dramatiq_app``
    BROKER, MIDDLEWARE = make_app(
        os.environ["E2E_BROKER"], os.environ["E2E_QUEUE"], Settings.from_env()
    )
