"""Fencing generations (invariant 2): a claim judges a delivery by the generation its message
carries, never by timing. Pure logic on a MemoryStore whose clock the tests move."""

from __future__ import annotations

import pytest

from jobledger.lifecycle import Claim, Lifecycle
from jobledger.model import Instance, JobRecord, JobState, Republish
from jobledger.stores.base import Transition
from jobledger.testing import ManualClock, MemoryStore

TTL = 30.0
S = JobState
R = Republish


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


def worker(store: MemoryStore, name: str) -> Lifecycle:
    instance = Instance(name=name, nonce="1")
    store.heartbeat(instance)
    return Lifecycle(store, owner=instance.id, ttl=TTL)


def job(store: MemoryStore, **fields: object) -> JobRecord:
    record = JobRecord(id="j", name="t", **fields)  # type: ignore[arg-type]
    assert store.create(record)
    return record


def current(store: MemoryStore) -> JobRecord:
    record = store.get("j")
    assert record is not None
    return record


def republished(store: MemoryStore, source: JobState, reason: str, owner: object = None) -> bool:
    """The republisher's move after its publish: generation + 1 by compare-and-set."""
    g = current(store).generation
    return store.transition(
        "j",
        Transition(
            to=S.QUEUED,
            expect=frozenset({source}),
            expect_owner=owner if owner is not None else current(store).owner,
            expect_generation=g,
            generation=g + 1,
            reason=reason,  # type: ignore[arg-type]
        ),
    )


def test_the_current_generation_is_claimed_and_an_older_one_is_stale(store: MemoryStore) -> None:
    job(store, generation=2)
    a = worker(store, "a")
    assert a.claim("j", generation=1) is Claim.STALE
    assert current(store).state is S.QUEUED
    assert a.claim("j", generation=2) is Claim.CLAIMED
    assert (current(store).state, current(store).generation) == (S.STARTED, 2)


def test_two_restarts_of_one_queued_job_run_it_once(store: MemoryStore) -> None:
    """Both restarts publish, one move wins; the first message is stale, the two restart
    copies of the new generation run once: the second finds it running, then succeeded."""
    job(store)
    assert republished(store, S.QUEUED, "restart")
    assert not store.transition(  # the racing restart read generation 0 as well
        "j",
        Transition(
            to=S.QUEUED,
            expect=frozenset({S.QUEUED}),
            expect_generation=0,
            generation=1,
            reason="restart",
        ),
    )
    a, b = worker(store, "a"), worker(store, "b")
    assert a.claim("j", generation=0) is Claim.STALE  # the original message
    assert a.claim("j", generation=1, republish=R.RESTART) is Claim.CLAIMED
    assert b.claim("j", generation=1, republish=R.RESTART) is Claim.RUNNING_ELSEWHERE
    assert a.succeed("j", generation=1)
    assert b.claim("j", generation=1, republish=R.RESTART) is Claim.ALREADY_SUCCEEDED
    assert current(store).restarts == 1


@pytest.mark.parametrize("source", [S.QUEUED, S.RETRYING, S.STAGED, S.FAILED, S.DEAD])
def test_a_newer_delivery_runs_before_its_republish_moved_the_record(
    store: MemoryStore, source: JobState
) -> None:
    job(store, state=source)
    a = worker(store, "a")
    assert a.claim("j", generation=1, republish=R.RESTART) is Claim.CLAIMED
    record = current(store)
    assert (record.state, record.generation, record.restarts) == (S.STARTED, 1, 1)
    assert not republished(store, source, "restart")  # the republisher's late move loses


def test_a_recovery_message_supersedes_the_run_it_found_dead(store: MemoryStore) -> None:
    a, b = worker(store, "a"), worker(store, "b")
    job(store)
    assert a.claim("j", generation=0) is Claim.CLAIMED
    assert b.claim("j", generation=1, republish=R.RECOVERY) is Claim.TAKEN_OVER
    record = current(store)
    assert (record.owner, record.generation, record.recoveries) == ("b:1", 1, 1)
    assert len(record.recent_recoveries) == 1
    assert not a.succeed("j", generation=0)  # the superseded run is fenced off
    assert b.succeed("j", generation=1)


def test_a_requeued_message_never_supersedes_a_run(store: MemoryStore) -> None:
    """A queued job put back after its instance died may meet a live run of its older
    message (the broker redelivered it first): that run is kept."""
    a, b = worker(store, "a"), worker(store, "b")
    job(store)
    assert a.claim("j", generation=0) is Claim.CLAIMED
    assert b.claim("j", generation=1, republish=R.REQUEUE) is Claim.RUNNING_ELSEWHERE
    assert (current(store).owner, current(store).generation) == ("a:1", 0)


def test_the_same_generation_of_a_dead_owners_job_is_left_to_recovery(
    store: MemoryStore, clock: ManualClock
) -> None:
    """A redelivery of the dead run's own message does not take over: the sweep republishes
    the job with a new generation, so exactly one message of it stays current."""
    a = worker(store, "a")
    job(store)
    assert a.claim("j", generation=0) is Claim.CLAIMED
    clock.advance(TTL + 1)
    b = worker(store, "b")
    assert b.claim("j", generation=0) is Claim.ORPHANED
    assert current(store).owner == "a:1"


def test_a_stray_same_generation_delivery_of_a_failed_job_is_skipped(store: MemoryStore) -> None:
    job(store, state=S.FAILED)
    assert worker(store, "a").claim("j", generation=0) is Claim.NOT_RESTARTED


def test_a_finished_job_skips_every_generation(store: MemoryStore) -> None:
    job(store, state=S.SUCCEEDED, owner="x:1")
    a = worker(store, "a")
    for generation in (0, 1):
        assert a.claim("j", generation=generation, republish=R.RECOVERY) is (
            Claim.ALREADY_SUCCEEDED
        )


def test_a_missing_record_is_created_at_the_deliverys_generation(store: MemoryStore) -> None:
    a = worker(store, "a")
    record = JobRecord(id="j", name="t")
    assert a.claim("j", record, generation=3) is Claim.CREATED
    assert (current(store).state, current(store).generation) == (S.STARTED, 3)
    assert a.succeed("j", generation=3)
