"""The claim guard, retries, failures, poison pills and the warm-shutdown drain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from harness import REDIS, Harness, make_harness_fixture, redis_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobState
from jobledger.query import JobQuery


def state_of(h: Harness, job_id: str) -> JobState | None:
    job = h.store.get(job_id)
    return None if job is None else job.state


def test_retries_then_success_and_retries_exhausted(redis_harness: Harness) -> None:
    h = redis_harness
    h.start_worker("w1", concurrency=2)
    recovers = h.app.send_task("e2e.flaky", args=[2]).id
    gives_up = h.app.send_task("e2e.flaky", args=[9]).id  # max_retries=3
    wait_for("the flaky job to succeed", lambda: state_of(h, recovers) is JobState.SUCCEEDED)
    wait_for("the hopeless job to fail", lambda: state_of(h, gives_up) is JobState.FAILED)
    ok, failed = h.store.get(recovers), h.store.get(gives_up)
    assert ok is not None and failed is not None
    assert ok.attempts == 3 and ok.recoveries == 0
    assert failed.attempts == 4 and failed.error and "failure 4" in failed.error


def test_a_task_that_kills_its_pool_process_ends_dead_after_the_cap(redis_harness: Harness) -> None:
    h = redis_harness
    worker = h.start_worker("w1", concurrency=2)
    job_id = h.app.send_task("e2e.suicide").id
    # ~5s a cycle: billiard hands the next job out only once the dead child is replaced
    try:
        wait_for("the poison pill to be dead", lambda: state_of(h, job_id) is JobState.DEAD, 50)
    except TimeoutError as exc:
        pytest.fail(f"{exc}; ledger: {h.store.get(job_id)}; worker:\n{worker.output()[-6000:]}")
    job = h.store.get(job_id)
    assert job is not None and job.recoveries == 3 and job.error and "poison pill" in job.error
    starts = [r for r in h.runs() if r[0] == job_id and r[1] == "start"]
    assert len(starts) == 4  # the first run and 3 recoveries
    assert "WorkerLostError" in worker.output()


def test_sigterm_drains_in_flight_jobs_before_the_heartbeat_goes(redis_harness: Harness) -> None:
    h = redis_harness
    draining = h.start_worker("w1", concurrency=2)
    ids = [h.app.send_task("e2e.work", args=[i], kwargs={"seconds": 4.0}).id for i in range(2)]
    wait_for("both jobs to start", lambda: all(state_of(h, i) is JobState.STARTED for i in ids))
    h.start_worker("w2", concurrency=1)  # a live recoverer that must not take them
    draining.warm_shutdown()
    wait_for(
        "w1 to say it is draining",
        lambda: any(i.name == "w1" and i.state.value == "draining" for i in h.store.instances(10)),
    )
    assert draining.wait(30) == 0
    for job_id in ids:
        job = h.store.get(job_id)
        assert job is not None and job.state is JobState.SUCCEEDED
        assert job.recoveries == 0 and job.owner and job.owner.startswith("w1:")
    assert [i.name for i in h.store.instances(10)] == ["w2"]  # w1 deregistered after the drain
    assert sum(1 for r in h.runs() if r[1] == "start") == 2
    assert h.store.count(JobQuery()) == 2


def test_a_late_acked_task_outliving_the_visibility_timeout_runs_once(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness(REDIS, visibility_timeout=2.0)
    workers = [h.start_worker(f"w{i}", concurrency=2, E2E_ACKS_LATE="1") for i in (1, 2)]
    job_id = h.app.send_task("e2e.work", args=[1], kwargs={"seconds": 5.0}).id
    # Redis hands the unacked message out again after 2s, while the first run still goes on
    wait_for(
        "the redelivered copy to be skipped",
        lambda: any("running_elsewhere" in w.output() for w in workers),
        timeout=20,
    )
    wait_for("the job to succeed", lambda: state_of(h, job_id) is JobState.SUCCEEDED)
    assert [r[1] for r in h.runs() if r[0] == job_id] == ["start", "done"]
    job = h.store.get(job_id)
    assert job is not None and job.attempts == 1 and job.recoveries == 0


def test_a_job_killed_at_its_hard_time_limit_is_failed(redis_harness: Harness) -> None:
    h = redis_harness
    worker = h.start_worker("w1", concurrency=1)
    job_id = h.app.send_task("e2e.work", args=[1], kwargs={"seconds": 5.0}, time_limit=1).id
    wait_for("the job to fail at its time limit", lambda: state_of(h, job_id) is JobState.FAILED)
    job = h.store.get(job_id)
    assert job is not None and job.owner is not None and job.owner.startswith("w1:")
    assert job.error is not None and "hard time limit" in job.error
    # billiard fails the job before Celery logs the limit: wait for the line, do not expect it
    wait_for("Celery to log the hard time limit", lambda: "Hard time limit (1" in worker.output())
    assert [r[1] for r in h.runs() if r[0] == job_id] == ["start"]  # killed, never done
