"""Invariant 7 on the worker side: writes that meet a dead ledger are kept and replayed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from jobledger.errors import StoreUnavailable
from jobledger.lifecycle import Claim, Lifecycle
from jobledger.model import JobRecord, JobState
from jobledger.pending import PendingWrites, TransitionWrite
from jobledger.stores.base import Transition
from jobledger.testing import MemoryStore


class FlakyStore:
    """A store whose every call fails while ``down``; ``commit_then_fail`` makes the next
    transition commit and then raise, as a connection lost before the answer does."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.down = False
        self.commit_then_fail = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("ledger down (test)")
            result = target(*args, **kwargs)
            if name == "transition" and self.commit_then_fail:
                self.commit_then_fail = False
                raise StoreUnavailable("connection lost after commit (test)")
            return result

        return call


@pytest.fixture
def flaky() -> Iterator[FlakyStore]:
    yield FlakyStore(MemoryStore())


def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        pause.wait(0.01)


def lifecycle(flaky: FlakyStore, owner: str, pending: PendingWrites) -> Lifecycle:
    return Lifecycle(flaky, owner, ttl=30.0, pending=pending)  # type: ignore[arg-type]


def test_a_run_while_the_ledger_is_down_is_recorded_once_it_returns(flaky: FlakyStore) -> None:
    pending = PendingWrites(lambda: flaky, interval=0.02)  # type: ignore[arg-type,return-value]
    life = lifecycle(flaky, "w:1", pending)
    flaky.down = True  # down at publish (no record) and at claim
    record = JobRecord(id="j1", name="t", system="celery")
    assert life.claim("j1", record) is Claim.DEFERRED  # run the body anyway
    assert life.succeed("j1")  # deferred, not lost, not raised
    assert len(pending) == 2 and flaky.store.get("j1") is None
    flaky.down = False
    until(lambda: len(pending) == 0)  # the replay thread, not the test, wrote them
    job = flaky.store.get("j1")
    assert job is not None and job.state is JobState.SUCCEEDED and job.owner == "w:1"
    assert pending.counters == {"deferred": 2, "applied": 2}


def test_a_replay_that_lost_its_race_is_dropped_with_a_warning(
    flaky: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    pending = PendingWrites(lambda: flaky, interval=60)  # type: ignore[arg-type,return-value]
    flaky.store.create(JobRecord(id="j1", name="t"))
    a = lifecycle(flaky, "a:1", pending)
    assert a.claim("j1") is Claim.CLAIMED
    flaky.down = True
    assert a.succeed("j1")  # kept
    flaky.down = False
    # meanwhile a was declared dead: recovery requeued the job and b runs it
    flaky.store.transition("j1", Transition(JobState.QUEUED, frozenset({JobState.STARTED})))
    assert Lifecycle(flaky.store, "b:1", ttl=30).claim("j1") is Claim.CLAIMED
    with caplog.at_level(logging.WARNING):
        assert pending.flush()
    job = flaky.store.get("j1")
    assert job is not None and job.state is JobState.STARTED and job.owner == "b:1"
    assert pending.counters["lost"] == 1 and len(pending) == 0
    assert "lost the job to another" in caplog.text
    pending.stop()


def test_writes_of_one_job_keep_their_order(flaky: FlakyStore) -> None:
    pending = PendingWrites(lambda: flaky, interval=60)  # type: ignore[arg-type,return-value]
    flaky.store.create(JobRecord(id="j1", name="t"))
    life = lifecycle(flaky, "a:1", pending)
    life.claim("j1")
    flaky.down = True
    life.fail("j1", "retry", will_retry=True)  # started → retrying, kept
    flaky.down = False
    # the retry comes back to this process: its claim waits for the retrying write first
    assert life.claim("j1") is Claim.CLAIMED
    assert len(pending) == 0
    job = flaky.store.get("j1")
    assert job is not None and job.state is JobState.STARTED and job.attempts == 2
    pending.stop()


def test_a_write_whose_answer_was_lost_after_commit_counts_as_applied(flaky: FlakyStore) -> None:
    pending = PendingWrites(lambda: flaky, interval=60)  # type: ignore[arg-type,return-value]
    flaky.store.create(JobRecord(id="j1", name="t"))
    life = lifecycle(flaky, "a:1", pending)
    life.claim("j1")
    flaky.commit_then_fail = True
    assert life.succeed("j1")
    assert len(pending) == 1
    assert pending.flush()
    assert pending.counters["applied"] == 1 and pending.counters["lost"] == 0
    pending.stop()


def test_the_buffer_is_bounded_and_drops_the_oldest(flaky: FlakyStore) -> None:
    pending = PendingWrites(lambda: flaky, limit=2, interval=60)  # type: ignore[arg-type,return-value]
    flaky.down = True
    for i in range(3):
        change = Transition(JobState.SUCCEEDED, frozenset({JobState.STARTED}))
        assert pending.submit(TransitionWrite(f"j{i}", change)) is None
    assert len(pending) == 2 and pending.counters["dropped"] == 1
    assert not pending.holds("j0") and pending.holds("j2")
    assert not pending.flush()  # still down: nothing replayed, nothing lost
    pending.stop()


class DropsItselfWrite:
    """A write whose replay sees the buffer fill up behind it and drop it, as a concurrent
    :meth:`PendingWrites.add` past the bound does."""

    job_id = "slow"

    def __init__(self, pending: PendingWrites) -> None:
        self.pending = pending

    def apply(self, store: Any, *, retried: bool = False) -> bool:
        for i in range(2):  # the bound of the test below
            change = Transition(JobState.SUCCEEDED, frozenset({JobState.STARTED}))
            self.pending.add(TransitionWrite(f"later-{i}", change))
        return True

    def describe(self) -> str:
        return "test write"


def test_a_write_dropped_while_replayed_is_not_removed_twice(flaky: FlakyStore) -> None:
    pending = PendingWrites(lambda: flaky, limit=2, interval=60)  # type: ignore[arg-type,return-value]
    pending.add(DropsItselfWrite(pending))
    flaky.down = True  # the later writes stay pending; the flush stops at the first of them
    assert not pending.flush()
    assert len(pending) == 2 and pending.counters["dropped"] == 1
    assert not pending.holds("slow") and pending.holds("later-0") and pending.holds("later-1")
    pending.stop()
