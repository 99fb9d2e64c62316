"""Crash to requeue on the Redis broker: jobledger's sweep against Dramatiq's own.

Dramatiq's Redis broker puts back the messages of a worker whose broker heartbeat is older
than ``heartbeat_timeout`` (60 s), during "maintenance", which runs on 0.1% of the broker
commands on that queue (``maintenance_chance``). jobledger republishes a dead instance's job
after its heartbeat TTL and a sweep. The test kills a worker under a job, keeps the queue
busy (as production traffic would; an idle queue runs maintenance far later), and measures
both: when the sweep republished the job, and when Dramatiq's own copy came back (the
survivor skips it as stale: the job ran once).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable

import pytest
from dramatiq_harness import Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobState


@pytest.mark.slow
def test_jobledger_requeues_long_before_dramatiqs_heartbeat_timeout(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness("redis", "sqlite")
    victim = h.start_worker("victim", processes=1, threads=1)
    job_id = h.send("e2e.hangs_first_time", 7)
    wait_for("the job to start", lambda: h.pids(job_id))
    survivor = h.start_worker("survivor", processes=1, threads=4)
    victim.kill(signal.SIGKILL)
    killed_at = time.time()
    stop = threading.Event()

    def traffic() -> None:  # what a live system enqueues meanwhile (untracked no-ops)
        while not stop.is_set():
            h.send("e2e.untracked", 0)
            stop.wait(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        wait_for(
            "the sweep's republish to succeed",
            lambda: (j := h.store.get(job_id)) is not None and j.state is JobState.SUCCEEDED,
            timeout=30,
        )
        stale = re.compile(rf"job {job_id} \(e2e.hangs_first_time\) not run: stale")
        wait_for(
            "Dramatiq's own requeue of the first message",
            lambda: stale.search(survivor.output()),
            timeout=300,
        )
        dramatiq_after = time.time() - killed_at
    finally:
        stop.set()
        sender.join()
    job = h.store.get(job_id)
    assert job is not None and job.recovered_at is not None
    jobledger_after = job.recovered_at.timestamp() - killed_at
    print(
        f"\ncrash to requeue: jobledger {jobledger_after:.1f} s (TTL {h.settings.ttl:g} s, "
        f"sweep every {h.settings.recovery_interval:g} s); Dramatiq's own {dramatiq_after:.1f} s"
    )
    assert jobledger_after < h.settings.ttl + h.settings.recovery_interval + 2.0
    assert dramatiq_after >= 60.0
    assert sorted(r[1] for r in h.runs() if r[0] == job_id) == [
        "done", "published", "start", "start",
    ]  # fmt: skip
