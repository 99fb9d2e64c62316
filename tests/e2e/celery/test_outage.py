"""Invariant 7: a ledger outage costs neither a publish nor a job, and the ledger catches up.

The shared PostgreSQL server is not stopped: client and worker reach the test's own database
through a TCP proxy that the test cuts (refusing and dropping connections) and restores.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from harness import REDIS, Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobState
from jobledger.query import JobQuery

SUCCEEDED = frozenset({JobState.SUCCEEDED})


def test_ledger_down_while_publishing_and_running(make_harness: Callable[..., Harness]) -> None:
    # A long TTL: this outage is shorter than it, so the worker keeps claiming (invariant 9).
    h = make_harness(REDIS, "postgresql", proxied=True, heartbeat_interval=2.0)
    assert h.proxy is not None
    h.start_worker("w1", concurrency=2)
    h.proxy.pause()
    started = time.monotonic()
    ids = [h.app.send_task("e2e.work", args=[i], kwargs={"seconds": 0.2}).id for i in range(20)]
    publishing = time.monotonic() - started
    assert len(ids) == 20 and publishing < 5, f"publishing took {publishing:.1f}s"
    assert h.integration.counters["publish_unrecorded"] == 20
    # the worker runs jobs while the ledger is unreachable (its writes are deferred)...
    wait_for("jobs to run during the outage", lambda: sum(r[1] == "done" for r in h.runs()) >= 4)
    assert h.store.count(JobQuery()) == 0  # nothing reached the ledger yet
    h.proxy.resume()
    # ...and the ledger learns of every one once it is back
    wait_for(
        "all 20 jobs to be recorded as succeeded",
        lambda: h.store.count(JobQuery(states=SUCCEEDED)) == 20,
        timeout=30,
    )
    jobs = {j.id: j for j in h.store.iter_jobs(JobQuery())}
    assert set(jobs) == set(ids)
    for job in jobs.values():
        assert job.name == "e2e.work" and job.queue == h.queue and job.owner
        assert job.args == [int(job.args[0])] and job.finished_at is not None
    done = Counter(r[0] for r in h.runs() if r[1] == "done")
    assert all(done[i] == 1 for i in ids), "a job ran twice or never"
