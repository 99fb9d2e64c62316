"""Staging and the relay for Dramatiq messages, on the Redis and the RabbitMQ brokers: jobs
staged in a SQLAlchemy or a Django transaction are enqueued after its commit (never after a
rollback), and those the fast path could not enqueue are enqueued by a worker's relay; each
runs once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import pytest
from dramatiq_app import make_app
from dramatiq_harness import HERE, Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobState
from jobledger.query import JobQuery

SUCCEEDED = frozenset({JobState.SUCCEEDED})
#: Brokers nothing listens on: the fast path's publish fails, the relay's goes through.
UNREACHABLE = {
    "redis": "redis://127.0.0.1:1/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:1/%2F",
}
BROKERS = ["redis", "rabbitmq"]


def succeeded_once(h: Harness, ids: list[str]) -> None:
    wait_for(
        "every staged job to succeed",
        lambda: h.store.count(JobQuery(states=SUCCEEDED, ids=frozenset(ids))) == len(ids),
        timeout=30,
    )
    starts = Counter(r[0] for r in h.runs() if r[1] == "start")
    assert all(starts[i] == 1 for i in ids), starts


@pytest.mark.parametrize("broker", BROKERS)
def test_a_sqlalchemy_transaction_enqueues_its_jobs_after_the_commit(
    make_harness: Callable[..., Harness], broker: str
) -> None:
    h = make_harness(broker)
    h.start_worker("w1", processes=1, threads=4)
    with h.store.engine.begin() as conn:
        ids = [h.middleware.stage("e2e.work", (i, 0.0), using=conn).message_id for i in range(5)]
        assert all(h.store.get(i) is None for i in ids)  # invisible until the commit
    with pytest.raises(RuntimeError), h.store.engine.begin() as conn:
        rolled_back = h.middleware.stage("e2e.work", (99, 0.0), using=conn).message_id
        raise RuntimeError("the transaction fails")
    succeeded_once(h, ids)
    assert h.store.get(rolled_back) is None
    assert rolled_back not in {r[0] for r in h.runs()}


@pytest.mark.parametrize("broker", BROKERS)
def test_the_relay_enqueues_what_the_fast_path_could_not(
    make_harness: Callable[..., Harness], broker: str
) -> None:
    h = make_harness(broker)
    cut_off, middleware = make_app(UNREACHABLE[broker], h.queue, h.settings)
    try:
        with h.store.engine.begin() as conn:
            ids = [middleware.stage("e2e.work", (i, 0.0), using=conn).message_id for i in range(5)]
        staged = frozenset({JobState.STAGED})
        assert h.store.count(JobQuery(states=staged, ids=frozenset(ids))) == len(ids)
    finally:
        middleware.close()
        cut_off.close()
    h.start_worker("w1", processes=1, threads=4, JOBLEDGER_RELAY_GRACE="0.5")
    succeeded_once(h, ids)


@pytest.mark.parametrize("broker", BROKERS)
def test_a_django_atomic_block_enqueues_its_jobs_after_the_commit(
    make_harness: Callable[..., Harness], broker: str
) -> None:
    # PostgreSQL: Django's SQLite connections give up after 5 s on a file lock the worker's
    # heartbeat and relay take every second, and a loaded machine got there
    h = make_harness(broker, "postgresql")
    h.start_worker("w1", processes=1, threads=4)
    done = subprocess.run(
        [sys.executable, str(HERE / "django_client.py")],
        env=h.env("django", E2E_WORKER="0"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    succeeded_once(h, out["committed"])
    assert h.store.get(out["rolled_back"]) is None
