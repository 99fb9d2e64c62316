"""A job published while the ledger was down, then lost with the worker that prefetched it.

The publisher cannot write the record: its message says so (``jobledger_unrecorded``), and the
worker process that receives it journals the record before any thread can claim it. So when
that worker is SIGKILLed holding the job unstarted, the record and the heartbeat that listed
it are there for another worker's sweep to put it back, instead of the job existing only as a
message the Redis broker restores after its 60 s heartbeat timeout at best.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from dramatiq_app import make_app
from dramatiq_harness import Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.config import Settings
from jobledger.integrations.base import registry
from jobledger.model import JobState

#: A ledger nobody listens at: every write of the publisher's fails at once.
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/test"


def test_a_job_published_while_the_ledger_was_down_survives_its_workers_sigkill(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness("redis", "sqlite")
    victim = h.start_worker("victim", processes=1, threads=1)
    busy = h.send("e2e.hangs_first_time", 1)  # holds the victim's only thread
    wait_for("the victim to run it", lambda: h.pids(busy))

    settings = Settings(database_url=UNREACHABLE, instance_name="client-down")
    broker, middleware = make_app(h.broker_url, h.queue, settings)
    try:
        job_id = str(broker.get_actor("e2e.work").send(1).message_id)  # the send goes through
        assert middleware.runtime.counters["publish_unrecorded"] == 1
    finally:
        middleware.close()
        broker.close()
        registry.register(h.middleware.publisher)

    def held_by_victim() -> bool:
        return any(
            job_id in dict(i.holding) for i in h.store.instances(ttl=10) if i.name == "victim"
        )

    wait_for(
        "the victim to record the job it prefetched, and say it holds it",
        lambda: (
            (j := h.store.get(job_id)) is not None
            and j.state is JobState.QUEUED
            and held_by_victim()
        ),
    )
    victim.kill(signal.SIGKILL)
    h.start_worker("survivor", processes=1, threads=2)
    wait_for(
        "both jobs to succeed on the survivor",
        lambda: all(
            (j := h.store.get(i)) is not None and j.state is JobState.SUCCEEDED
            for i in (busy, job_id)
        ),
        timeout=30,
    )
    job = h.store.get(job_id)
    assert job is not None and job.generation == 1  # put back by the sweep, not by Dramatiq
    assert [r[2] for r in h.runs() if r[0] == job_id and r[1] == "start"] == ["survivor"]
