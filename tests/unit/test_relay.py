"""The relay on a MemoryStore with a manual clock: passes over the backlog in batches, the grace
it leaves the fast path, the systems it publishes for, and the loop's backoff while the broker
is down (its random jitter and its clock injected); and the settings that drive it.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from jobledger.config import (
    DEFAULT_RELAY_BATCH_SIZE,
    DEFAULT_RELAY_GRACE,
    DEFAULT_RELAY_INTERVAL,
    DEFAULT_RELAY_MAX_BACKOFF,
    Settings,
)
from jobledger.errors import ConfigError, PublishError, StoreUnavailable
from jobledger.integrations.base import Published
from jobledger.model import JobRecord, JobState, to_datetime
from jobledger.relay import BACKLOG_LOG_INTERVAL, Relay, RelayLoop, RelayReport
from jobledger.testing import ManualClock, MemoryStore, wait_for

S = JobState


@dataclass
class Broker:
    """Records each batch; refuses the jobs in ``refuse`` (and stops there), or everything
    while ``down``."""

    refuse: set[str] = field(default_factory=set)
    down: bool = False
    batches: list[list[str]] = field(default_factory=list)
    #: jobs whose message the queue system refuses itself (MessageRefused): the batch goes on
    poison: set[str] = field(default_factory=set)

    def __call__(self, records: Sequence[JobRecord]) -> Published:
        self.batches.append([r.id for r in records])
        done = Published()
        for record in records:
            if record.id in self.poison:
                done.refused[record.id] = "Queue 'gone' missing from task_queues"
                continue
            if self.down or record.id in self.refuse:
                done.error = PublishError(f"broker refused {record.id}")
                break
            done.ids.append(record.id)
        return done

    @property
    def published(self) -> list[str]:
        return [job_id for batch in self.batches for job_id in batch]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def broker() -> Broker:
    return Broker()


def stage(
    store: MemoryStore, count: int, *, prefix: str = "job", age: float = 60, **fields: Any
) -> list[str]:
    """``count`` committed staged jobs, the first the oldest, the last ``age`` seconds old."""
    fields.setdefault("system", "celery")
    now = store.now()
    ids = [f"{prefix}-{n:03d}" for n in range(count)]
    for n, job_id in enumerate(ids):
        moment = to_datetime(now - age - (count - n))
        assert store.create(
            JobRecord(id=job_id, name="t", state=S.STAGED, staged_at=moment, **fields)
        )
    return ids


def states(store: MemoryStore, ids: Sequence[str]) -> list[JobState]:
    found = [store.get(job_id) for job_id in ids]
    return [r.state for r in found if r is not None]


def relay_of(store: MemoryStore, broker: Broker, **options: Any) -> Relay:
    options.setdefault("grace", 5.0)
    options.setdefault("batch_size", 10)
    return Relay(store, publish=broker, **options)


# -- one pass --------------------------------------------------------------------------------------


def test_a_pass_drains_the_backlog_in_batches_oldest_first(
    store: MemoryStore, broker: Broker
) -> None:
    ids = stage(store, 25)
    report = relay_of(store, broker).run_once()
    assert report == RelayReport(published=25, batches=3, error=None)
    assert broker.batches == [ids[:10], ids[10:20], ids[20:]]
    assert set(states(store, ids)) == {S.QUEUED}
    assert relay_of(store, broker).run_once() == RelayReport()  # nothing left


def test_a_backlog_of_exactly_the_batch_size_ends_with_an_empty_look(
    store: MemoryStore, broker: Broker
) -> None:
    ids = stage(store, 20)
    assert relay_of(store, broker).run_once() == RelayReport(published=20, batches=2)
    assert broker.batches == [ids[:10], ids[10:]]


def test_a_batch_cut_short_at_half_its_lease_leaves_the_rest_to_the_same_pass(
    store: MemoryStore, clock: ManualClock
) -> None:
    """A slow broker: each slice of a batch takes 0.6 of the lease, so a batch stops after
    two slices (past half its lease another relay may take its jobs); the pass goes on with
    the rest instead of ending as if the backlog were empty."""
    ids = stage(store, 250)
    published: list[str] = []

    def slow(records: Sequence[JobRecord]) -> Published:
        clock.advance(0.6)
        published.extend(r.id for r in records)
        return Published(ids=[r.id for r in records])

    relay = Relay(store, publish=slow, grace=5.0, batch_size=1000, lease=2.0, clock=clock)
    report = relay.run_once()
    assert report.published == 250 and report.batches == 2
    assert published == ids  # each once, oldest first
    assert set(states(store, ids)) == {S.QUEUED}


def test_a_pass_stops_at_a_refusal_and_marks_only_what_went(
    store: MemoryStore, broker: Broker
) -> None:
    ids = stage(store, 25)
    broker.refuse = {ids[13]}
    report = relay_of(store, broker).run_once()
    assert (report.published, report.batches) == (13, 2)
    assert isinstance(report.error, PublishError) and ids[13] in str(report.error)
    assert broker.batches == [ids[:10], ids[10:20]]  # no third batch after the refusal
    assert states(store, ids) == [S.QUEUED] * 13 + [S.STAGED] * 12
    # The broker is back: the next pass starts with the refused job.
    broker.refuse.clear()
    assert relay_of(store, broker).run_once() == RelayReport(published=12, batches=2)
    assert broker.batches[2][0] == ids[13]
    assert set(states(store, ids)) == {S.QUEUED}


def test_a_job_whose_message_is_refused_fails_and_the_backlog_behind_it_goes(
    store: MemoryStore, broker: Broker
) -> None:
    """A message the queue system refuses every time (its queue is gone) must not head every
    batch for ever: it fails, with the reason, and the jobs behind it are published."""
    ids = stage(store, 25)
    broker.poison = {ids[0], ids[12]}
    report = relay_of(store, broker).run_once()
    assert (report.published, report.refused, report.error) == (23, 2, None)
    assert states(store, ids).count(S.FAILED) == 2
    assert states(store, ids).count(S.QUEUED) == 23
    failed = store.get(ids[0])
    assert failed is not None and "Queue 'gone' missing" in (failed.error or "")
    assert relay_of(store, broker).run_once() == RelayReport()  # nothing left to try


def test_max_batches_bounds_a_pass(store: MemoryStore, broker: Broker) -> None:
    ids = stage(store, 25)
    assert relay_of(store, broker).run_once(max_batches=1) == RelayReport(published=10, batches=1)
    assert states(store, ids) == [S.QUEUED] * 10 + [S.STAGED] * 15


def test_a_pass_publishes_only_its_systems(store: MemoryStore, broker: Broker) -> None:
    celery = stage(store, 3, prefix="celery")
    rq = stage(store, 3, prefix="rq", system="rq")
    assert relay_of(store, broker, systems={"celery"}).run_once().published == 3
    assert broker.published == celery
    assert set(states(store, rq)) == {S.STAGED}
    assert relay_of(store, broker, systems=["rq", "dramatiq"]).run_once().published == 3
    assert set(states(store, rq)) == {S.QUEUED}


def test_a_pass_leaves_jobs_younger_than_the_grace_to_the_fast_path(
    store: MemoryStore, broker: Broker, clock: ManualClock
) -> None:
    fresh = stage(store, 2, prefix="fresh", age=0)  # 2 s and 1 s old
    relay = relay_of(store, broker, grace=5.0)
    clock.advance(2.75)  # 4.75 s and 3.75 s old
    assert relay.run_once() == RelayReport()
    assert broker.batches == []
    clock.advance(0.25)  # the oldest is exactly the grace old: its turn
    assert relay.run_once() == RelayReport(published=1, batches=1)
    clock.advance(0.75)
    assert relay.run_once() == RelayReport()
    clock.advance(0.25)
    assert relay.run_once() == RelayReport(published=1, batches=1)
    assert broker.published == fresh


def test_backlog_counts_every_staged_job(store: MemoryStore, broker: Broker) -> None:
    stage(store, 3)
    stage(store, 2, prefix="rq", system="rq", age=0)
    assert store.create(JobRecord(id="queued", name="t"))
    relay = relay_of(store, broker, systems={"celery"})
    assert relay.backlog() == 5
    relay.run_once()
    assert relay.backlog() == 2


class FlakyStore(MemoryStore):
    """A ledger whose next ``failures`` batches fail as an unreachable database would."""

    def __init__(self, clock: ManualClock, failures: int) -> None:
        super().__init__(clock=clock)
        self.failures = failures

    def staged_batch(self, **options: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the ledger database is unavailable: connection refused")
        return super().staged_batch(**options)


def test_a_ledger_error_propagates_and_leaves_the_jobs_staged(
    clock: ManualClock, broker: Broker
) -> None:
    store = FlakyStore(clock, failures=1)
    ids = stage(store, 3)
    with pytest.raises(StoreUnavailable):
        relay_of(store, broker).run_once()
    assert set(states(store, ids)) == {S.STAGED} and broker.batches == []
    assert relay_of(store, broker).run_once().published == 3


def test_from_settings(store: MemoryStore, broker: Broker) -> None:
    settings = Settings(relay_grace=1.5, relay_batch_size=7)
    relay = Relay.from_settings(store, settings, publish=broker, systems=["celery"])
    assert (relay.grace, relay.batch_size, relay.systems) == (1.5, 7, frozenset({"celery"}))
    assert Relay.from_settings(store, Settings(), publish=broker).systems is None


# -- the loop --------------------------------------------------------------------------------------


def loop_of(relay: Relay, clock: ManualClock, rng: Any = lambda: 1.0, **options: Any) -> RelayLoop:
    options.setdefault("interval", 1.0)
    options.setdefault("max_backoff", 30.0)
    return RelayLoop(relay, rng=rng, clock=clock, **options)


def test_backoff_doubles_up_to_the_max_and_resets_after_a_success(
    store: MemoryStore, broker: Broker, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    stage(store, 3)
    loop = loop_of(relay_of(store, broker), clock)
    assert loop.delay() == 1.0
    broker.down = True
    delays = []
    for _ in range(7):
        report = loop.step()
        assert report is not None and report.error is not None
        delays.append(loop.delay())
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert loop.failures == 7
    broker.down = False
    with caplog.at_level(logging.WARNING, logger="jobledger.relay"):
        report = loop.step()
    assert report is not None and (report.published, report.error) == (3, None)
    assert (loop.failures, loop.delay()) == (0, 1.0)
    assert any("resumed" in r.getMessage() for r in caplog.records)


def test_backoff_jitter_stays_between_the_interval_and_the_limit(
    store: MemoryStore, broker: Broker, clock: ManualClock
) -> None:
    stage(store, 1)
    broker.down = True
    rng = random.Random(7)
    loop = loop_of(relay_of(store, broker), clock, rng=rng.random, interval=0.5, max_backoff=20)
    delays = []
    for failures in range(1, 40):
        loop.step()
        limit = min(20.0, 0.5 * 2**failures)
        assert loop.backoff_limit() == limit
        delay = loop.delay()
        assert 0.5 <= delay <= limit <= 20.0, (failures, delay)
        delays.append(delay)
    assert len(set(delays)) > 30, "no jitter: every worker would retry at the same moment"
    assert max(delays) > 10  # and it does grow
    # The smallest draw still waits the interval.
    zero = loop_of(relay_of(store, broker), clock, rng=lambda: 0.0)
    zero.step()
    assert (zero.failures, zero.delay()) == (1, 1.0)


def test_the_backlog_is_logged_at_most_every_interval(
    store: MemoryStore, broker: Broker, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    stage(store, 4)
    broker.down = True
    loop = loop_of(relay_of(store, broker), clock)

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]

    with caplog.at_level(logging.ERROR, logger="jobledger.relay"):
        loop.step()
        assert len(logged()) == 1
        assert re.search(r"\b4 staged jobs wait\b", logged()[0]), logged()
        assert "broker refused job-000" in logged()[0]
        for _ in range(5):
            clock.advance(BACKLOG_LOG_INTERVAL / 6)
            loop.step()
        assert len(logged()) == 1  # 5/6 of the interval later: not again
        clock.advance(BACKLOG_LOG_INTERVAL / 6)
        stage(store, 1, prefix="more")
        loop.step()
        assert len(logged()) == 2
        assert re.search(r"\b5 staged jobs wait\b", logged()[1]), logged()
        broker.down = False
        loop.step()  # resumed: the next outage logs at once
        broker.down = True
        stage(store, 1, prefix="later")
        loop.step()
        assert len(logged()) == 3


def test_a_disabled_loop_does_nothing(
    store: MemoryStore, broker: Broker, clock: ManualClock
) -> None:
    ids = stage(store, 3)
    enabled = False
    loop = loop_of(relay_of(store, broker), clock, enabled=lambda: enabled)
    assert loop.step() is None
    assert broker.batches == [] and set(states(store, ids)) == {S.STAGED}
    assert (loop.failures, loop.delay()) == (0, 1.0)
    enabled = True
    report = loop.step()
    assert report is not None and report.published == 3


@pytest.fixture
def running() -> Iterator[list[RelayLoop]]:
    loops: list[RelayLoop] = []
    yield loops
    for loop in loops:
        loop.stop()


def test_the_loop_thread_relays_and_survives_ledger_errors(
    clock: ManualClock, broker: Broker, running: list[RelayLoop]
) -> None:
    store = FlakyStore(clock, failures=2)
    ids = stage(store, 12)
    errors: list[int] = []
    loop = RelayLoop(
        relay_of(store, broker),
        interval=0.02,
        max_backoff=0.05,
        on_error=lambda: errors.append(1),
    )
    running.append(loop)
    loop.start()
    wait_for(
        "the relay thread to publish the backlog", lambda: set(states(store, ids)) == {S.QUEUED}
    )
    assert len(errors) == 2 and loop.running
    assert sorted(broker.published) == ids
    loop.stop()
    assert not loop.running


def test_a_held_batch_is_released_when_the_publisher_crashes(
    store: MemoryStore, clock: ManualClock
) -> None:
    ids = stage(store, 2)

    def crash(records: Sequence[JobRecord]) -> Published:
        raise RuntimeError("a bug in the integration")

    with pytest.raises(RuntimeError):
        Relay(store, publish=crash, grace=0, batch_size=10).run_once()
    with store.staged_batch(limit=10) as batch:
        assert [r.id for r in batch.records] == ids


# -- settings --------------------------------------------------------------------------------------


def test_relay_settings_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.relay is True
    assert settings.relay_interval == DEFAULT_RELAY_INTERVAL == 1.0
    assert settings.relay_grace == DEFAULT_RELAY_GRACE == 5.0
    assert settings.relay_batch_size == DEFAULT_RELAY_BATCH_SIZE == 500
    assert settings.relay_max_backoff == DEFAULT_RELAY_MAX_BACKOFF == 30.0
    assert settings.stage_in_atomic is False


def test_relay_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "JOBLEDGER_RELAY": "no",
            "JOBLEDGER_RELAY_INTERVAL": "250ms",
            "JOBLEDGER_RELAY_GRACE": "0",
            "JOBLEDGER_RELAY_BATCH_SIZE": "10000",
            "JOBLEDGER_RELAY_MAX_BACKOFF": "250ms",
            "JOBLEDGER_STAGE_IN_ATOMIC": "on",
        }
    )
    assert (settings.relay, settings.relay_interval, settings.relay_grace) == (False, 0.25, 0.0)
    assert (settings.relay_batch_size, settings.relay_max_backoff) == (10000, 0.25)
    assert settings.stage_in_atomic is True
    assert Settings.from_env({"JOBLEDGER_RELAY_BATCH_SIZE": "1"}).relay_batch_size == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JOBLEDGER_RELAY", "maybe"),
        ("JOBLEDGER_RELAY_INTERVAL", "0"),
        ("JOBLEDGER_RELAY_INTERVAL", "0s"),
        ("JOBLEDGER_RELAY_INTERVAL", "-1"),
        ("JOBLEDGER_RELAY_INTERVAL", "soon"),
        ("JOBLEDGER_RELAY_GRACE", "-1"),
        ("JOBLEDGER_RELAY_GRACE", "a while"),
        ("JOBLEDGER_RELAY_BATCH_SIZE", "0"),
        ("JOBLEDGER_RELAY_BATCH_SIZE", "-5"),
        ("JOBLEDGER_RELAY_BATCH_SIZE", "10001"),
        ("JOBLEDGER_RELAY_BATCH_SIZE", "1.5"),
        ("JOBLEDGER_RELAY_BATCH_SIZE", "many"),
        ("JOBLEDGER_RELAY_MAX_BACKOFF", "0"),
        ("JOBLEDGER_RELAY_MAX_BACKOFF", "500ms"),  # shorter than the 1s interval
        ("JOBLEDGER_RELAY_MAX_BACKOFF", "never"),
        ("JOBLEDGER_STAGE_IN_ATOMIC", "sometimes"),
    ],
)
def test_a_bad_relay_variable_is_named(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(
    ("field_name", "value", "named"),
    [
        ("relay_interval", 0.0, "JOBLEDGER_RELAY_INTERVAL"),
        ("relay_interval", float("nan"), "JOBLEDGER_RELAY_INTERVAL"),
        ("relay_max_backoff", 0.0, "JOBLEDGER_RELAY_MAX_BACKOFF"),
        ("relay_grace", -0.5, "JOBLEDGER_RELAY_GRACE"),
        ("relay_batch_size", 0, "JOBLEDGER_RELAY_BATCH_SIZE"),
        ("relay_batch_size", 10_001, "JOBLEDGER_RELAY_BATCH_SIZE"),
    ],
)
def test_bad_relay_settings_in_code_are_named(field_name: str, value: Any, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings(**{field_name: value})
    assert Settings(relay_interval=2, relay_max_backoff=2).relay_max_backoff == 2


def test_a_slow_broker_stops_a_batch_at_half_its_lease(
    store: MemoryStore, clock: ManualClock
) -> None:
    """Past its lease another relay may take the same jobs: a batch whose publishing is slow
    stops at half the lease, marks what went and leaves the rest to the next batch."""
    ids = stage(store, 250)
    slow = Broker()

    def publish(records: Sequence[JobRecord]) -> Published:
        clock.advance(20)  # each slice of 100 takes 20 s against a 60 s lease
        return slow(records)

    relay = Relay(store, publish=publish, grace=0, batch_size=250, lease=60, clock=clock)
    report = relay.run_once(max_batches=1)
    assert [len(b) for b in slow.batches] == [100, 100]  # a third slice would pass 30 s
    assert report.published == 200
    assert states(store, ids).count(S.QUEUED) == 200
    assert states(store, ids).count(S.STAGED) == 50
