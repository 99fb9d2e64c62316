"""Claim and finish (invariants 2 and 3) on a MemoryStore whose clock the tests move, the
fencing generations included: a delivery is judged by facts, never by timing."""

from __future__ import annotations

import pytest

from jobledger.lifecycle import Claim, Lifecycle
from jobledger.model import Instance, JobRecord, JobState, Republish, to_datetime
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
    """A live instance (it has beaten) and its lifecycle."""
    instance = Instance(name=name, nonce="1")
    store.heartbeat(instance)
    return Lifecycle(store, owner=instance.id, ttl=TTL)


def state(store: MemoryStore, job_id: str) -> tuple[JobState, str | None, int]:
    record = store.get(job_id)
    assert record is not None
    return record.state, record.owner, record.attempts


def test_claim_a_queued_job(store: MemoryStore) -> None:
    a = worker(store, "a")
    assert store.create(JobRecord(id="j", name="t"))
    outcome = a.claim("j")
    assert outcome is Claim.CLAIMED and outcome.should_run
    assert state(store, "j") == (S.STARTED, "a:1", 1)


@pytest.mark.parametrize("source", [S.STAGED, S.RETRYING, S.FAILED, S.DEAD])
def test_claim_from_every_claimable_state(store: MemoryStore, source: JobState) -> None:
    assert store.create(JobRecord(id="j", name="t", state=source))
    # failed and dead start again for a restart's delivery only (it publishes, then moves)
    restart = source in (S.FAILED, S.DEAD)
    assert worker(store, "a").claim("j", restart=restart) is Claim.CLAIMED


@pytest.mark.parametrize("source", [S.FAILED, S.DEAD])
def test_a_stray_redelivery_of_a_failed_or_dead_job_is_skipped(
    store: MemoryStore, source: JobState
) -> None:
    assert store.create(JobRecord(id="j", name="t", state=source, owner="x:1"))
    outcome = worker(store, "a").claim("j")
    assert outcome is Claim.NOT_RESTARTED and not outcome.should_run
    assert state(store, "j") == (source, "x:1", 0)


def test_a_takeover_over_the_recovery_cap_buries_the_poison_pill(store: MemoryStore) -> None:
    recently = to_datetime(store.now())
    for job_id, recoveries in (("pill", 3), ("once-more", 2)):
        record = JobRecord(
            id=job_id,
            name="t",
            state=S.STARTED,
            owner="ghost:1",
            recoveries=recoveries,
            recovered_at=recently,
        )
        assert store.create(record)
    a = Lifecycle(store, owner="a:1", ttl=TTL, max_recoveries=3)
    outcome = a.claim("pill")
    assert outcome is Claim.POISON_PILL and not outcome.should_run
    buried = store.get("pill")
    assert buried is not None and (buried.state, buried.owner) == (S.DEAD, "ghost:1")
    assert buried.error is not None and "poison pill" in buried.error
    assert a.claim("once-more") is Claim.TAKEN_OVER  # under the cap: taken over as before


def test_a_failed_retry_publish_fails_the_job_it_moved_to_retrying(store: MemoryStore) -> None:
    a = worker(store, "a")
    assert store.create(JobRecord(id="j", name="t"))
    assert a.claim("j") is Claim.CLAIMED
    assert a.fail("j", "retry", will_retry=True)  # moved before the broker took the retry
    assert not a.fail("j", "broker down", will_retry=False)
    assert a.fail_unsent_retry("j", "broker down")
    record = store.get("j")
    assert record is not None and (record.state, record.error) == (S.FAILED, "broker down")


def test_claim_creates_a_missing_record(store: MemoryStore) -> None:
    a = worker(store, "a")
    outcome = a.claim("j", JobRecord(id="j", name="t", args=[1]))
    assert outcome is Claim.CREATED and outcome.should_run
    assert state(store, "j") == (S.STARTED, "a:1", 1)
    with pytest.raises(LookupError):
        a.claim("unknown")


def test_claim_of_a_succeeded_job_is_skipped(store: MemoryStore) -> None:
    assert store.create(JobRecord(id="j", name="t", state=S.SUCCEEDED, owner="x:1"))
    outcome = worker(store, "a").claim("j")
    assert outcome is Claim.ALREADY_SUCCEEDED and not outcome.should_run
    assert state(store, "j") == (S.SUCCEEDED, "x:1", 0)


def test_claim_of_a_cancelled_job_is_skipped(store: MemoryStore) -> None:
    assert store.create(JobRecord(id="j", name="t", state=S.CANCELLED))
    outcome = worker(store, "a").claim("j")
    assert outcome is Claim.CANCELLED and not outcome.should_run


def test_claim_of_a_job_running_on_a_live_instance_is_skipped(store: MemoryStore) -> None:
    a, b = worker(store, "a"), worker(store, "b")
    assert store.create(JobRecord(id="j", name="t"))
    assert a.claim("j") is Claim.CLAIMED
    assert b.claim("j") is Claim.RUNNING_ELSEWHERE
    assert a.claim("j") is Claim.RUNNING_ELSEWHERE  # delivered again to its own owner
    assert state(store, "j") == (S.STARTED, "a:1", 1)


def test_a_recovery_message_that_beats_its_own_move_runs_on_the_same_instance(
    store: MemoryStore,
) -> None:
    """The worker's main process recovers a job whose pool process died: it publishes the next
    generation first and moves the record after; the message can reach a sibling pool process
    in between. The generation says it is the current delivery: it runs at once (no wait),
    and the late move loses harmlessly."""
    a = worker(store, "a")
    assert store.create(JobRecord(id="j", name="t"))
    assert a.claim("j", generation=0) is Claim.CLAIMED
    outcome = a.claim("j", generation=1, republish=Republish.RECOVERY)
    assert outcome is Claim.TAKEN_OVER
    record = store.get("j")
    assert record is not None
    assert (record.state, record.generation, record.recoveries) == (S.STARTED, 1, 1)
    late_move = Transition(
        to=S.QUEUED,
        expect=frozenset({S.STARTED}),
        expect_owner="a:1",
        expect_generation=0,
        generation=1,
        reason="recovery",
    )
    assert not store.transition("j", late_move)
    assert not a.succeed("j", generation=0)  # the dead process's run is fenced off
    assert a.succeed("j", generation=1)


def test_claim_takes_over_from_a_dead_instance_and_only_the_owner_finishes(
    store: MemoryStore, clock: ManualClock
) -> None:
    a = worker(store, "a")
    assert store.create(JobRecord(id="j", name="t"))
    assert a.claim("j") is Claim.CLAIMED
    clock.advance(TTL + 1)  # a falls silent
    b = worker(store, "b")
    outcome = b.claim("j")
    assert outcome is Claim.TAKEN_OVER and outcome.should_run
    record = store.get("j")
    assert record is not None
    assert (record.owner, record.attempts, record.recoveries) == ("b:1", 2, 1)
    # a was wrongly declared dead and finishes late: not applied over b.
    assert not a.succeed("j")
    assert not a.fail("j", "boom", will_retry=False)
    assert state(store, "j") == (S.STARTED, "b:1", 2)
    assert b.succeed("j")
    assert state(store, "j") == (S.SUCCEEDED, "b:1", 2)


def test_claim_takes_over_from_an_owner_that_never_beat(store: MemoryStore) -> None:
    assert store.create(JobRecord(id="j", name="t", state=S.STARTED, owner="ghost:1"))
    assert worker(store, "a").claim("j") is Claim.TAKEN_OVER


def test_a_live_owner_just_inside_its_ttl_is_not_taken_over(
    store: MemoryStore, clock: ManualClock
) -> None:
    a = worker(store, "a")
    assert store.create(JobRecord(id="j", name="t"))
    assert a.claim("j") is Claim.CLAIMED
    clock.advance(TTL)
    assert worker(store, "b").claim("j") is Claim.RUNNING_ELSEWHERE


def test_finishing(store: MemoryStore) -> None:
    a = worker(store, "a")
    for job_id in ("ok", "retry", "fail", "cancel"):
        assert store.create(JobRecord(id=job_id, name="t"))
        assert a.claim(job_id) is Claim.CLAIMED
    assert a.succeed("ok")
    assert a.fail("retry", "flaky", will_retry=True)
    assert a.fail("fail", "broken", will_retry=False)
    assert a.cancel("cancel", "revoked")
    got = {job_id: store.get(job_id) for job_id in ("ok", "retry", "fail", "cancel")}
    assert {k: (v.state, v.error) for k, v in got.items() if v} == {
        "ok": (S.SUCCEEDED, None),
        "retry": (S.RETRYING, "flaky"),
        "fail": (S.FAILED, "broken"),
        "cancel": (S.CANCELLED, "revoked"),
    }
    assert not a.succeed("ok"), "a job finishes once"
    assert not a.succeed("missing")


# -- fencing generations (invariant 2): a delivery judged by its message's generation --


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


@pytest.mark.parametrize("closed", [S.FAILED, S.DEAD])
@pytest.mark.parametrize("reason", [R.RECOVERY, R.REQUEUE])
def test_only_a_restart_starts_a_failed_or_dead_job_again(
    store: MemoryStore, closed: JobState, reason: Republish
) -> None:
    """A recovery or requeue published generation 1 while the older message ran and failed
    for good (or was buried): its late delivery must not run the job a person must decide
    on, however new it is."""
    job(store, state=closed)
    outcome = worker(store, "a").claim("j", generation=1, republish=reason)
    assert outcome is Claim.NOT_RESTARTED
    assert current(store).state is closed
