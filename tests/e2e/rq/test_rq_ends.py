"""How a job ends when its work horse does not report: RQ's job timeout (the horse's own
alarm, and the kill of a horse that outlived it), and the job's orphan policy when its work
horse or its whole worker dies under it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from rq import Retry
from rq.job import Job, JobStatus
from rqharness import RQHarness, make_rq_fixture, wait_for  # noqa: F401

from jobledger.model import JobState


def starts(h: RQHarness, job_id: str) -> int:
    return sum(1 for r in h.runs() if r[0] == job_id and r[1] == "start")


def assert_failed_in_rq(h: RQHarness, job_id: str) -> None:
    wait_for("RQ to fail it", lambda: job_id in h.queue.failed_job_registry.get_job_ids())
    assert Job.fetch(job_id, connection=h.redis).get_status() == JobStatus.FAILED
    assert job_id not in h.queue.started_job_registry.get_job_ids()


def test_a_job_past_its_timeout_fails_as_timed_out_and_is_not_run_again(
    make_rq: Callable[..., RQHarness],
) -> None:
    """A body stopped by its horse's alarm fails with RQ's JobTimeoutException; a horse that
    outlived the alarm, which RQ's worker kills 60 s past the timeout, fails naming the
    timeout too, instead of being put back as a lost job and run again."""
    h = make_rq("sqlite", "Worker")
    h.start_worker("w1", rq_args=("--job-monitoring-interval", "1"))
    alarmed = h.enqueue("work", 1, seconds=30, job_timeout=1)
    outlived = h.enqueue("outlive_alarm", 2, job_timeout=1)
    ids = [alarmed, outlived]
    h.wait("the alarmed job to fail", lambda: h.all_in([alarmed], JobState.FAILED), ids, 30)
    assert "JobTimeoutException" in (h.job(alarmed).error or "")
    h.wait("RQ to kill the horse that outlived its alarm", lambda: h.all_in(ids, JobState.FAILED),
           ids, timeout=1 + 60 + 30)  # fmt: skip
    record = h.job(outlived)
    assert "RQ's job timeout (1 s) passed" in (record.error or ""), record.error
    assert (record.generation, record.recoveries) == (0, 0)
    assert starts(h, outlived) == 1
    assert_failed_in_rq(h, outlived)


def test_a_job_that_must_not_run_twice_fails_when_its_work_horse_dies(
    make_rq: Callable[..., RQHarness],
) -> None:
    """``on_orphan=fail``: not put back, and not retried by RQ either, though it has a
    ``Retry`` left (a crash is no failure its body can be retried for)."""
    h = make_rq("postgresql", "Worker")
    h.start_worker("w1")
    job_id = h.enqueue("work", 1, seconds=30, meta={"on_orphan": "fail"}, retry=Retry(max=2))
    horse = wait_for("the body", lambda: next((r[4] for r in h.runs() if r[0] == job_id), None))
    wait_for("the claim", lambda: h.job(job_id).state is JobState.STARTED)
    os.kill(horse, signal.SIGKILL)
    h.wait("the job to fail", lambda: h.all_in([job_id], JobState.FAILED), [job_id], 10)
    record = h.job(job_id)
    assert "on_orphan=fail" in (record.error or ""), record.error
    assert (record.generation, starts(h, job_id)) == (0, 1)
    assert_failed_in_rq(h, job_id)


def test_a_job_to_discard_is_cancelled_when_its_whole_worker_dies(
    make_rq: Callable[..., RQHarness],
) -> None:
    h = make_rq("sqlite", "SimpleWorker")
    victim = h.start_worker("victim")
    job_id = h.enqueue("work", 1, seconds=30, meta={"on_orphan": "discard"})
    wait_for("the body", lambda: starts(h, job_id) == 1)
    victim.kill()
    h.start_worker("survivor")
    h.wait("the sweep to cancel it", lambda: h.all_in([job_id], JobState.CANCELLED), [job_id], 30)
    assert "on_orphan=discard" in (h.job(job_id).error or "")
    assert starts(h, job_id) == 1
    assert job_id not in h.queue.get_job_ids()
