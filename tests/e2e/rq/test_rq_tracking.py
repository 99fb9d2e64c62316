"""RQ jobs are recorded at enqueue, claimed before they run and finished from RQ's paths."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from rq import Retry
from rq.job import Job, JobStatus
from rqharness import WORKER_CLASSES, RQHarness, make_rq_fixture, wait_for  # noqa: F401

from jobledger.model import JobState


@pytest.mark.parametrize("worker_class", ["SimpleWorker"])  # Worker: the integration contract's
def test_jobs_are_recorded_claimed_and_succeed_once(
    make_rq: Callable[..., RQHarness], worker_class: str
) -> None:
    h = make_rq("sqlite", worker_class)
    ids = [h.enqueue("work", i, job_id=f"given-{i}" if i == 0 else None) for i in range(6)]
    assert ids[0] == "given-0"
    queued = h.job(ids[1])
    assert (queued.state, queued.system, queued.name) == (JobState.QUEUED, "rq", "rqtasks.work")
    assert queued.queue == h.queue_name and queued.args == [1]
    h.start_worker("w1")
    wait_for("every job to succeed", lambda: h.all_in(ids, JobState.SUCCEEDED))
    starts = Counter(r[0] for r in h.runs() if r[1] == "start")
    assert all(starts[i] == 1 for i in ids)
    assert all(h.job(i).owner and h.job(i).owner.startswith("w1:") for i in ids)  # type: ignore[union-attr]


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_a_failure_with_a_retry_left_is_retrying_then_succeeds(
    make_rq: Callable[..., RQHarness], worker_class: str
) -> None:
    h = make_rq("sqlite", worker_class)
    retried = h.enqueue("fails_first_time", 1, retry=Retry(max=2))
    failed = h.enqueue("fail", 2)
    h.start_worker("w1")
    wait_for("the retried job to succeed", lambda: h.all_in([retried], JobState.SUCCEEDED))
    wait_for("the failing job to fail", lambda: h.all_in([failed], JobState.FAILED))
    assert "always fails" in (h.job(failed).error or "")
    assert h.job(retried).attempts == 2
    assert Job.fetch(failed, connection=h.redis).get_status() == JobStatus.FAILED


@pytest.mark.parametrize("worker_class", ["SimpleWorker"])  # Worker: the integration contract's
def test_a_duplicate_delivery_is_skipped_without_running(
    make_rq: Callable[..., RQHarness], worker_class: str
) -> None:
    """An id pushed again after its job succeeded (a stray copy) runs no body, and RQ's view
    of the job stays the real run's."""
    h = make_rq("sqlite", worker_class)
    job_id = h.enqueue("work", 1)
    h.start_worker("w1")
    wait_for("the job to succeed", lambda: h.all_in([job_id], JobState.SUCCEEDED))
    h.queue.push_job_id(job_id)
    marker = h.enqueue("work", 2)  # behind the duplicate: when it ran, the duplicate was judged
    wait_for("the next job to succeed", lambda: h.all_in([marker], JobState.SUCCEEDED))
    assert sum(1 for r in h.runs() if r[0] == job_id and r[1] == "start") == 1
    assert Job.fetch(job_id, connection=h.redis).get_status() == JobStatus.FINISHED
    assert job_id not in h.queue.started_job_registry.get_job_ids()
