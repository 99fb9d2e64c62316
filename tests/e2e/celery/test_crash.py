"""Crashes: the jobs of a killed worker are recovered elsewhere, and run to success once."""

from __future__ import annotations

import os
import signal
import threading
import time
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
    process group, and return the jobs it held (read after the kill: none can finish there)."""

    def busy() -> bool:
        done = sum(1 for r in h.runs() if r[2] == name and r[1] == "done")
        return done >= 4 and len(held_by(h, name)) >= 2

    wait_for(f"{name} to be mid-run", busy, timeout=30)
    worker = next(w for w in h.workers if w.name == name)
    worker.kill(signal.SIGKILL)
    orphaned = held_by(h, name)
    assert orphaned
    worker.wait(10)
    return orphaned


@pytest.mark.parametrize("ledger", ["sqlite", "postgresql", "redis"])
def test_sigkill_of_a_whole_worker_loses_no_job(
    make_harness: Callable[..., Harness], ledger: str
) -> None:
    h = make_harness(RABBITMQ, ledger)
    # acks_late: early acks (at the pool's accept, before the claim) lose a job to a kill
    # that lands between the two, and the ledger could only show it stuck in queued
    h.start_worker("victim", concurrency=4, E2E_ACKS_LATE="1")
    h.start_worker("survivor", concurrency=4, E2E_ACKS_LATE="1")
    ids = [h.app.send_task("e2e.work", args=[i], kwargs={"seconds": 0.4}).id for i in range(80)]
    orphaned = kill_mid_run(h)
    killed_at = time.time()

    wait_for(
        "every job to succeed",
        lambda: h.store.count(JobQuery(states=SUCCEEDED)) == len(ids),
        timeout=45,
    )
    jobs = {j.id: j for j in h.store.iter_jobs(JobQuery())}
    runs = h.runs()
    done = Counter(r[0] for r in runs if r[1] == "done")
    assert all(done[i] >= 1 for i in ids), "a job never ran to completion"
    for job_id, job in jobs.items():  # no run started after the job's success was recorded
        assert job.finished_at is not None
        succeeded_at = job.finished_at.timestamp()
        late = [r for r in runs if r[0] == job_id and r[1] == "start" and r[3] > succeeded_at]
        assert not late, f"job {job_id} ran again after it succeeded: {late}"
    recovered = {j.id for j in jobs.values() if j.recoveries}
    assert orphaned <= recovered  # the jobs the victim held were recovered...
    bound = h.settings.ttl + h.settings.recovery_interval + 2.0  # + slack for one sweep
    for job_id in orphaned:  # ...within TTL + sweep interval + slack, and finished elsewhere
        job = jobs[job_id]
        assert job.owner and job.owner.startswith("survivor:")
        assert job.recovered_at is not None
        assert job.recovered_at.timestamp() - killed_at < bound


def test_sigkill_of_one_pool_process_recovers_its_job(redis_harness: Harness) -> None:
    h = redis_harness
    worker = h.start_worker("w1", concurrency=2)
    job_id = h.app.send_task("e2e.hangs_first_time", args=[7]).id
    others = [h.app.send_task("e2e.work", args=[i], kwargs={"seconds": 0.1}).id for i in range(6)]
    child = wait_for("the job to start in a pool process", lambda: h.pids(job_id))[0]
    assert child != worker.proc.pid
    os.kill(child, signal.SIGKILL)  # only that child: the main process and its sibling live on

    wait_for(
        "the killed job to succeed",
        lambda: (job := h.store.get(job_id)) is not None and job.state is JobState.SUCCEEDED,
        timeout=30,
    )
    job = h.store.get(job_id)
    assert job is not None and job.recoveries == 1 and job.attempts == 2
    assert job.owner and job.owner.startswith("w1:")  # recovered by its own worker, at once
    pids = h.pids(job_id)
    assert len(pids) == 2 and pids[1] != child
    phases = [r[1] for r in h.runs() if r[0] == job_id]
    assert sorted(phases) == ["done", "published", "start", "start"]
    wait_for(
        "the other jobs to succeed",
        lambda: h.store.count(JobQuery(states=SUCCEEDED, ids=frozenset(others))) == len(others),
    )
    assert worker.proc.poll() is None  # the worker itself survived
    assert "WorkerLostError" in worker.output()


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
