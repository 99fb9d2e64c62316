"""Unique jobs in real Celery workers: a second publish of a key while its job is unfinished
(queued, running, recovered after its process died) returns that job and runs nothing; once
it succeeded, the key publishes a new job."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest
from harness import (  # noqa: F401
    REDIS,
    Harness,
    make_harness_fixture,
    redis_harness_fixture,
    wait_for,
)

from jobledger.model import JobState


@pytest.mark.parametrize("ledger", ["sqlite", "redis"])
def test_a_unique_key_runs_one_job_until_it_succeeds(
    make_harness: Callable[..., Harness], ledger: str
) -> None:
    h = make_harness(REDIS, ledger)
    h.start_worker("w1", concurrency=2)
    work = h.app.tasks["e2e.work"]

    def state(job_id: str) -> JobState | None:
        record = h.store.get(job_id)
        return None if record is None else record.state

    first = work.apply_async((1, 1.0), unique_key="invoice:42")
    queued_again = work.apply_async((2,), unique_key="invoice:42")
    wait_for("the first job to start", lambda: state(first.id) is JobState.STARTED)
    running_again = work.apply_async((3,), unique_key="invoice:42")
    assert queued_again.id == running_again.id == first.id
    wait_for("the first job to succeed", lambda: state(first.id) is JobState.SUCCEEDED)

    third = work.apply_async((4,), unique_key="invoice:42")
    assert third.id != first.id
    wait_for("the third publish to succeed", lambda: state(third.id) is JobState.SUCCEEDED)
    starts = sorted(r.job_id for r in h.runs() if r.phase == "start")
    assert starts == sorted([first.id, third.id])
    record = h.store.get(third.id)
    assert record is not None and (record.args, record.unique_key) == ([4], "invoice:42")


def test_a_recovered_unique_job_keeps_its_key_until_it_finishes(redis_harness: Harness) -> None:
    """A pool process SIGKILLed under a unique job: the job is recovered and runs again, and
    every publish of its key returns it, until the move that ends it frees the key (judged
    by the records: a publish that made a new job did so after the old one finished)."""
    h = redis_harness
    h.start_worker("w1", concurrency=2)
    hangs = h.app.tasks["e2e.hangs_first_time"]
    first = hangs.apply_async((7,), unique_key="export:7")
    child = wait_for("the job to start in a pool process", lambda: h.pids(first.id))[0]
    os.kill(child, signal.SIGKILL)
    returned = [first.id]
    wait_for(
        "a publish of the key to make a new job",
        lambda: (
            returned.append(hangs.apply_async((8,), unique_key="export:7").id)
            or returned[-1] != first.id
        ),
        timeout=30,
    )
    old, new = h.store.get(first.id), h.store.get(returned[-1])
    assert old is not None and new is not None
    assert (old.state, old.recoveries, old.attempts) == (JobState.SUCCEEDED, 1, 2)
    assert old.finished_at is not None and new.created_at is not None
    assert old.finished_at <= new.created_at
    assert set(returned[:-1]) == {first.id}
