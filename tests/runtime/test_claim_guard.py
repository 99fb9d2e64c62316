"""The worker runtime's claim guard with a queue-less adapter: what any adapter gets from
``guard.run`` (claim, skip, each end) and from ``received`` and the fork guard, written once
for every queue system."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from jobledger.config import Settings
from jobledger.errors import DeliverySkipped
from jobledger.integrations.base import Published, publish_one_by_one
from jobledger.lifecycle import Claim
from jobledger.model import Instance, JobRecord, JobState, Republish
from jobledger.runtime import forksafe
from jobledger.runtime.guard import Delivery, End, Run
from jobledger.runtime.worker import WorkerRuntime
from jobledger.stores import open_store
from jobledger.testing import MemoryStore

S = JobState


class Adapter:
    """The least an adapter is: a system name and a way back."""

    system = "fake"

    def __init__(self) -> None:
        self.published: list[tuple[JobRecord, Republish | None]] = []

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        self.published.append((record, reason))

    def publish_many(self, records: Sequence[JobRecord]) -> Published:
        return publish_one_by_one(self.publish, records)


@pytest.fixture
def runtime() -> Iterator[WorkerRuntime]:
    store = MemoryStore()
    made = WorkerRuntime(Adapter(), Settings(), store=store)
    store.heartbeat(Instance(name="w", nonce="1"))
    made.instance_id = "w:1"
    yield made
    made.close()


def delivery(job_id: str = "j", generation: int | None = 0) -> Delivery:
    return Delivery(JobRecord(id=job_id, name="t", system="fake", queue="q"), generation)


def state(runtime: WorkerRuntime, job_id: str = "j") -> JobState:
    record = runtime.store.get(job_id)
    assert record is not None
    return record.state


def test_a_body_runs_once_claimed_and_its_success_is_recorded(runtime: WorkerRuntime) -> None:
    assert runtime.guard.run(delivery(), lambda: "ok") == "ok"  # no record yet: created
    assert state(runtime) is S.SUCCEEDED
    with pytest.raises(DeliverySkipped) as skipped:  # a duplicate delivery: not run
        runtime.guard.run(delivery(), lambda: pytest.fail("ran twice"))
    assert skipped.value.claim is Claim.ALREADY_SUCCEEDED
    assert runtime.counters["duplicates_skipped"] == 1


def test_a_stale_delivery_is_skipped_and_counted(runtime: WorkerRuntime) -> None:
    assert runtime.store.create(JobRecord(id="j", name="t", system="fake", queue="q"))
    runtime.guard.run(delivery(generation=0), lambda: None)
    with pytest.raises(DeliverySkipped):
        runtime.guard.run(delivery(generation=-1), lambda: None)
    assert runtime.counters["stale_deliveries_skipped"] == 1


def test_the_adapters_judge_says_how_an_exception_ends_the_job(runtime: WorkerRuntime) -> None:
    class Again(Exception):
        pass

    def judge(exc: Exception, run: Run) -> tuple[End, str | None] | None:
        return (End.RETRYING, "again") if isinstance(exc, Again) else None

    def again() -> None:
        raise Again()

    with pytest.raises(Again):
        runtime.guard.run(delivery(), again, judge)
    assert state(runtime) is S.RETRYING
    with pytest.raises(ZeroDivisionError):  # not the adapter's: failed, with the traceback
        runtime.guard.run(delivery(), lambda: 1 / 0, judge)
    record = runtime.store.get("j")
    assert record is not None and record.state is S.FAILED
    assert record.error is not None and "ZeroDivisionError" in record.error


def test_a_retry_published_during_the_run_moves_the_job_first(runtime: WorkerRuntime) -> None:
    """The retry's message may be claimed before the body returns: the job must already be
    retrying then, and the run's own end must not overwrite it."""

    def body() -> None:
        run = runtime.guard.running("j")
        assert run is not None and run.generation == 0
        runtime.guard.retrying("j", "retry requested")
        assert state(runtime) is S.RETRYING

    runtime.guard.run(delivery(), body)
    assert state(runtime) is S.RETRYING
    assert runtime.guard.running("j") is None


def test_outside_a_registered_worker_bodies_run_unguarded(runtime: WorkerRuntime) -> None:
    runtime.instance_id = None
    assert runtime.guard.run(delivery(), lambda: 7) == 7
    assert runtime.store.get("j") is None and runtime.counters["run_unguarded"] == 1


def test_a_failure_is_recorded_with_the_traceback_from_the_tasks_frames(
    runtime: WorkerRuntime,
) -> None:
    def charge_card() -> None:
        raise ValueError("card declined")

    with pytest.raises(ValueError):
        runtime.guard.run(delivery(), charge_card)
    record = runtime.store.get("j")
    assert record is not None and record.error is not None
    frames = [line for line in record.error.splitlines() if line.strip().startswith("File ")]
    assert "in charge_card" in frames[0] and "jobledger" not in frames[0]


def test_a_delivery_its_publisher_could_not_record_is_recorded_by_the_worker(
    runtime: WorkerRuntime,
) -> None:
    """The message says the ledger was down at publish: the worker writes (here, outside a
    worker, through the in-memory pending writes) the record its delivery describes."""
    delivered = JobRecord(id="u", name="t", system="fake", queue="q", args=[1])
    runtime.received(delivered)
    assert runtime.store.get("u") is None  # an ordinary delivery writes nothing
    runtime.received(delivered, unrecorded=True)
    runtime.pending.flush()
    record = runtime.store.get("u")
    assert record is not None and record.state is S.QUEUED and record.args == [1]


# -- the guard in two halves (queues whose hooks surround the body: RQ, Dramatiq) ---------------
def test_begin_outside_a_registered_worker_claims_nothing(runtime: WorkerRuntime) -> None:
    runtime.instance_id = None
    assert runtime.guard.begin(delivery()) is None  # the body runs unclaimed: nothing to end
    assert runtime.store.get("j") is None and runtime.counters["run_unguarded"] == 1


def test_begin_raises_for_a_delivery_that_must_not_run(runtime: WorkerRuntime) -> None:
    run = runtime.guard.begin(delivery())
    assert run is not None and state(runtime) is S.STARTED
    with pytest.raises(DeliverySkipped) as skipped:  # a second copy while the first runs
        runtime.guard.begin(delivery())
    assert skipped.value.claim is Claim.RUNNING_ELSEWHERE
    assert runtime.guard.running("j") is run  # the skipped copy left the run alone
    assert runtime.counters["duplicates_skipped"] == 1


@pytest.mark.parametrize(
    ("end", "after"),
    [
        (End.SUCCEEDED, S.SUCCEEDED),
        (End.RETRYING, S.RETRYING),
        (End.FAILED, S.FAILED),
        (End.RELEASED, S.QUEUED),
        (End.CANCELLED, S.CANCELLED),
    ],
)
def test_end_records_each_end_and_forgets_the_run(
    runtime: WorkerRuntime, end: End, after: JobState
) -> None:
    run = runtime.guard.begin(delivery())
    assert run is not None and runtime.guard.running("j") is run
    runtime.guard.end(run, end, "why")
    assert runtime.guard.running("j") is None and state(runtime) is after


@pytest.mark.parametrize(("end", "after"), [(End.RETRYING, S.RETRYING), (End.FAILED, S.FAILED)])
def test_a_retrying_run_fails_only_if_its_retry_did_not_go(
    runtime: WorkerRuntime, end: End, after: JobState
) -> None:
    """Moved to retrying before its retry's message was published: its end leaves it to that
    message's delivery, unless the adapter says the message did not go (FAILED)."""
    run = runtime.guard.begin(delivery())
    assert run is not None
    runtime.guard.retrying("j", "retry 1")
    assert run.retrying and state(runtime) is S.RETRYING
    runtime.guard.end(run, end, "its retry could not be enqueued")
    assert state(runtime) is after and runtime.guard.running("j") is None


def test_only_a_store_that_needs_it_is_fork_guarded(tmp_path: Path) -> None:
    memory = MemoryStore()
    assert forksafe.guarded(memory) is memory  # no lock on its calls
    sqlite = open_store(f"sqlite:///{tmp_path}/ledger.db")
    try:
        assert isinstance(forksafe.guarded(sqlite), forksafe.ForkGuardedStore)
    finally:
        sqlite.close()
