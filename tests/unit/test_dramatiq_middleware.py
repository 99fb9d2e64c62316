"""The Dramatiq middleware in one process: a StubBroker, a real ``dramatiq.Worker`` with
several threads, and a SQLite ledger.

What each hook records (queued at send, started at the claim, the outcome after the body), the
claim guard between worker threads, Dramatiq's retries and dead letters, its time limit, and
the way back (publish by actor name, staging).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import dramatiq
import pytest
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries

from jobledger.config import Settings
from jobledger.errors import StoreUnavailable
from jobledger.integrations.base import registry
from jobledger.integrations.dramatiq import LedgerMiddleware, install
from jobledger.manager import Manager
from jobledger.model import JobState
from jobledger.staging import staging_in
from jobledger.stores.base import Transition
from jobledger.stores.sql import SQLStore
from jobledger.testing import wait_for
from ledgerdb import empty_sql_store

S = JobState
QUEUE = "q"


@dataclass
class Env:
    broker: StubBroker
    store: SQLStore
    middleware: LedgerMiddleware
    runs: list[str]  # message ids, one per body run

    def worker(self, threads: int = 4) -> Worker:
        worker = Worker(self.broker, worker_threads=threads, worker_timeout=50)
        worker.start()
        return worker

    def settle(self, worker: Worker) -> None:
        self.broker.join(QUEUE, timeout=20_000)
        worker.join()

    def run_all(self, threads: int = 4) -> None:
        """Start a worker, let it work the queue empty, stop it."""
        worker = self.worker(threads)
        try:
            self.settle(worker)
        finally:
            worker.stop()

    def work_until(self, what: str, done: Callable[[], object]) -> None:
        """Start a worker, wait until ``done`` holds, stop it."""
        worker = self.worker()
        try:
            wait_for(what, done)
        finally:
            worker.stop()

    def state(self, job_id: str) -> JobState:
        record = self.store.get(job_id)
        assert record is not None
        return record.state


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    made: list[tuple[Env, list[Worker]]] = []

    def make(**options: Any) -> Env:
        store = empty_sql_store(f"sqlite:///{tmp_path / 'ledger.db'}")
        settings = Settings(
            database_url=str(store.url),
            instance_name="unit",
            heartbeat_interval=0.5,
            recovery_interval=0.5,
            journal_dir=str(tmp_path / "journal"),
            relay=False,
        )
        broker = StubBroker()
        broker.emit_after("process_boot")
        middleware = install(broker, settings, store=store, store_factory=lambda: store, **options)
        runs: list[str] = []
        env = Env(broker, store, middleware, runs)
        _declare(env)
        made.append((env, []))
        return env

    yield make
    for env, _ in made:
        env.middleware.close()
        env.broker.close()
        env.store.close()


def _declare(env: Env) -> None:
    broker, runs = env.broker, env.runs
    lock = threading.Lock()

    def ran() -> str:
        from dramatiq.middleware import CurrentMessage

        message = CurrentMessage.get_current_message()
        assert message is not None
        with lock:
            runs.append(message.message_id)
        return str(message.message_id)

    from dramatiq.middleware import CurrentMessage

    broker.add_middleware(CurrentMessage())

    @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="work", tracked=True)
    def work(seconds: float = 0.0) -> None:
        ran()
        time.sleep(seconds)

    @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="plain", max_retries=0)
    def plain() -> None:
        ran()

    @dramatiq.actor(
        broker=broker, queue_name=QUEUE, actor_name="flaky", tracked=True, max_retries=2,
        min_backoff=1, max_backoff=5,
    )  # fmt: skip
    def flaky(failures: int) -> None:
        job_id = ran()
        if env.runs.count(job_id) <= failures:
            raise ValueError(f"failure {env.runs.count(job_id)}")

    @dramatiq.actor(
        broker=broker, queue_name=QUEUE, actor_name="slow", tracked=True, max_retries=0,
        time_limit=100,
    )  # fmt: skip
    def slow() -> None:
        ran()
        time.sleep(2)

    @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="stale", tracked=True, max_age=1)
    def stale() -> None:
        ran()

    @dramatiq.actor(
        broker=broker, queue_name=QUEUE, actor_name="interruptible", tracked=True,
        max_retries=0, notify_shutdown=True,
    )  # fmt: skip
    def interruptible() -> None:
        ran()
        time.sleep(10)


def test_a_tracked_message_is_recorded_claimed_and_finished(make_env: Callable[..., Env]) -> None:
    env = make_env()
    job_id = env.broker.get_actor("work").send().message_id
    record = env.store.get(job_id)
    assert record is not None and record.state is S.QUEUED and record.system == "dramatiq"
    assert record.name == "work" and record.queue == QUEUE
    plain = env.broker.get_actor("plain").send().message_id
    assert env.store.get(plain) is None  # not tracked
    worker = env.worker()
    try:
        env.settle(worker)
        record = env.store.get(job_id)
        assert record is not None and record.state is S.SUCCEEDED and record.attempts == 1
        assert record.owner is not None and record.owner.startswith("unit:")
        assert sorted(env.runs) == sorted([job_id, plain])
    finally:
        worker.stop()


def test_two_threads_given_the_same_message_run_it_once(make_env: Callable[..., Env]) -> None:
    env = make_env()
    message = env.broker.get_actor("work").message(0.5)
    env.broker.enqueue(message)
    env.broker.enqueue(message)  # a duplicate delivery, as a broker's redelivery
    env.run_all(threads=4)
    assert env.runs == [message.message_id]
    assert env.state(message.message_id) is S.SUCCEEDED
    assert env.middleware.runtime.counters.snapshot()["duplicates_skipped"] == 1


def test_a_delivery_of_a_succeeded_job_is_skipped(make_env: Callable[..., Env]) -> None:
    env = make_env()
    message = env.broker.get_actor("work").send()
    worker = env.worker()
    try:
        env.settle(worker)
        env.broker.enqueue(message)
        env.settle(worker)
    finally:
        worker.stop()
    assert env.runs == [message.message_id]


def test_a_stale_generation_is_skipped(make_env: Callable[..., Env]) -> None:
    env = make_env()
    message = env.broker.get_actor("work").send()
    env.store.transition(
        message.message_id, Transition(to=S.QUEUED, expect=frozenset({S.QUEUED}), generation=2)
    )  # republished since: the message sent carries generation 0
    env.run_all()
    assert env.runs == []
    assert env.state(message.message_id) is S.QUEUED
    assert env.middleware.runtime.counters.snapshot()["stale_deliveries_skipped"] == 1


def test_retries_are_retrying_and_the_last_try_finishes(make_env: Callable[..., Env]) -> None:
    env = make_env()
    job_id = env.broker.get_actor("flaky").send(2).message_id
    env.work_until("the third try to succeed", lambda: env.state(job_id) is S.SUCCEEDED)
    record = env.store.get(job_id)
    assert record is not None and record.attempts == 3 and env.runs.count(job_id) == 3


def test_exhausted_retries_dead_letter_the_message_and_fail_the_job(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    job_id = env.broker.get_actor("flaky").send(9).message_id
    env.work_until(
        "the job to fail and its message to be dead-lettered",
        lambda: env.state(job_id) is S.FAILED and env.broker.dead_letters,
    )
    record = env.store.get(job_id)
    assert record is not None and "ValueError: failure 3" in (record.error or "")
    assert env.runs.count(job_id) == 3


def test_the_time_limit_fails_the_job_and_says_so(make_env: Callable[..., Env]) -> None:
    env = make_env()
    job_id = env.broker.get_actor("slow").send().message_id
    env.work_until("the job to fail", lambda: env.state(job_id) is S.FAILED)
    record = env.store.get(job_id)
    assert record is not None and (record.error or "").startswith("time limit exceeded")


def test_a_shutdown_notification_fails_the_job_and_says_so(make_env: Callable[..., Env]) -> None:
    env = make_env()
    job_id = env.broker.get_actor("interruptible").send().message_id
    worker = env.worker()
    wait_for("the job to run", lambda: env.state(job_id) is S.STARTED)
    worker.stop()  # ShutdownNotifications interrupts it; the drain waits for its end
    record = env.store.get(job_id)
    assert record is not None and record.state is S.FAILED
    assert (record.error or "").startswith("interrupted by its worker's shutdown")
    assert env.store.instances(ttl=60) == []  # drained, then deregistered


def test_a_restart_publishes_by_actor_name_and_runs_again(make_env: Callable[..., Env]) -> None:
    env = make_env()
    job_id = env.broker.get_actor("flaky").send(3).message_id  # fails its 3 tries
    worker = env.worker()
    try:
        wait_for("the job to fail", lambda: env.state(job_id) is S.FAILED)
        # a supervisor without the actor's code: a bare broker with jobledger installed
        bare = StubBroker()
        install(bare, env.middleware.settings, store=env.store)
        bare.queues = env.broker.queues  # the same broker server, as two processes would see it
        report = Manager(env.store, settings=env.middleware.settings).restart([job_id])
        assert report.ok
        wait_for("the restart to succeed", lambda: env.state(job_id) is S.SUCCEEDED)
    finally:
        worker.stop()
        registry.register(env.middleware.publisher)
    record = env.store.get(job_id)
    assert record is not None and record.restarts == 1 and record.generation == 1
    assert env.runs.count(job_id) == 4


def test_a_staged_message_is_published_after_the_commit(make_env: Callable[..., Env]) -> None:
    env = make_env()
    with env.store.engine.begin() as conn:
        message = env.middleware.stage("work", (0.0,), using=conn)
        assert env.broker.queues[QUEUE].qsize() == 0  # not before the commit
    record = env.store.get(message.message_id)
    assert record is not None and record.state is S.QUEUED
    env.run_all()
    assert env.runs == [message.message_id]
    assert env.state(message.message_id) is S.SUCCEEDED


def test_a_rolled_back_stage_publishes_nothing(make_env: Callable[..., Env]) -> None:
    env = make_env()
    with pytest.raises(RuntimeError), env.store.engine.begin() as conn, staging_in(conn):
        message = env.middleware.stage("work")
        raise RuntimeError("rolled back")
    assert env.store.get(message.message_id) is None
    assert env.broker.queues[QUEUE].qsize() == 0


def test_an_untracked_actor_cannot_be_staged(make_env: Callable[..., Env]) -> None:
    from jobledger.errors import StagingError

    env = make_env()
    with pytest.raises(StagingError, match="not tracked"):
        env.middleware.stage("plain")


def test_a_unique_message_is_sent_once_while_its_job_is_unfinished(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    work = env.broker.get_actor("work")
    first = work.send_with_options(args=(0.0,), unique_key="sync:1")
    again = work.send_with_options(args=(0.5,), unique_key="sync:1", delay=1000)
    with env.store.engine.begin() as conn:  # staged in a transaction: the holder is seen there
        staged = env.middleware.stage("work", (0.0,), using=conn, unique_key="sync:1")
    assert again.message_id == staged.message_id == first.message_id
    assert again.args == (0.0,)  # the existing job's message, as the ledger records it
    assert env.broker.queues[QUEUE].qsize() == 1
    env.run_all()
    assert env.runs == [first.message_id] and env.state(first.message_id) is S.SUCCEEDED
    third = work.send_with_options(unique_key="sync:1")  # the success freed the key
    assert third.message_id != first.message_id
    env.run_all()
    assert env.runs == [first.message_id, third.message_id]
    record = env.store.get(third.message_id)
    assert record is not None and record.unique_key == "sync:1"


def test_a_middleware_after_retries_stops_the_worker(make_env: Callable[..., Env]) -> None:
    env = make_env()
    env.broker.middleware.remove(env.middleware)
    index = next(i for i, m in enumerate(env.broker.middleware) if isinstance(m, Retries))
    env.broker.middleware.insert(index + 1, env.middleware)
    with pytest.raises(SystemExit):
        env.worker()


def holding(env: Env) -> set[str]:
    """The job ids the worker's last heartbeat wrote it holds."""
    return {job_id for i in env.store.instances(ttl=60) for job_id, _ in i.holding}


def test_the_heartbeat_lists_what_waits_in_the_work_queue(make_env: Callable[..., Env]) -> None:
    env = make_env()
    worker = env.worker(threads=1)
    try:
        running = env.broker.get_actor("work").send(1.0).message_id
        waiting = env.broker.get_actor("work").send().message_id
        wait_for("one job to run", lambda: env.state(running) is S.STARTED)
        # Dramatiq 2 prefetches the other into the work queue; 1.17 keeps it in its consumer
        expected = {running, waiting} if dramatiq.__version__ >= "2" else {running}
        wait_for("both to be held", lambda: expected <= holding(env))
        env.settle(worker)
    finally:
        worker.stop()


def test_a_send_while_the_ledger_is_down_is_recorded_once_it_is_back(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    create = env.store.create
    calls: list[str] = []

    def down_once(record: Any) -> bool:
        calls.append(record.id)
        if len(calls) == 1:
            raise StoreUnavailable("the ledger is down")
        return create(record)

    with mock.patch.object(env.store, "create", side_effect=down_once):
        job_id = env.broker.get_actor("work").send().message_id  # the send goes through
        assert env.broker.queues[QUEUE].qsize() == 1
        wait_for("the record to be written", lambda: env.store.get(job_id) is not None)
    assert env.state(job_id) is S.QUEUED
    assert env.middleware.runtime.counters.snapshot()["publish_unrecorded"] == 1


def test_a_message_age_limit_skips_after_the_claim_is_failed(make_env: Callable[..., Env]) -> None:
    env = make_env()
    job_id = env.broker.get_actor("stale").send().message_id
    time.sleep(0.01)  # older than its max_age of 1 ms: AgeLimit fails and skips it
    env.work_until("the job to fail", lambda: env.state(job_id) is S.FAILED)
    assert env.runs == []
    record = env.store.get(job_id)
    assert record is not None and "AgeLimit" in (record.error or "")


def test_a_worker_that_cannot_beat_stops_fetching(make_env: Callable[..., Env]) -> None:
    env = make_env()
    worker = env.worker()
    try:
        heartbeat = env.middleware.runtime.heartbeat
        assert heartbeat is not None
        heartbeat.stop()  # the test says what the beats say
        env.middleware.consumption.want(False)  # as after failing past the TTL
        consumers = list(worker.consumers.values())
        wait_for("the consumers to pause", lambda: all(c.paused_event.is_set() for c in consumers))
        job_id = env.broker.get_actor("work").send().message_id
        assert env.broker.queues[QUEUE].qsize() == 1 and env.runs == []  # waits in the broker
        env.middleware.consumption.want(True)
        wait_for("the job to succeed", lambda: env.state(job_id) is S.SUCCEEDED)
    finally:
        worker.stop()
    counts = env.middleware.runtime.counters.snapshot()
    assert counts["consuming_stopped"] == counts["consuming_resumed"] == 1


def test_with_the_ledger_down_a_unique_message_is_sent_without_the_key(tmp_path: Path) -> None:
    """Who holds the key cannot be known: the message goes out (at least once beats never),
    its record written later, without the key."""
    down = SQLStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1)
    settings = Settings(instance_name="unit", journal_dir=str(tmp_path / "journal"), relay=False)
    broker = StubBroker()
    middleware = install(broker, settings, store=down, store_factory=lambda: down)
    try:

        @dramatiq.actor(broker=broker, queue_name=QUEUE, actor_name="once", tracked=True)
        def once() -> None:
            pass

        first = once.send_with_options(unique_key="k")
        again = once.send_with_options(unique_key="k")
        assert first.message_id != again.message_id
        assert broker.queues[QUEUE].qsize() == 2
        assert middleware.runtime.pending.holds(first.message_id)
    finally:
        middleware.close()
        broker.close()


def test_a_retry_the_broker_refused_fails_the_job(make_env: Callable[..., Env]) -> None:
    """Retries moved the job to retrying before its message existed; the broker then refused
    that message (Dramatiq logs it and goes on): the job is failed, not left retrying."""
    env = make_env()
    enqueue = env.broker.enqueue

    def refuse_retries(message: Any, *, delay: int | None = None) -> Any:
        if "retries" not in message.options:
            return enqueue(message, delay=delay)
        env.broker.emit_before("enqueue", message, delay)  # the hooks run, the send fails
        raise ConnectionError("the broker went away")

    with mock.patch.object(env.broker, "enqueue", side_effect=refuse_retries):
        job_id = env.broker.get_actor("flaky").send(1).message_id
        env.work_until("the job to fail", lambda: env.state(job_id) is S.FAILED)
    record = env.store.get(job_id)
    assert record is not None and "its retry could not be enqueued" in (record.error or "")
    assert env.runs == [job_id]
