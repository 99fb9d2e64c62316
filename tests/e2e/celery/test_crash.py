"""Crashes: the jobs of a killed worker are recovered elsewhere, and run to success once."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (  # noqa: F401
    RABBITMQ,
    REDIS,
    Harness,
    make_harness_fixture,
    redis_harness_fixture,
    wait_for,
)
from services import PrivateRedis

from jobledger.model import JobState
from jobledger.query import JobQuery
from jobledger.recovery import Recovery

SUCCEEDED = frozenset({JobState.SUCCEEDED})
STARTED = frozenset({JobState.STARTED})


def held_by(h: Harness, name: str) -> set[str]:
    return {
        j.id
        for j in h.store.iter_jobs(JobQuery(states=STARTED))
        if j.owner and j.owner.startswith(f"{name}:")
    }


def kill_mid_run(h: Harness, name: str = "victim") -> set[str]:
    """Wait until ``name`` has finished some jobs and holds at least two, SIGKILL its whole
    process group, and return the jobs it held (read once it is gone: none can finish there,
    and a claim it sent just before the kill has landed)."""

    def busy() -> bool:
        done = sum(1 for r in h.runs() if r[2] == name and r[1] == "done")
        return done >= 4 and len(held_by(h, name)) >= 2

    wait_for(f"{name} to be mid-run", busy, timeout=30)
    worker = next(w for w in h.workers if w.name == name)
    worker.kill(signal.SIGKILL)
    h.await_gone(worker)
    orphaned = held_by(h, name)
    assert orphaned
    return orphaned


def test_racing_recoverers_publish_each_orphan_once(make_harness: Callable[..., Harness]) -> None:
    # RabbitMQ: Redis would hold the victim's prefetched, unstarted messages until their
    # visibility timeout (they are queued, not orphans, in the ledger).
    h = make_harness(RABBITMQ, "postgresql")
    h.start_worker("victim", concurrency=4, E2E_ACKS_LATE="1")
    for name in ("rescuer1", "rescuer2"):  # each sweeps every 0.2s
        h.start_worker(name, concurrency=2, JOBLEDGER_RECOVERY_INTERVAL="0.2", E2E_ACKS_LATE="1")
    ids = [h.app.send_task("e2e.work", args=[i], kwargs={"seconds": 0.4}).id for i in range(60)]
    # and the test process sweeps too, from two threads, as fast as it can
    stop = threading.Event()
    sweeps: list[int] = [0, 0]

    def sweep(slot: int) -> None:
        recovery = Recovery.from_settings(h.store, h.settings, publish=h.integration.publish)
        while not stop.is_set():
            recovery.sweep_once()
            sweeps[slot] += 1

    threads = [threading.Thread(target=sweep, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for("both test sweepers to be sweeping", lambda: min(sweeps) > 0)
        orphaned = kill_mid_run(h)
        at_kill = list(sweeps)
        wait_for(
            "every job to succeed",
            lambda: h.store.count(JobQuery(states=SUCCEEDED)) == len(ids),
            timeout=40,
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    # both test sweepers really raced the workers' sweeps while the orphans waited
    assert all(after > before for after, before in zip(sweeps, at_kill, strict=True)), sweeps
    published = Counter(r[0] for r in h.runs() if r[1] == "published")
    assert published and set(published) <= orphaned, "only orphans were published again"
    assert all(n == 1 for n in published.values()), f"published more than once: {published}"
    publishers = {r[2] for r in h.runs() if r[1] == "published"}
    assert publishers <= {"rescuer1", "rescuer2", "client"}
    for job_id in orphaned:
        job = h.store.get(job_id)
        assert job is not None and job.recoveries == 1


@pytest.mark.parametrize("whole_worker", [False, True], ids=["pool-process", "whole-worker"])
def test_a_task_that_must_not_run_twice_is_failed_with_the_reason_not_rerun(
    redis_harness: Harness, whole_worker: bool
) -> None:
    """``on_orphan="fail"``: whether its pool process or its whole worker is killed under it,
    the job ends failed with the reason, its body started once, and nothing republished it."""
    h = redis_harness
    victim = h.start_worker("victim", concurrency=2)
    job_id = h.app.send_task("e2e.charges_once", args=[1]).id
    child = wait_for("the job to start", lambda: h.pids(job_id))[0]
    if whole_worker:
        victim.kill(signal.SIGKILL)
        victim.wait(10)
        h.start_worker("survivor", concurrency=2)  # its sweep finds the orphan
    else:
        os.kill(child, signal.SIGKILL)
    wait_for(
        "the job to be failed",
        lambda: (job := h.store.get(job_id)) is not None and job.state is JobState.FAILED,
        timeout=30,
    )
    job = h.store.get(job_id)
    assert job is not None and job.error is not None and "on_orphan=fail" in job.error
    assert job.recoveries == 0 and job.generation == 0
    assert [r[1] for r in h.runs() if r[0] == job_id] == ["start"]


def test_messages_a_broker_lost_come_back_by_themselves(
    tmp_path: Path, make_harness: Callable[..., Harness]
) -> None:
    """A broker without persistence restarts while 20 tracked jobs wait in it: the ledger
    still says queued, the queue is empty. A worker's sweep sees that twice and publishes
    each job again (next generation); every job runs once, nobody restarted anything."""
    broker = PrivateRedis(tmp_path, persistent=False)
    broker.start()
    try:
        h = make_harness(broker.url)
        ids = [h.app.send_task("e2e.work", args=[i]).id for i in range(20)]
        assert h.store.count(JobQuery(states=frozenset({JobState.QUEUED}))) == 20
        broker.kill()
        broker.start()  # empty: the messages are gone
        h.start_worker("w1", concurrency=2)
        wait_for(
            "every lost job to succeed",
            lambda: h.store.count(JobQuery(states=SUCCEEDED, ids=frozenset(ids))) == 20,
            timeout=60,
        )
        starts = Counter(r[0] for r in h.runs() if r[1] == "start")
        assert starts == dict.fromkeys(ids, 1)
        for job_id in ids:
            job = h.store.get(job_id)
            assert job is not None and job.generation == 1 and job.recoveries == 0  # never ran
    finally:
        broker.close()
