"""A Dramatiq worker's life with the ledger: a warm shutdown drains and deregisters, and a
message the broker lost is published again by the sweep, on both brokers."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable

import pytest
from dramatiq_harness import Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobState
from jobledger.query import JobQuery

SUCCEEDED = frozenset({JobState.SUCCEEDED})
STARTED = frozenset({JobState.STARTED})


def all_succeeded_once(h: Harness, ids: list[str], timeout: float = 30) -> None:
    wait_for(
        "every job to succeed",
        lambda: h.store.count(JobQuery(states=SUCCEEDED, ids=frozenset(ids))) == len(ids),
        timeout=timeout,
    )
    starts = Counter(r[0] for r in h.runs() if r[1] == "start")
    assert all(starts[i] == 1 for i in ids), starts


@pytest.mark.parametrize("broker", ["rabbitmq"])  # Redis: the integration contract's scenario
def test_a_warm_shutdown_finishes_what_runs_and_deregisters(
    make_harness: Callable[..., Harness], broker: str
) -> None:
    h = make_harness(broker, "postgresql")
    first = h.start_worker("first", processes=1, threads=2)
    ids = [h.send("e2e.work", i, 1.5) for i in range(6)]
    wait_for("two jobs to run", lambda: h.store.count(JobQuery(states=STARTED)) == 2)
    first.proc.send_signal(signal.SIGTERM)  # to dramatiq's main process, as an orchestrator
    assert first.wait(60) == 0
    assert h.registered("first") == 0  # drained, then deregistered
    assert h.store.count(JobQuery(states=STARTED)) == 0  # what ran finished, as its owner
    h.start_worker("second", processes=1, threads=2)  # the rest wait in the broker
    all_succeeded_once(h, ids)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_message_the_broker_lost_is_published_again(
    make_harness: Callable[..., Harness], broker: str
) -> None:
    h = make_harness(broker)
    ids = [h.send("e2e.work", i) for i in range(3)]
    h.broker.flush(h.queue)  # the broker lost them (a restart without persistence)
    h.start_worker("w1", processes=1, threads=2)
    all_succeeded_once(h, ids)
    jobs = list(h.store.iter_jobs(JobQuery(ids=frozenset(ids))))
    assert all(j.generation == 1 for j in jobs)  # republished once, by the sweep
