"""Unique jobs in real Celery workers: a second publish of a key while its job is unfinished
returns that job and runs nothing; once it succeeded, the key publishes a new job."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from harness import REDIS, Harness, make_harness_fixture, wait_for  # noqa: F401

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
    starts = sorted(job_id for job_id, phase, _, _ in h.runs() if phase == "start")
    assert starts == sorted([first.id, third.id])
    record = h.store.get(third.id)
    assert record is not None and (record.args, record.unique_key) == ([4], "invoice:42")
