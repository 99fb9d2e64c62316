"""The celery-once adapter against a real Redis: the locks it deletes before recovery and a
restart publish a job again are named as celery-once 3.0 names them. celery-once is not
installed here; each lock below is written under the name its source
(``QueueOnce.get_key``, ``helpers.queue_once_key``) gives that call."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from redis import Redis

from jobledger.contrib import celery_once
from jobledger.integrations.base import registry
from jobledger.manager import Manager
from jobledger.model import JobRecord, JobState, Republish
from jobledger.recovery import Recovery
from jobledger.testing import MemoryStore

REDIS = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("once-unit", broker="memory://", set_as_current=False)
    app.conf.ONCE = {"backend": celery_once.REDIS_BACKEND, "settings": {"url": REDIS}}

    @app.task(name="t.charge", once={"graceful": True}, shared=False)
    def charge(order: int, amount: int, note: str | None = None) -> None:
        pass

    @app.task(name="t.sync", once={}, shared=False)
    def sync(opts: dict[str, Any]) -> None:
        pass

    @app.task(name="t.page", once={"keys": ["user"]}, bind=True, shared=False)
    def page(self: Any, user: int, page: int) -> None:
        pass

    @app.task(name="t.plain", shared=False)
    def plain(order: int) -> None:
        pass

    hook = celery_once.install(app)
    yield app
    registry.remove_republish_hook(hook)


@pytest.fixture
def redis() -> Iterator[Redis]:
    client = Redis.from_url(REDIS)
    yield client
    client.close()


CALLS = [
    ("t.charge", [7, 5], {}, "qo_t.charge_amount-5_order-7"),
    ("t.charge", [7], {"amount": 5, "note": "x y"}, "qo_t.charge_amount-5_note-x y_order-7"),
    (
        "t.sync",
        [{"b": 2, "a": [1, {"z": 1}]}],
        {},
        """qo_t.sync_opts-{'a': [1, "{'z': 1}"], 'b': 2}""",
    ),
    ("t.page", [3, 9], {}, "qo_t.page_user-3"),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "lock"), CALLS)
def test_recovery_deletes_the_lock_before_it_publishes(
    app: Celery, redis: Redis, name: str, args: list[Any], kwargs: dict[str, Any], lock: str
) -> None:
    other = f"qo_t.charge_amount-5_order-{uuid.uuid4().hex}"  # another call's lock stays
    redis.set(lock, "held", ex=60)
    redis.set(other, "held", ex=60)
    store = MemoryStore()
    record = JobRecord(id=f"job-{uuid.uuid4().hex[:8]}", name=name, system="celery", args=args,
                       kwargs=kwargs, state=JobState.STARTED, owner="dead:1")  # fmt: skip
    assert store.create(record)
    seen: list[bool] = []

    def publish(record: JobRecord, *, reason: Republish | None = None) -> None:
        seen.append(bool(redis.exists(lock)))

    recovery = Recovery(store, ttl=5.0, max_recoveries=3, recovery_window=3600.0, publish=publish)
    recovery.sweep_once()
    assert seen == [False]  # gone before the job was published again
    assert redis.exists(other) == 1
    redis.delete(other)


def test_a_restart_deletes_the_lock_and_other_tasks_are_left_alone(
    app: Celery, redis: Redis
) -> None:
    redis.set("qo_t.charge_amount-1_order-2", "held", ex=60)
    redis.set("qo_t.plain_order-2", "held", ex=60)  # no QueueOnce task: not celery-once's
    store = MemoryStore()
    for job_id, name, args in (("a", "t.charge", [2, 1]), ("b", "t.plain", [2])):
        assert store.create(JobRecord(id=job_id, name=name, system="celery", args=args,
                                      state=JobState.FAILED))  # fmt: skip
    published: list[str] = []

    class Publisher:
        system = "celery"

        def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
            published.append(record.id)

    registry.register(Publisher())
    try:
        report = Manager(store).restart(["a", "b"])
    finally:
        registry.unregister("celery")
    assert sorted(report.done) == ["a", "b"] == sorted(published)
    assert redis.exists("qo_t.charge_amount-1_order-2") == 0
    assert redis.exists("qo_t.plain_order-2") == 1
    redis.delete("qo_t.plain_order-2")


def test_a_hook_that_fails_does_not_stop_the_republish(app: Celery) -> None:
    app.conf.ONCE = {
        "backend": celery_once.REDIS_BACKEND,
        "settings": {"url": "redis://127.0.0.1:1/0"},
    }
    store = MemoryStore()
    record = JobRecord(id="a", name="t.charge", system="celery", args=[1, 2],
                       state=JobState.STARTED, owner="dead:1")  # fmt: skip
    assert store.create(record)
    published: list[str] = []
    recovery = Recovery(store, ttl=5.0, max_recoveries=3, recovery_window=3600.0,
                        publish=lambda r, reason=None: published.append(r.id))  # fmt: skip
    recovery.sweep_once()
    assert published == ["a"]
    after = store.get("a")
    assert after is not None and after.state is JobState.QUEUED
