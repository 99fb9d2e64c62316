"""Unique jobs in a real RQ worker: a second enqueue of a key while its job is unfinished
returns that job and runs nothing; once it succeeded, the key enqueues a new job."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from rqharness import RQHarness, make_rq_fixture, wait_for  # noqa: F401

from jobledger.model import JobState


def test_a_unique_key_runs_one_rq_job_until_it_succeeds(make_rq: Callable[..., RQHarness]) -> None:
    h = make_rq("sqlite")
    first = h.enqueue("work", 1, unique_key="report:7")
    assert h.enqueue("work", 2, unique_key="report:7") == first
    h.start_worker("w1")
    wait_for("the job to succeed", lambda: h.all_in([first], JobState.SUCCEEDED))
    third = h.enqueue("work", 3, unique_key="report:7")
    assert third != first
    wait_for("the third enqueue to succeed", lambda: h.all_in([third], JobState.SUCCEEDED))
    starts = Counter(r[0] for r in h.runs() if r[1] == "start")
    assert starts == Counter({first: 1, third: 1})
    assert (h.job(third).args, h.job(third).unique_key) == ([3], "report:7")
