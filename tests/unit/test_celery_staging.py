"""Staging Celery tasks, without a broker: ``apply_async`` options as a staged job record
(relative times made absolute in UTC, the queue chosen by the app's router as ``apply_async``
would, options that could not be sent later refused), signatures, and the integration's
``stage`` with a MemoryStore, publishing through Celery's in-memory transport or a recorder.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Celery, Task, chain, chord, group, signals
from kombu import Queue

from jobledger.config import Settings
from jobledger.errors import ConfigError, PublishError, StagingError
from jobledger.integrations.base import Published
from jobledger.integrations.celery import (
    TRACKED_HEADER,
    UNRECORDED_HEADER,
    CeleryIntegration,
    install,
)
from jobledger.integrations.celery_staging import STAGED_OPTIONS, signature_parts, staged_record
from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.stores.base import Transition
from jobledger.stores.sql import SQLStore
from jobledger.testing import MemoryStore

S = JobState
UTC = timezone.utc

# ``@app.task(queue=..., priority=...)`` is deprecated in Celery 5 but still honoured, by Celery
# and by staging.
pytestmark = pytest.mark.filterwarnings(r"ignore:\s+The '\w+' task attribute is deprecated")


def make_app(broker: str = "memory://") -> Celery:
    app = Celery("staging-unit", broker=broker, set_as_current=False)
    app.conf.update(task_default_queue="default-q", task_ignore_result=True)

    @app.task(name="t.plain", shared=False)
    def plain(a: int, b: int = 0) -> int:
        return a + b

    @app.task(name="t.mail", queue="mail", priority=3, expires=30, shared=False)
    def mail(to: str) -> str:
        return to

    @app.task(name="t.loose", typing=False, shared=False)
    def loose(a: int) -> int:
        return a

    @app.task(name="t.routed", shared=False)
    def routed(region: str) -> str:
        return region

    @app.task(name="t.after", shared=False)
    def after(n: int) -> int:
        return n

    return app


@pytest.fixture
def app() -> Celery:
    return make_app()


def record_of(
    app: Celery,
    task: Task | str,
    args: Sequence[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> JobRecord:
    return staged_record(app, task, args, kwargs, options)


def moment(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() == timedelta(0), f"{text} is not in UTC"
    return parsed


# -- the record -----------------------------------------------------------------------------------


def test_a_staged_record_carries_what_a_publish_needs(app: Celery) -> None:
    record = record_of(app, "t.plain", (1,), {"b": 2})
    assert (record.name, record.system, record.queue) == ("t.plain", "celery", "default-q")
    assert (record.args, record.kwargs, record.state) == ([1], {"b": 2}, S.STAGED)
    assert record.options == {}
    assert str(uuid.UUID(record.id)) == record.id
    assert record_of(app, "t.plain", [1]).id != record.id
    by_object = record_of(app, app.tasks["t.plain"], [1])
    assert by_object.name == "t.plain"


def test_task_id_is_honoured(app: Celery) -> None:
    assert record_of(app, "t.plain", [1], task_id="order-42").id == "order-42"


def test_countdown_becomes_an_absolute_utc_eta(app: Celery) -> None:
    before = datetime.now(UTC)
    record = record_of(app, "t.plain", [1], countdown=60)
    after = datetime.now(UTC)
    eta = moment(record.options["eta"])
    assert before + timedelta(seconds=60) <= eta <= after + timedelta(seconds=60)
    assert "countdown" not in record.options
    zero = moment(record_of(app, "t.plain", [1], countdown=0).options["eta"])
    assert before <= zero <= datetime.now(UTC)


@pytest.mark.parametrize(
    "eta",
    [
        datetime(2030, 1, 2, 12, 30),  # naive: UTC
        datetime(2030, 1, 2, 14, 30, tzinfo=timezone(timedelta(hours=2))),
        datetime(2030, 1, 2, 12, 30, tzinfo=UTC),
        "2030-01-02T12:30:00",
        "2030-01-02T07:30:00-05:00",
        "2030-01-02T12:30:00+00:00",
    ],
)
def test_eta_is_kept_in_utc(app: Celery, eta: Any) -> None:
    record = record_of(app, "t.plain", [1], eta=eta)
    assert record.options["eta"] == "2030-01-02T12:30:00+00:00"
    assert moment(record.options["eta"]) == datetime(2030, 1, 2, 12, 30, tzinfo=UTC)


def test_expires_in_seconds_becomes_an_absolute_time(app: Celery) -> None:
    before = datetime.now(UTC)
    record = record_of(app, "t.plain", [1], expires=120)
    after = datetime.now(UTC)
    expires = moment(record.options["expires"])
    assert before + timedelta(seconds=120) <= expires <= after + timedelta(seconds=120)
    fixed = datetime(2031, 5, 1, 8, 0, tzinfo=timezone(timedelta(hours=-4)))
    assert record_of(app, "t.plain", [1], expires=fixed).options["expires"] == (
        "2031-05-01T12:00:00+00:00"
    )
    text = record_of(app, "t.plain", [1], expires="2031-05-01T12:00:00")
    assert text.options["expires"] == "2031-05-01T12:00:00+00:00"


def test_the_task_defaults_apply_and_options_win(app: Celery) -> None:
    before = datetime.now(UTC)
    record = record_of(app, "t.mail", ["a@example.com"])
    assert record.queue == "mail"
    assert record.options["priority"] == 3
    expires = moment(record.options["expires"])  # the task's expires=30, from the call
    assert before + timedelta(seconds=30) <= expires <= datetime.now(UTC) + timedelta(seconds=30)
    mine = record_of(app, "t.mail", ["a@example.com"], priority=9, queue="urgent", expires=5)
    assert (mine.queue, mine.options["priority"]) == ("urgent", 9)
    assert moment(mine.options["expires"]) < expires


def test_priority_time_limits_and_route_are_kept(app: Celery) -> None:
    record = record_of(
        app,
        "t.plain",
        [1],
        priority=7,
        time_limit=60,
        soft_time_limit=50,
        exchange="jobs",
        routing_key="jobs.plain",
        add_to_parent=False,
    )
    assert record.options == {
        "priority": 7,
        "time_limit": 60,
        "soft_time_limit": 50,
        "exchange": "jobs",
        "routing_key": "jobs.plain",
    }
    json.dumps(record.options)  # what the ledger stores


def test_link_and_link_error_are_kept_as_plain_signatures(app: Celery) -> None:
    after = app.tasks["t.after"]
    one = after.s(2)
    record = record_of(app, "t.plain", [1], link=one, link_error=[after.s(3), after.si(4)])
    assert record.options["link"] == [dict(one)]
    assert [s["args"] for s in record.options["link_error"]] == [(3,), (4,)]
    assert all(type(s) is dict for s in record.options["link"] + record.options["link_error"])
    stored = json.loads(json.dumps(record.options))
    assert stored["link"][0]["task"] == "t.after" and stored["link"][0]["args"] == [2]
    assert stored["link_error"][1]["immutable"] is True


def celery_queue(app: Celery, name: str, args: list[Any], **options: Any) -> str:
    """The queue Celery's own ``apply_async`` sends this call to (in-memory transport)."""
    seen: list[tuple[Any, Any]] = []

    def capture(routing_key: Any = None, declare: Any = None, **_: Any) -> None:
        seen.append((routing_key, declare))

    signals.before_task_publish.connect(capture, weak=False)
    try:
        app.tasks[name].apply_async(args, **options)
    finally:
        signals.before_task_publish.disconnect(capture)
    routing_key, declare = seen[-1]
    names = [q.name for q in declare or () if getattr(q, "name", None)]
    return str(names[0] if names else routing_key)


def route_by_region(name: str, args: Any, kwargs: Any, options: Any, **_: Any) -> Any:
    if name == "t.routed" and args and args[0] == "eu":
        return {"queue": "eu-q"}
    return None


@pytest.mark.parametrize(
    ("name", "args", "options", "expected"),
    [
        ("t.plain", [1], {}, "default-q"),
        ("t.plain", [1], {"queue": "reports"}, "reports"),
        ("t.plain", [1], {"queue": Queue("as-object")}, "as-object"),
        ("t.mail", ["x"], {}, "mail"),
        ("t.routed", ["us"], {}, "routed-q"),
        ("t.routed", ["eu"], {}, "eu-q"),
        ("t.routed", ["us"], {"queue": "explicit"}, "explicit"),
    ],
)
def test_the_queue_is_the_one_apply_async_would_choose(
    app: Celery, name: str, args: list[Any], options: dict[str, Any], expected: str
) -> None:
    app.conf.task_routes = [route_by_region, {"t.routed": {"queue": "routed-q"}}]
    assert record_of(app, name, args, **options).queue == expected
    assert celery_queue(app, name, args, **options) == expected


def test_a_queue_the_app_does_not_know_is_refused(app: Celery) -> None:
    app.conf.task_create_missing_queues = False
    app.conf.task_queues = [Queue("default-q"), Queue("mail")]
    assert record_of(app, "t.plain", [1], queue="mail").queue == "mail"
    with pytest.raises(StagingError, match="nowhere"):
        record_of(app, "t.plain", [1], queue="nowhere")


def test_an_unknown_task_is_refused(app: Celery) -> None:
    with pytest.raises(StagingError, match=r"t\.missing"):
        record_of(app, "t.missing", [1])
    other = make_app()

    @other.task(name="t.only-elsewhere", shared=False)
    def elsewhere() -> None:
        pass

    with pytest.raises(StagingError, match=r"t\.only-elsewhere"):
        record_of(app, other.tasks["t.only-elsewhere"], [])


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [([], {}), ([1, 2, 3], {}), ([1], {"c": 3}), ([1], {"a": 1})],
)
def test_wrong_arguments_are_refused(app: Celery, args: list[Any], kwargs: dict[str, Any]) -> None:
    with pytest.raises(StagingError, match=r"t\.plain called with wrong arguments"):
        record_of(app, "t.plain", args, kwargs)


def test_a_task_without_typing_takes_any_arguments(app: Celery) -> None:
    assert record_of(app, "t.loose", [1, 2, 3], {"x": 1}).args == [1, 2, 3]


def test_a_class_based_task_can_be_staged() -> None:
    """Old-style tasks registered with ``app.register_task`` have no ``__header__`` for the
    argument check; ``apply_async`` skips the check for them, and staging must not crash."""
    app = make_app()

    class Report(Task):  # type: ignore[misc]
        name = "t.class-based"
        typing = True

        def run(self, month: int) -> int:
            return month

    app.register_task(Report())
    record = record_of(app, "t.class-based", [11])
    assert (record.name, record.args, record.queue) == ("t.class-based", [11], "default-q")


@pytest.mark.parametrize(
    "option",
    [
        "headers",
        "serializer",
        "compression",
        "retry",
        "retry_policy",
        "shadow",
        "reply_to",
        "ignore_result",
        "chain",
        "chord",
        "group_id",
        "no_such_option",
    ],
)
def test_an_option_that_cannot_be_staged_is_refused_by_name(app: Celery, option: str) -> None:
    assert option not in STAGED_OPTIONS
    with pytest.raises(StagingError, match=option):
        record_of(app, "t.plain", [1], **{option: {"x": 1} if option == "headers" else "x"})


def test_options_left_none_are_ignored(app: Celery) -> None:
    record = record_of(app, "t.plain", [1], headers=None, countdown=None, eta=None, queue=None)
    assert (record.options, record.queue) == ({}, "default-q")


@pytest.mark.parametrize(
    "options",
    [
        {"countdown": -1},
        {"countdown": "60"},
        {"countdown": True},
        {"expires": -5},
        {"eta": 1700000000},
        {"eta": "next tuesday"},
        {"expires": "soon"},
    ],
)
def test_bad_times_are_refused(app: Celery, options: dict[str, Any]) -> None:
    with pytest.raises(StagingError, match=next(iter(options))):
        record_of(app, "t.plain", [1], **options)


# -- signatures -----------------------------------------------------------------------------------


def test_signature_parts_of_a_task_signature(app: Celery) -> None:
    plain = app.tasks["t.plain"]
    signature = plain.s(1, b=2).set(countdown=5, queue="reports")
    assert signature_parts(signature) == (
        "t.plain",
        [1],
        {"b": 2},
        {"countdown": 5, "queue": "reports"},
    )
    assert signature_parts(plain.si(7)) == ("t.plain", [7], {}, {})
    assert signature_parts(dict(plain.s(3))) == ("t.plain", [3], {}, {})


def test_a_canvas_is_refused(app: Celery) -> None:
    plain, after = app.tasks["t.plain"], app.tasks["t.after"]
    for canvas, kind in [
        (chain(plain.s(1), after.s()), "chain"),
        (group(plain.s(1), plain.s(2)), "group"),
        (chord([plain.s(1), plain.s(2)], after.s()), "chord"),
    ]:
        with pytest.raises(StagingError, match=kind):
            signature_parts(canvas)
    with pytest.raises(StagingError):
        signature_parts("t.plain")  # type: ignore[arg-type]


# -- the integration ------------------------------------------------------------------------------


@dataclass
class Recorder:
    """A batch publisher standing in for the broker."""

    take: bool = True
    batches: list[list[JobRecord]] = field(default_factory=list)

    def __call__(self, records: Sequence[JobRecord]) -> Published:
        self.batches.append(list(records))
        if not self.take:
            return Published(error=PublishError("broker down"))
        return Published(ids=[r.id for r in records])


@dataclass
class Env:
    app: Celery
    store: MemoryStore
    integration: CeleryIntegration
    sent: list[dict[str, Any]]

    def task(self, name: str) -> Any:
        return self.app.tasks[name]


@pytest.fixture
def make_env() -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def capture(headers: Any = None, body: Any = None, routing_key: Any = None, **_: Any) -> None:
        for env in made:
            env.sent.append({"headers": dict(headers or {}), "body": body, "queue": routing_key})

    signals.before_task_publish.connect(capture, weak=False)

    def make(broker: str = "memory://") -> Env:
        app = make_app(broker)

        @app.task(name="t.tracked", tracked=True, shared=False)
        def tracked(n: int) -> int:
            return n

        store = MemoryStore()
        integration = install(app, store=store, settings=Settings())
        app.finalize()
        made.append(Env(app, store, integration, []))
        return made[-1]

    yield make
    signals.before_task_publish.disconnect(capture)
    for env in made:
        env.integration.close()


def test_tracked_tasks_get_stage_and_apply_staged(make_env: Callable[..., Env]) -> None:
    env = make_env()
    tracked = env.task("t.tracked")
    assert callable(tracked.stage) and callable(tracked.apply_staged)
    with pytest.raises(StagingError, match="not tracked"):  # no worker would claim its job
        env.task("t.plain").stage(1)
    assert env.store.count(JobQuery()) == 0
    assert env.integration.outbox.publish == env.integration.publish_many


def test_stage_publishes_at_once_through_publish_many(make_env: Callable[..., Env]) -> None:
    env = make_env()
    recorder = Recorder()
    env.integration.outbox.publish = recorder
    result = env.task("t.tracked").stage(5)
    assert [[r.id for r in batch] for batch in recorder.batches] == [[result.id]]
    handed = recorder.batches[0][0]
    assert (handed.name, handed.args, handed.queue, handed.state) == (
        "t.tracked",
        [5],
        "default-q",
        S.STAGED,
    )
    record = env.store.get(result.id)
    assert record is not None and record.state is S.QUEUED
    assert env.integration.outbox.counters["published"] == 1


def test_stage_sends_the_message_through_the_in_memory_broker(make_env: Callable[..., Env]) -> None:
    env = make_env()
    result = env.task("t.tracked").apply_staged((5,), countdown=60, task_id="job-77")
    assert result.id == "job-77"
    assert len(env.sent) == 1
    message = env.sent[0]
    assert message["headers"]["id"] == "job-77" and message["headers"]["task"] == "t.tracked"
    assert message["headers"][TRACKED_HEADER] is True
    assert message["queue"] == "default-q"
    record = env.store.get("job-77")
    assert record is not None
    assert moment(message["headers"]["eta"]) == moment(record.options["eta"])
    assert record.state is S.QUEUED and record.first_queued_at is not None
    # The publish hook saw a job the ledger has: it recorded nothing more.
    assert env.store.count(JobQuery()) == 1


def test_stage_keeps_callbacks_on_the_message(make_env: Callable[..., Env]) -> None:
    env = make_env()
    env.task("t.tracked").apply_staged((1,), link=env.task("t.after").s(2))
    callbacks = json.loads(json.dumps(env.sent[-1]["body"][2]["callbacks"]))
    assert callbacks[0]["task"] == "t.after" and callbacks[0]["args"] == [2]


def test_stage_signature(make_env: Callable[..., Env]) -> None:
    env = make_env()
    recorder = Recorder()
    env.integration.outbox.publish = recorder
    result = env.integration.stage_signature(env.task("t.tracked").s(3).set(queue="reports"))
    record = env.store.get(result.id)
    assert record is not None
    assert (record.args, record.queue, record.state) == ([3], "reports", S.QUEUED)
    with pytest.raises(StagingError, match="chain"):
        env.integration.stage_signature(chain(env.task("t.tracked").s(1), env.task("t.after").s()))
    assert env.store.count(JobQuery()) == 1


def test_a_refused_stage_writes_nothing(make_env: Callable[..., Env]) -> None:
    env = make_env()
    recorder = Recorder()
    env.integration.outbox.publish = recorder
    with pytest.raises(StagingError):
        env.integration.stage("t.missing", [1])
    with pytest.raises(StagingError):
        env.task("t.tracked").apply_staged((1,), headers={"x": 1})
    with pytest.raises(StagingError):
        env.task("t.tracked").stage(1, 2, 3)
    assert env.store.count(JobQuery()) == 0 and recorder.batches == []


def test_with_the_broker_down_the_job_stays_staged_for_the_relay(
    make_env: Callable[..., Env],
) -> None:
    env = make_env("redis://127.0.0.1:1/0")  # nothing listens there
    result = env.task("t.tracked").stage(1)
    record = env.store.get(result.id)
    assert record is not None and record.state is S.STAGED
    assert env.integration.outbox.counters["left_to_relay"] == 1
    done = env.integration.publish_many([record])
    assert done.ids == [] and isinstance(done.error, PublishError)
    assert "127.0.0.1:1" in str(done.error) or "refused" in str(done.error).lower()


def test_a_unique_publish_goes_out_once_while_its_job_is_unfinished(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    tracked = env.task("t.tracked")
    first = tracked.apply_async((1,), unique_key="order:7")
    again = tracked.apply_async((2,), unique_key="order:7", countdown=5)
    assert again.id == first.id and len(env.sent) == 1  # the existing job's handle, no message
    other = tracked.apply_async((3,), unique_key="order:8")
    staged = tracked.apply_staged((4,), unique_key="order:7")
    assert other.id != first.id and staged.id == first.id and len(env.sent) == 2
    record = env.store.get(first.id)
    assert record is not None and (record.state, record.args) == (S.QUEUED, [1])
    assert record.unique_key == "order:7"
    assert env.integration.outbox.counters["unique_held"] == 2
    ended = Transition(to=S.CANCELLED, expect=frozenset({S.QUEUED}))
    assert env.store.transition(first.id, ended)
    third = tracked.apply_async((5,), unique_key="order:7")
    assert third.id != first.id and len(env.sent) == 3


def test_a_unique_publish_needs_a_tracked_task_and_options_a_staged_job_keeps(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    with pytest.raises(StagingError, match="not tracked"):  # nothing would ever free the key
        env.task("t.plain").apply_async((1,), unique_key="k")
    with pytest.raises(StagingError, match="headers"):
        env.task("t.tracked").apply_async((1,), unique_key="k", headers={"x": 1})
    with pytest.raises(StagingError, match="by keyword"):
        env.task("t.tracked").apply_async((1,), None, "job-1", unique_key="k")
    with pytest.raises(ConfigError, match="unique key"):
        env.task("t.tracked").apply_async((1,), unique_key="k" * 256)
    assert env.store.count(JobQuery()) == 0 and env.sent == []


def test_with_the_ledger_down_a_unique_publish_goes_out_unrecorded() -> None:
    """Who holds the key cannot be known: the job is published (at least once beats never)
    and says it is unrecorded, so its record is written later, without the key."""
    app = make_app()

    @app.task(name="t.tracked", tracked=True, shared=False)
    def tracked(n: int) -> int:
        return n

    store = SQLStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1)
    integration = install(app, store=store, settings=Settings())
    sent: list[dict[str, Any]] = []

    def capture(headers: Any = None, **_: Any) -> None:
        sent.append(dict(headers or {}))

    signals.before_task_publish.connect(capture, weak=False)
    try:
        result = tracked.apply_async((1,), unique_key="k", task_id="job-1")
        assert integration.pending.holds("job-1")  # its record, written once the ledger is back
    finally:
        signals.before_task_publish.disconnect(capture)
        integration.close()
    assert result.id == "job-1"
    assert [h["id"] for h in sent] == ["job-1"] and sent[0][UNRECORDED_HEADER] is True


def test_publish_many_sends_in_order_through_one_connection(make_env: Callable[..., Env]) -> None:
    env = make_env()
    records = [
        JobRecord(id=f"job-{n}", name="t.tracked", system="celery", queue="q", args=[n])
        for n in range(3)
    ]
    done = env.integration.publish_many(records)
    assert (done.ids, done.error) == (["job-0", "job-1", "job-2"], None)
    assert [m["headers"]["id"] for m in env.sent] == done.ids
    assert env.store.count(JobQuery()) == 0  # republishes of jobs the ledger has: no records


def test_stage_works_before_the_app_is_finalized_and_for_tasks_made_after() -> None:
    """A web process uses its tasks without finalizing the app (nothing calls
    ``app.finalize()`` there), and a task may be declared after ``install``: both stage."""
    app = make_app("memory://")
    store = MemoryStore()
    integration = install(app, store=store, settings=Settings())
    try:
        integration.outbox.publish = Recorder()

        @app.task(name="t.early", tracked=True, shared=False)
        def early(n: int) -> int:
            return n

        assert not app.finalized
        first = early.stage(1)
        app.finalize()

        @app.task(name="t.late", tracked=True, shared=False)
        def late(n: int) -> int:
            return n

        second = late.apply_staged((2,), countdown=5)
        assert [store.get(r.id).name for r in (first, second)] == ["t.early", "t.late"]
    finally:
        integration.close()


def test_stage_on_an_app_without_jobledger_says_how_to_install_it() -> None:
    """Once jobledger is installed on one app of the process, every task has ``stage``; a task
    of another app says what is missing instead of staging where no worker tracks it."""
    install(make_app("memory://"), store=MemoryStore(), settings=Settings()).close()
    app = make_app("memory://")

    @app.task(name="t.bare", shared=False)
    def bare(n: int) -> int:
        return n

    with pytest.raises(StagingError, match="not installed"):
        bare.stage(1)


def test_arguments_the_ledger_cannot_keep_are_refused_at_the_call() -> None:
    with pytest.raises(StagingError, match="JSON-serializable"):
        staged_record(make_app(), "t.plain", [datetime.now(timezone.utc)], {}, {})


def test_publish_many_tells_a_refused_message_from_an_outage() -> None:
    """A queue that is gone refuses that one message (the relay fails it and goes on); a broker
    that cannot be reached stops the batch (the relay backs off and tries again)."""
    app = make_app("redis://127.0.0.1:6379/13")  # kombu's Redis transport counts KeyError
    app.conf.task_create_missing_queues = False  # (QueueNotFound) among connection errors
    integration = install(app, store=MemoryStore(), settings=Settings())
    try:
        gone = JobRecord(id="gone", name="t.plain", system="celery", queue="gone", args=[1])
        fine = JobRecord(id="fine", name="t.plain", system="celery", queue="default-q", args=[1])
        done = integration.publish_many([gone, fine])
        assert done.ids == ["fine"] and done.error is None
        assert list(done.refused) == ["gone"] and "gone" in done.refused["gone"]
    finally:
        integration.close()
        redis.Redis.from_url("redis://127.0.0.1:6379/13").delete("default-q")
    down = make_app("redis://127.0.0.1:1/0")
    integration = install(down, store=MemoryStore(), settings=Settings())
    try:
        done = integration.publish_many([fine, gone])
        assert done.ids == [] and not done.refused
        assert isinstance(done.error, PublishError)
    finally:
        integration.close()


def test_a_message_that_makes_rabbitmq_close_the_channel_is_refused_alone() -> None:
    """RabbitMQ answers a message to an exchange that does not exist by closing the channel,
    later, and drops what follows on it silently: without the batch's closing round trip the
    jobs after it would be marked queued with no message anywhere."""
    app = make_app("amqp://guest:guest@127.0.0.1:5672//")
    queue = f"jl-refuse-{uuid.uuid4().hex[:8]}"
    app.conf.task_default_queue = queue
    integration = install(app, store=MemoryStore(), settings=Settings())

    def record(n: int, **options: Any) -> JobRecord:
        return JobRecord(
            id=f"job-{n}", name="t.plain", system="celery", queue=queue, args=[n], options=options
        )

    bad = record(0, exchange="jl-no-such-exchange", routing_key=queue)
    try:
        done = integration.publish_many([bad, record(1), record(2)])
        assert done.error is None and done.ids == ["job-1", "job-2"]
        assert list(done.refused) == ["job-0"] and "NOT_FOUND" in done.refused["job-0"]
        assert integration.publish_many([record(3)]).ids == ["job-3"]  # the channel revived
        with app.connection_for_write() as conn:
            channel = conn.channel()
            waiting = channel.queue_declare(queue, passive=True).message_count
            channel.queue_delete(queue)
        assert waiting == 3  # job-1, job-2 and job-3; nothing lost
    finally:
        integration.close()
