"""The Redis ledger survives a restart of its server with an append-only file: nothing lost.

One private redis-server is both the Celery broker and the ledger, as a deployment that
adds jobledger to the Redis it already runs would have it. Jobs are published and running
when the server is restarted on the same port and directory; every job then ends
``succeeded`` in the ledger, and every body ran exactly once (the execution log).

Two restarts: a shutdown (SIGTERM) with ``appendfsync everysec``, the usual production
setting (Redis fsyncs the file as it exits, so a shutdown loses nothing even there); and a
SIGKILL with ``appendfsync always``, where every write Redis answered is already on disk
(with ``everysec`` a SIGKILL may lose up to a second of writes: the README says what
jobledger then covers).
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import harness
import pytest
from harness import Harness, make_harness_fixture, wait_for  # noqa: F401
from services import PrivateRedis

from jobledger.model import JobState
from jobledger.query import JobQuery
from ledgerdb import redis_ledger_url

JOBS = 40


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PrivateRedis]:
    """A private redis-server with an append-only file, ``appendfsync`` the parameter."""
    redis_server = PrivateRedis(tmp_path, fsync=request.param)
    redis_server.start()
    yield redis_server
    redis_server.kill()


@pytest.fixture
def h(
    server: PrivateRedis, make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> Harness:
    """The private server as broker and ledger (the harness makes its Redis ledgers on the
    shared server; this one's goes on ours). Closed before the server stops."""
    monkeypatch.setattr(harness, "database_url", lambda *_: redis_ledger_url(server.url))
    return make_harness(server.url, "redis")


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("server", "sig"),
    [("everysec", signal.SIGTERM), ("always", signal.SIGKILL)],
    ids=["everysec-shutdown", "always-sigkill"],
    indirect=["server"],
)
def test_jobs_running_through_a_redis_restart_all_succeed_once(
    server: PrivateRedis, h: Harness, sig: signal.Signals
) -> None:
    h.start_workers(["w1", "w2"])
    work = h.app.tasks["e2e.work"]
    ids = [str(work.apply_async((n, 0.3)).id) for n in range(JOBS)]

    def done() -> Counter[str]:
        return Counter(r.job_id for r in h.runs() if r.phase == "done")

    def started() -> Counter[str]:
        return Counter(r.job_id for r in h.runs() if r.phase == "start")

    wait_for("jobs to finish and others to run", lambda: len(done()) >= 5)
    running = set(started()) - set(done())
    server.kill(sig)
    server.start()
    wait_for(
        "every job to succeed in the ledger",
        lambda: h.store.count(JobQuery(states=frozenset({JobState.SUCCEEDED}))) == JOBS,
        timeout=120,
    )
    assert running, "no job was running at the restart"
    assert h.store.count(JobQuery()) == JOBS
    runs, starts = done(), started()
    assert set(runs) == set(ids) and set(runs.values()) == {1}, f"not once each: {runs}"
    assert set(starts.values()) == {1}, f"a body started twice: {starts}"
