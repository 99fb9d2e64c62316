"""Invariant 7: a ledger outage costs neither a publish nor a job, and the ledger catches up.

The shared PostgreSQL server is not stopped: client and worker reach the test's own database
through a TCP proxy that the test cuts (refusing and dropping connections) and restores.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import REDIS, Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.config import DEFAULT_JOURNAL_DIR
from jobledger.journal import SUFFIX
from jobledger.model import JobState
from jobledger.query import JobQuery

SUCCEEDED = frozenset({JobState.SUCCEEDED})


def test_ledger_down_while_publishing_and_running(make_harness: Callable[..., Harness]) -> None:
    # A long TTL: this outage is shorter than it, so the worker keeps claiming (invariant 9).
    h = make_harness(REDIS, "postgresql", proxied=True, heartbeat_interval=2.0)
    assert h.proxy is not None
    h.start_worker("w1", concurrency=2)
    h.proxy.pause()
    ids = [h.app.send_task("e2e.work", args=[i], kwargs={"seconds": 0.2}).id for i in range(20)]
    # every publish went out, each after one refused record (not a wall-time bound: under load
    # 11 twenty publishes took 5.7 s; a silent host's bound is the connect timeout's tests')
    assert len(ids) == 20 and h.integration.counters["publish_unrecorded"] == 20
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


def test_jobs_published_during_an_outage_survive_a_broker_that_loses_them(
    make_harness: Callable[..., Harness],
) -> None:
    """A job published while the ledger is down is first only its message. The publishing
    process records it once the ledger is back, so when the broker then loses the message
    (a restart without persistence), the lost-message sweep puts it back and it runs."""
    import redis

    h = make_harness(REDIS, "postgresql", proxied=True, heartbeat_interval=1.0)
    assert h.proxy is not None
    h.proxy.pause()
    ids = [h.app.send_task("e2e.work", args=[i]).id for i in range(5)]
    assert h.integration.counters["publish_unrecorded"] == len(ids)
    broker = redis.Redis.from_url(REDIS)
    assert broker.delete(h.queue) == 1  # the broker loses every message
    broker.close()
    h.proxy.resume()
    wait_for("the publisher to record the jobs", lambda: h.store.count(JobQuery()) == len(ids))
    h.start_worker("w1", concurrency=2)
    wait_for("every job to succeed", lambda: done_once(h, ids), timeout=30)
    wait_for(
        "the ledger to record them",
        lambda: h.store.count(JobQuery(states=SUCCEEDED)) == len(ids),
    )
    assert {job.generation for job in h.store.iter_jobs(JobQuery())} == {1}  # republished once


def test_a_worker_records_a_job_published_during_an_outage_when_it_receives_it(
    make_harness: Callable[..., Harness],
) -> None:
    """The message of a job the ledger could not record says so, and the worker that
    receives it writes the record before it starts the job (here it waits behind a long one),
    even when the publisher never does (its retries are dropped here): a message lost from
    the worker's prefetch then still has a record to be recovered from."""
    h = make_harness(REDIS, "postgresql", proxied=True, heartbeat_interval=1.0)
    assert h.proxy is not None
    h.proxy.pause()
    blocker = h.app.send_task("e2e.work", args=[-1], kwargs={"seconds": 15}).id
    ids = [h.app.send_task("e2e.work", args=[i]).id for i in range(3)]
    h.integration.pending.stop()
    h.integration.pending.log = type(h.integration.pending.log)()  # the publisher forgets
    h.proxy.resume()
    h.start_worker("w1", concurrency=1, E2E_PREFETCH="4")  # the blocker runs, the rest wait
    wait_for(
        "the worker to record the prefetched jobs",
        lambda: h.store.count(JobQuery(ids=frozenset(ids))) == len(ids),
    )
    assert not any(r[0] in ids and r[1] == "start" for r in h.runs()), "recorded as they ran"
    wait_for("every job to succeed", lambda: done_once(h, [blocker, *ids]), timeout=60)


def journaled_successes(h: Harness) -> set[str]:
    """The jobs whose move to succeeded waits in a journal of the workers' directory (read
    only, as a successor would find it)."""
    found: set[str] = set()
    for path in (h.tmp_path / DEFAULT_JOURNAL_DIR).glob(f"*{SUFFIX}"):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT job_id, body FROM writes").fetchall()
        except sqlite3.OperationalError:  # its table is not there yet
            rows = []
        finally:
            conn.close()
        found |= {job for job, body in rows if "TransitionWrite" in body and '"succeeded"' in body}
    return found


def done_once(h: Harness, ids: list[str]) -> bool:
    done = Counter(r[0] for r in h.runs() if r[1] == "done")
    assert all(done[i] <= 1 for i in ids), f"a job ran twice: {done}"
    return all(done[i] == 1 for i in ids)


@pytest.mark.parametrize("successor", ["w1", "w2"])
def test_jobs_run_during_an_outage_by_a_killed_worker_end_succeeded(
    make_harness: Callable[..., Harness], successor: str
) -> None:
    """The journal outlives the worker: jobs that ran (claim and success deferred) before
    their worker was SIGKILLed end ``succeeded`` once the ledger is back and a worker of the
    same name, or another worker sharing the journal directory, starts."""
    h = make_harness(REDIS, "postgresql", proxied=True, heartbeat_interval=1.0)
    assert h.proxy is not None
    first = h.start_worker("w1", concurrency=2)
    h.proxy.pause()
    ids = [h.app.send_task("e2e.work", args=[i], kwargs={"seconds": 0.1}).id for i in range(6)]
    wait_for("the jobs to run during the outage", lambda: done_once(h, ids))
    # A body's last line is not its job's end: a kill between the two leaves the job started
    # and unfinished (its recovery runs it again, rightly). Kill once every end is on disk.
    wait_for("every success to be journaled", lambda: journaled_successes(h) >= set(ids))
    first.kill()
    first.wait()
    h.proxy.resume()
    assert h.store.count(JobQuery()) == 0  # the ledger learnt nothing of them
    h.start_worker(successor, concurrency=1)
    wait_for(
        "the journaled writes to be replayed",
        lambda: h.store.count(JobQuery(states=SUCCEEDED)) == len(ids),
        timeout=30,
    )
    assert done_once(h, ids)  # first: a second run also shows as the successor's ownership
    for job in h.store.iter_jobs(JobQuery()):
        assert job.owner is not None and job.owner.startswith("w1:")  # the run that happened


def test_a_worker_stops_consuming_while_the_ledger_is_down_and_resumes(
    make_harness: Callable[..., Harness],
) -> None:
    """Invariant 9 without a loop: past the TTL the worker cancels its consumer, messages
    wait in the broker (none handed back and forth), and it consumes again once it beats."""
    import redis

    h = make_harness(REDIS, "postgresql", proxied=True, heartbeat_interval=1.0)
    assert h.proxy is not None
    worker = h.start_worker("w1", concurrency=2)
    h.proxy.pause()
    # Celery's own line: the worker's event loop carried out the cancel_consumer it was sent
    wait_for("the worker to stop consuming", lambda: "Canceling queue" in worker.output())
    ids = [h.app.send_task("e2e.work", args=[i], kwargs={"seconds": 0.05}).id for i in range(10)]
    broker = redis.Redis.from_url(REDIS)
    failed_beats = worker.output().count("heartbeat of")
    wait_for(  # two more beats: time in which a consuming worker would have taken them
        "two more failed beats", lambda: worker.output().count("heartbeat of") >= failed_beats + 2
    )
    assert broker.llen(h.queue) == len(ids) and h.runs() == []
    h.proxy.resume()
    try:
        wait_for("every job to succeed", lambda: done_once(h, ids), timeout=30)
    except TimeoutError as exc:
        pytest.fail(f"{exc}; runs: {h.runs()}; worker:\n{worker.output()[-8000:]}")
    wait_for(
        "the ledger to record them",
        lambda: h.store.count(JobQuery(states=SUCCEEDED)) == len(ids),
        timeout=30,
    )
    output = worker.output()
    assert output.count("stops consuming") == 1 and output.count("reaches the ledger again") == 1
    assert "Started consuming from" in output  # the add_consumer it was sent
    assert "handed back" not in output and not any(r[1] == "published" for r in h.runs())
    broker.close()


def test_a_worker_that_starts_during_an_outage_waits_for_the_ledger(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness(REDIS, "postgresql", proxied=True, heartbeat_interval=1.0)
    assert h.proxy is not None
    h.proxy.pause()
    ids = [h.app.send_task("e2e.work", args=[i]).id for i in range(3)]
    worker = h.spawn_worker("w1", concurrency=2)
    wait_for(
        "the worker to start without consuming",
        lambda: "ready." in worker.output() and "stops consuming" in worker.output(),
    )
    assert "cannot reach the ledger at start" in worker.output() and h.runs() == []
    h.proxy.resume()
    wait_for("every job to succeed", lambda: done_once(h, ids), timeout=30)


def test_an_unmigrated_ledger_stops_the_worker_at_once_with_one_line(
    make_harness: Callable[..., Harness], tmp_path: Path
) -> None:
    h = make_harness(REDIS)
    worker = h.spawn_worker("w1", JOBLEDGER_DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}")
    assert worker.wait(timeout=60) == 2
    output = worker.output()
    lines = [line for line in output.splitlines() if line.startswith("jobledger:")]
    assert len(lines) == 1 and "jobledger migrate" in lines[0], output
    assert "Traceback" not in output
