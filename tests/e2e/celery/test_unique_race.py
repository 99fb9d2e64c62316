"""Unique keys under a real race: 8 processes, released together, each publish one key 125
times through Celery's ``apply_async(unique_key=...)`` against a real broker and a real
ledger. Exactly one job exists afterwards (one record, one message on the queue), and all
1,000 publishes returned its id."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable

import pytest
import redis
import unique_publishers
from harness import REDIS, Harness, make_harness_fixture  # noqa: F401

from jobledger.model import JobState
from jobledger.query import JobQuery

PROCESSES = 8
PUBLISHES = 125


def queued_messages(broker: str, queue: str) -> int:
    """Messages waiting in ``queue`` on a Redis broker (every priority's list)."""
    client = redis.Redis.from_url(broker)
    try:
        return sum(
            int(client.llen(key))
            for key in client.scan_iter(f"{queue}*", count=1000)
            if client.type(key) == b"list"
        )
    finally:
        client.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ledger", ["postgresql", "redis"])
def test_a_thousand_concurrent_publishes_of_one_key_enqueue_one_job(
    make_harness: Callable[..., Harness], ledger: str
) -> None:
    h = make_harness(REDIS, ledger)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    publishers = [
        context.Process(
            target=unique_publishers.publish_one_key,
            args=(REDIS, h.queue, h.url, n, PUBLISHES, start, results),
        )
        for n in range(PROCESSES)
    ]
    for process in publishers:
        process.start()
    try:
        reports = [results.get(timeout=240) for _ in publishers]
    finally:
        for process in publishers:
            process.join(30)
            if process.is_alive():
                process.kill()
    failed = [r for r in reports if isinstance(r[1], str)]
    assert not failed, failed
    # the publishes overlapped: every process began before any had finished
    assert max(r[2] for r in reports) < min(r[3] for r in reports), "not concurrent"
    returned = [job_id for r in reports for job_id in r[1]]
    assert len(returned) == PROCESSES * PUBLISHES
    records = list(h.store.iter_jobs(JobQuery()))
    assert len(records) == 1, [(r.id, r.state) for r in records]
    job = records[0]
    assert set(returned) == {job.id}
    assert (job.unique_key, job.name, job.state) == (
        unique_publishers.KEY,
        "e2e.work",
        JobState.QUEUED,
    )
    assert queued_messages(REDIS, h.queue) == 1
