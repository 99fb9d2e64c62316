"""Tracked tasks get a ledger record through their whole life; untracked ones none."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from harness import REDIS, Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobState
from jobledger.query import JobQuery


# (A handful of jobs running once each, on a Redis ledger: the integration contract's scenario.)
@pytest.mark.parametrize("ledger", ["sqlite"])
def test_500_tracked_tasks_succeed_and_untracked_leave_no_record(
    make_harness: Callable[..., Harness], ledger: str
) -> None:
    h = make_harness(REDIS, ledger)
    h.start_worker("w1", concurrency=4)
    before = time.time()
    tracked = [h.app.send_task("e2e.work", args=[i]).id for i in range(500)]
    untracked = [h.app.send_task("e2e.untracked", args=[i]).id for i in range(20)]

    def all_succeeded() -> bool:
        return h.store.count(JobQuery(states=frozenset({JobState.SUCCEEDED}))) == 500

    wait_for("500 jobs to succeed", all_succeeded, timeout=45)
    wait_for("untracked tasks to run", lambda: sum(r[1] == "untracked" for r in h.runs()) == 20)

    jobs = {j.id: j for j in h.store.iter_jobs(JobQuery())}
    assert set(jobs) == set(tracked)  # and none of the untracked ones
    for job in jobs.values():
        assert job.name == "e2e.work" and job.system == "celery" and job.queue == h.queue
        assert job.args == [int(job.args[0])] and job.attempts == 1 and job.owner
        assert job.owner.startswith("w1:")
        assert job.queued_at and job.started_at and job.finished_at
        assert before - 1 <= job.queued_at.timestamp() <= job.started_at.timestamp()
        assert job.started_at <= job.finished_at
        assert 0 <= (job.started_to_finished or 0) < 10
    assert not set(untracked) & set(jobs)
