"""The RQ integration's own logic: what a job carries, the record it makes, publishing by
name, recording at enqueue. Against a real Redis (RQ needs one), a ledger in memory."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from redis import Redis
from rq import Queue as PlainQueue
from rq import Retry
from rq.job import Dependency, Job

from jobledger.config import Settings
from jobledger.errors import ConfigError, StagingError
from jobledger.integrations.base import registry
from jobledger.integrations.rq import Queue, RQIntegration, SimpleWorker, install
from jobledger.integrations.rq.marks import (
    FIELDS,
    TRACKED,
    UNRECORDED,
    delivery_of,
    record_of,
)
from jobledger.integrations.rq.publish import forget_runs
from jobledger.model import JobRecord, JobState, OrphanPolicy, Republish
from jobledger.query import JobQuery
from jobledger.stores.base import Transition
from jobledger.testing import MemoryStore, wait_for

S = JobState

REDIS = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def job_named(name: str = "reports.build", **options: object) -> Job:
    return Job.create(name, connection=Redis.from_url(REDIS), **options)  # type: ignore[arg-type]


def test_a_job_records_what_publishes_it_again_without_its_code() -> None:
    job = job_named(
        args=[2026], kwargs={"model_id": 4242}, id="given-1", origin="reports", timeout=60,
        result_ttl=10, description="build", meta={"tenant": "a"},
        depends_on=Dependency(jobs=["first"], allow_failure=True),
    )  # fmt: skip
    job.retries_left, job.retry_intervals = 2, [1, 5]
    at = datetime(2030, 1, 1, tzinfo=timezone.utc)
    record = record_of(job, at, policy=OrphanPolicy.FAIL)
    assert record is not None
    assert (record.id, record.name, record.system, record.queue) == (
        "given-1", "reports.build", "rq", "reports"
    )  # fmt: skip
    assert (record.args, record.kwargs) == ([2026], {"model_id": 4242})
    assert record.options == {
        "timeout": 60, "result_ttl": 10, "description": "build",
        "retry": {"max": 2, "intervals": [1, 5]}, "scheduled_at": at.isoformat(),
        "meta": {"tenant": "a"}, "depends_on": {"jobs": ["first"], "allow_failure": True},
        "on_orphan": "fail",
    }  # fmt: skip


def test_a_job_json_cannot_hold_is_not_tracked() -> None:
    assert record_of(job_named(args=[object()])) is None


def test_a_delivery_reads_its_hash_fields_and_ignores_malformed_ones() -> None:
    job = job_named(origin="reports", meta={TRACKED: True})
    found = delivery_of(job, [b"3", b"recovery", b"1"], OrphanPolicy.REQUEUE)
    assert found is not None
    delivery, unrecorded = found
    assert (delivery.generation, delivery.republish, unrecorded) == (3, Republish.RECOVERY, True)
    assert delivery.record.generation == 3
    bad = delivery_of(job, [b"x", b"nonsense", None], OrphanPolicy.REQUEUE)
    assert bad is not None
    assert (bad[0].generation, bad[0].republish, bad[1]) == (0, None, False)


@pytest.fixture
def rq_env() -> Iterator[tuple[RQIntegration, MemoryStore, Redis, str]]:
    store = MemoryStore()
    redis = Redis.from_url(REDIS)
    integration = install(redis, Settings(instance_name="client"), store_factory=lambda: store)
    name = f"jl-unit-{uuid.uuid4().hex[:10]}"
    yield integration, store, redis, name
    registry.unregister("rq")  # this one, or the one a test installed on another connection
    keys = list(redis.scan_iter(f"*{name}*"))
    if keys:
        redis.delete(*keys)
    redis.close()


def test_tracked_queues_record_every_enqueue_path(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    _, store, redis, name = rq_env
    queue = Queue(name, connection=redis)
    plain = queue.enqueue("reports.build", 1, job_id="by-caller", retry=Retry(max=3))
    later = queue.enqueue_in(timedelta(hours=1), "reports.build", 2)
    many = queue.enqueue_many([PlainQueue.prepare_data("reports.build", [3])])
    made = Job.create("reports.build", args=[4], connection=redis)
    queue.enqueue_job(made)
    for job in (plain, later, *many, made):
        record = store.get(job.id)
        assert record is not None and record.state is JobState.QUEUED, job.id
        assert Job.fetch(job.id, connection=redis).meta[TRACKED] is True
    assert store.get("by-caller").options["retry"] == {"max": 3, "intervals": [0]}  # type: ignore[union-attr]
    assert "scheduled_at" in store.get(later.id).options  # type: ignore[union-attr]


def test_install_on_a_queue_tracks_that_queue_of_any_class(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    integration, store, redis, name = rq_env

    class Custom(PlainQueue):
        pass

    queue = Custom(name, connection=redis)
    assert install(queue) is integration
    assert isinstance(queue, Custom)
    job = queue.enqueue("reports.build", 1)
    assert store.get(job.id) is not None
    assert store.get(PlainQueue(name, connection=redis).enqueue("reports.build", 2).id) is None


def test_an_enqueue_that_raises_leaves_the_record_cancelled(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    integration, store, _, name = rq_env
    down = Redis(port=1)  # nothing listens there
    install(down, integration.settings, store_factory=lambda: store)
    with pytest.raises(Exception):  # noqa: B017 - redis's own error, whatever it is
        Queue(name, connection=down).enqueue("reports.build", 1, job_id="unsent")
    record = store.get("unsent")
    assert record is not None and record.state is JobState.CANCELLED
    assert "its publish failed and the caller was told" in (record.error or "")


def test_publish_puts_the_job_back_by_name_and_out_of_rqs_registries(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    integration, _, redis, name = rq_env
    queue = PlainQueue(name, connection=redis)
    queue.failed_job_registry.add(job_named(id="again"), ttl=60)
    redis.zadd(queue.started_job_registry.key, {"again:exec1": 1, "other:exec2": 1})
    queue.push_job_id("again")  # a stray earlier copy: the republish leaves one
    record = JobRecord(
        id="again", name="no.such.module.fn", system="rq", queue=name, args=[1],
        kwargs={"a": 2}, generation=2, options={"timeout": 30, "meta": {"tenant": "a"}},
    )  # fmt: skip
    integration.publish(record, reason=Republish.RESTART)
    job = Job.fetch("again", connection=redis)
    assert (job.func_name, job.args, job.kwargs, job.timeout) == (
        "no.such.module.fn", [1], {"a": 2}, 30
    )  # fmt: skip
    assert job.meta == {"tenant": "a", TRACKED: True}
    assert redis.hmget(job.key, *FIELDS) == [b"2", b"restart", None]
    assert queue.get_job_ids() == ["again"]
    assert "again" not in queue.failed_job_registry.get_job_ids()
    assert redis.zrange(queue.started_job_registry.key, 0, -1) == [b"other:exec2"]
    assert integration.ready_messages(name) == 1


def test_forget_runs_leaves_other_jobs_alone(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    _, _, redis, name = rq_env
    queue = PlainQueue(name, connection=redis)
    redis.zadd(queue.started_job_registry.key, {"a:1": 1, "ab:2": 1})
    with redis.pipeline() as pipe:
        forget_runs(queue, "a", pipe)
        pipe.execute()
    assert redis.zrange(queue.started_job_registry.key, 0, -1) == [b"ab:2"]


def test_staging_refuses_what_it_could_not_enqueue_the_same_way_later(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    integration = rq_env[0]
    with pytest.raises(StagingError, match="cannot be staged"):
        integration.stage("reports.build", [1], depends_on="other")
    with pytest.raises(StagingError, match="no importable function name"):
        integration.stage(lambda: None)


def test_a_misspelt_orphan_policy_fails_the_enqueue_before_anything_is_written(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    _, store, redis, name = rq_env
    queue = Queue(name, connection=redis)
    with pytest.raises(ConfigError, match=r"meta on_orphan: unknown orphan policy 'never'"):
        queue.enqueue("reports.build", 1, job_id="misspelt", meta={"on_orphan": "never"})
    assert store.get("misspelt") is None and queue.count == 0
    kept = queue.enqueue("reports.build", 2, meta={"on_orphan": "discard"})
    assert store.get(kept.id).options["on_orphan"] == "discard"  # type: ignore[union-attr]


def test_an_enqueue_the_ledger_did_not_take_is_marked_on_the_job(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    integration, _, redis, name = rq_env
    down = install(
        Redis.from_url(REDIS),
        integration.settings.replace(database_url="postgresql://127.0.0.1:1/none"),
    )
    try:
        job = Queue(name, connection=down.connection).enqueue("reports.build", 1)
        assert redis.hget(job.key, UNRECORDED) == b"1"
        assert down.runtime.counters.snapshot()["publish_unrecorded"] == 1
        assert Job.fetch(job.id, connection=redis).meta[TRACKED] is True
    finally:
        down.close()


def test_a_unique_enqueue_goes_out_once_while_its_job_is_unfinished(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    integration, store, redis, name = rq_env
    queue = Queue(name, connection=redis)
    first = queue.enqueue("reports.build", 1, unique_key="report:1", job_timeout=60)
    again = queue.enqueue("reports.build", 2, unique_key="report:1")
    staged = integration.stage("reports.build", [3], queue=name, unique_key="report:1")
    assert again.id == first.id == staged and queue.count == 1
    assert (list(again.args), again.timeout) == ([1], 60)  # the existing job, as RQ has it
    record = store.get(first.id)
    assert record is not None and (record.state, record.unique_key) == (S.QUEUED, "report:1")
    assert store.transition(first.id, Transition(to=S.CANCELLED, expect=frozenset({S.QUEUED})))
    third = queue.enqueue("reports.build", 4, unique_key="report:1")
    assert third.id != first.id and queue.count == 2
    with pytest.raises(StagingError, match="depends_on"):
        queue.enqueue("reports.build", 5, unique_key="report:2", depends_on=third)
    assert store.count(JobQuery()) == 2


def test_with_the_ledger_down_a_unique_enqueue_goes_out_without_the_key(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    """Who holds the key cannot be known: the job is enqueued (at least once beats never),
    marked unrecorded, its record written later without the key."""
    integration, _, redis, name = rq_env
    down = install(
        Redis.from_url(REDIS),
        integration.settings.replace(database_url="postgresql://127.0.0.1:1/none"),
    )
    try:
        queue = Queue(name, connection=down.connection)
        first = queue.enqueue("reports.build", 1, unique_key="report:1")
        again = queue.enqueue("reports.build", 2, unique_key="report:1")
        assert first.id != again.id and queue.count == 2
        assert redis.hget(first.key, UNRECORDED) == b"1"
    finally:
        down.close()


def test_a_warm_shutdown_ends_the_command_listener_that_took_the_unsubscribe_reply_first(
    rq_env: tuple[RQIntegration, MemoryStore, Redis, str],
) -> None:
    """RQ sets the listener's stop flag only after the unsubscribe: a listener that handles
    the reply first waits 60 s for a new subscription, and redis-py 8.2 joins it unbounded.
    Here the listener always handles it first; the worker still ends it at once."""
    _, _, redis, name = rq_env
    worker = SimpleWorker([name], connection=redis, name=f"{name}-w")
    worker.subscribe()
    pubsub, listener = worker.pubsub, worker.pubsub_thread
    assert pubsub is not None and listener is not None
    send = pubsub.unsubscribe

    def unsubscribe_and_let_the_listener_take_the_reply(*channels: str) -> None:
        send(*channels)
        wait_for("the listener to handle the reply", lambda: not pubsub.subscribed)

    pubsub.unsubscribe = unsubscribe_and_let_the_listener_take_the_reply  # type: ignore[method-assign]
    stopping = threading.Thread(target=worker.unsubscribe, daemon=True)
    stopping.start()
    stopping.join(timeout=20)  # RQ's own order took 60 s here, and left the listener running
    assert not stopping.is_alive()
    assert not listener.is_alive()
