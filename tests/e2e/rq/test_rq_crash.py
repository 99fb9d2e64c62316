"""Crashes: a whole ``SimpleWorker`` SIGKILLed mid-job, its warm shutdown, a job Redis lost; the
job comes back under the same id, runs to success once, and RQ's registries agree with the
ledger. (A work horse or a whole forking ``Worker`` SIGKILLed, and its warm shutdown: the
integration contract's scenarios, ``tests/e2e/test_integration_contract.py``.)"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest
from rqharness import RQHarness, make_rq_fixture, wait_for  # noqa: F401

from jobledger.model import JobState
from jobledger.query import JobQuery
from jobledger.testing.contract.integration import assert_all

LEDGERS = ["sqlite", "postgresql"]
STARTED = frozenset({JobState.STARTED})


def started_by(h: RQHarness, name: str) -> list[str]:
    return [
        j.id
        for j in h.store.iter_jobs(JobQuery(states=STARTED))
        if j.owner and j.owner.startswith(f"{name}:")
    ]


def assert_consistent(h: RQHarness, ids: list[str]) -> None:
    """Every job succeeded, none started after its success was recorded, and RQ's own view
    (statuses, registries) agrees with the ledger."""
    records = {job_id: h.job(job_id) for job_id in ids}
    assert_all(h, records, JobState.SUCCEEDED)
    h.check_queue(list(records.values()))


# The forking Worker, on both ledgers: the integration contract's scenario
# (tests/e2e/test_integration_contract.py).
@pytest.mark.parametrize("worker_class", ["SimpleWorker"])
@pytest.mark.parametrize("ledger", LEDGERS)
def test_a_whole_worker_sigkilled_loses_no_job(
    make_rq: Callable[..., RQHarness], ledger: str, worker_class: str
) -> None:
    h = make_rq(ledger, worker_class)
    h.start_worker("victim")
    h.start_worker("survivor")
    ids = [h.enqueue("work", i, seconds=1.0) for i in range(10)]

    def mid_run() -> list[str] | None:
        """The victim's jobs mid-body (started in the ledger, no 'done' row), after one done."""
        runs = h.runs()
        done = {r[0] for r in runs if r[2] == "victim" and r[1] == "done"}
        held = [i for i in started_by(h, "victim") if i not in done]
        return held if done and held else None

    wait_for("the victim to be mid-job", mid_run)
    h.worker("victim").kill()
    killed_at = time.monotonic()
    orphans = started_by(h, "victim")
    assert orphans
    h.worker("victim").wait(10)

    # TTL 3 s + a sweep every 0.5 s + a second, unless the victim died holding the recovery
    # lock: then the survivor waits out the lock's TTL too (30 s at least, Recovery's own)
    h.wait(
        "the orphan to be put back",
        lambda: all(h.job(i).generation > 0 for i in orphans),
        orphans,
        timeout=3 + 0.5 + 30 + 10,
    )
    print(f"worker killed: its job put back after {time.monotonic() - killed_at:.2f} s")
    h.wait("every job to succeed", lambda: h.all_in(ids, JobState.SUCCEEDED), ids, timeout=30)
    for job_id in orphans:
        assert h.job(job_id).recoveries == 1
        assert h.job(job_id).owner.startswith("survivor:")  # type: ignore[union-attr]
    assert_consistent(h, ids)


@pytest.mark.parametrize("worker_class", ["SimpleWorker"])  # Worker: the integration contract's
def test_sigterm_lets_the_running_job_finish_then_deregisters(
    make_rq: Callable[..., RQHarness], worker_class: str
) -> None:
    """A warm shutdown: RQ finishes the job it runs, the instance beats until then (nothing
    to recover) and leaves the ledger once it holds nothing."""
    h = make_rq("sqlite", worker_class)
    worker = h.start_worker("w1")
    job_id = h.enqueue("work", 1, seconds=1.5)
    wait_for("the body to start", lambda: any(r[0] == job_id for r in h.runs()))
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()
    record = h.job(job_id)
    assert (record.state, record.recoveries) == (JobState.SUCCEEDED, 0)
    assert not any(i.name == "w1" for i in h.store.instances(ttl=3))


def test_a_job_whose_id_redis_lost_is_enqueued_again(make_rq: Callable[..., RQHarness]) -> None:
    """The queue is empty while the ledger waits on a queued job, at two sweeps in a row
    (Redis restarted without persistence): the sweep publishes it again by name."""
    h = make_rq("sqlite", "SimpleWorker")
    job_id = h.enqueue("work", 1)
    h.redis.delete(h.queue.key)  # the id is gone; the job's hash and the record are not
    h.start_worker("w1")
    wait_for(
        "the lost job to be enqueued again and succeed",
        lambda: h.all_in([job_id], JobState.SUCCEEDED),
    )
    record = h.job(job_id)
    assert (record.generation, record.recoveries) == (1, 0)  # a requeue, not a recovery
