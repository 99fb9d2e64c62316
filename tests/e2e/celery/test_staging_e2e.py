"""The outbox end to end: jobs staged in a caller's transaction, published by the fast path
right after the commit or by the relay (the workers' thread, ``jobledger relay``), with real
Celery workers, a real Redis broker and real ledger databases.

What is counted: every body run per job id (the runs table), every message per task id in a
Redis list, every job in the ledger. Waits are conditions with deadlines; "the relay ran k
times since" is shown by k sentinel jobs that only the relay can publish, each committed after
the previous one ran.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from harness import (  # noqa: F401
    HERE,
    REDIS,
    Harness,
    make_harness_fixture,
    wait_for,
)
from outbox_app import cut_off_client, insert_staged, staged_records
from outbox_redis import RedisServer, SlowProxy, free_port, queue_length, queue_messages
from sqlalchemy import Engine, create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from jobledger.errors import StagingError
from jobledger.integrations.celery_staging import staged_record
from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.staging import staging_in
from jobledger.stores.sql import parse_url

STAGED = frozenset({JobState.STAGED})
QUEUED = frozenset({JobState.QUEUED})
SUCCEEDED = frozenset({JobState.SUCCEEDED})
#: The workers' relay thread: a short grace, a fast interval, a short backoff ceiling.
GRACE = 0.5
RELAY_ENV = {
    "JOBLEDGER_RELAY_GRACE": str(GRACE),
    "JOBLEDGER_RELAY_INTERVAL": "0.2",
    "JOBLEDGER_RELAY_MAX_BACKOFF": "1",
}


class Boom(Exception):
    """The caller's code failed inside its transaction."""


# -- helpers -------------------------------------------------------------------------------


def starts(h: Harness) -> Counter[str]:
    """How many times each job's body started."""
    return Counter(r[0] for r in h.runs() if r[1] == "start")


def dones(h: Harness) -> Counter[str]:
    return Counter(r[0] for r in h.runs() if r[1] == "done")


def business_engine(h: Harness) -> Engine:
    """The application's own engine on the ledger's database, with an ``outbox_orders`` table
    (on PostgreSQL its customer is a deferred foreign key: checked at COMMIT)."""
    engine = create_engine(parse_url(h.url))
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS outbox_orders"))
        conn.execute(text("DROP TABLE IF EXISTS outbox_customers"))
        conn.execute(text("CREATE TABLE outbox_customers (id VARCHAR(40) PRIMARY KEY)"))
        deferred = " DEFERRABLE INITIALLY DEFERRED" if h.ledger == "postgresql" else ""
        conn.execute(
            text(
                "CREATE TABLE outbox_orders (id VARCHAR(40) PRIMARY KEY, customer VARCHAR(40) "
                f"REFERENCES outbox_customers (id){deferred})"
            )
        )
        conn.execute(text("INSERT INTO outbox_customers VALUES ('alice')"))
    return engine


def add_order(db: Session | Any, order: str, customer: str = "alice") -> None:
    db.execute(
        text("INSERT INTO outbox_orders VALUES (:id, :customer)"),
        {"id": order, "customer": customer},
    )


def orders(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT id FROM outbox_orders")).scalars())


def relay_passes(h: Harness, count: int, timeout: float = 20.0) -> list[JobRecord]:
    """Wait for ``count`` passes of the workers' relay from now on: ``count`` staged jobs
    committed straight to the ledger (no fast path ever sees them), each after the previous one
    ran. Returns their records, checked to have been published by the relay, after its grace."""
    ran: list[JobRecord] = []
    for i in range(count):
        record = staged_record(h.app, "e2e.work", [-1 - i], {}, {})
        assert h.store.create(record)
        wait_for(
            f"relay sentinel {i + 1}/{count} to run",
            lambda job_id=record.id: (
                dones(h)[job_id] == 1
                and (j := h.store.get(job_id)) is not None
                and j.state is JobState.SUCCEEDED
            ),
            timeout=timeout,
        )
        job = h.store.get(record.id)
        assert job is not None and job.staged_at and job.started_at
        # (a worker may claim a job the relay published before the relay marks it queued: on
        # SQLite, without row locks, it can run with no queued_at at all)
        assert (job.started_at - job.staged_at).total_seconds() >= GRACE - 0.01
        ran.append(job)
    return ran


def jobledger_cli(
    h: Harness, *args: str, lease: float | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed console script, with nothing but the ledger's URL (and the relay's lease,
    if given) in its environment."""
    script = Path(sys.executable).with_name("jobledger")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBLEDGER_", "E2E_"))}
    env["JOBLEDGER_DATABASE_URL"] = h.url
    if lease is not None:
        env["JOBLEDGER_RELAY_LEASE"] = str(lease)
    return subprocess.run(
        [str(script), *args], cwd=h.tmp_path, env=env, capture_output=True, text=True, timeout=60
    )


def all_succeeded(h: Harness, ids: list[str]) -> bool:
    return h.store.count(JobQuery(states=SUCCEEDED, ids=frozenset(ids))) == len(ids)


@pytest.fixture(name="private_redis")
def private_redis_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (requested before ``make_harness``, so it is still up
    while the harness purges its queue at teardown)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.close()


# -- 1. rollback: no job, ever; commit: runs once -----------------------------------------


@pytest.mark.parametrize("ledger", ["postgresql", "sqlite"])
def test_rolled_back_jobs_never_exist_and_committed_ones_run_once(
    make_harness: Callable[..., Harness], ledger: str
) -> None:
    """Jobs staged through a Session or Connection on the ledger's database commit or roll
    back with the caller's rows (rollback, an exception, a savepoint, a COMMIT that fails): a
    rolled-back job is never in the ledger and never runs, however many relay passes go by; a
    committed one is published by the fast path and runs exactly once."""
    h = make_harness(REDIS, ledger)
    h.start_worker("w1", concurrency=2, **RELAY_ENV)
    engine = business_engine(h)
    work = h.app.tasks["e2e.work"]
    committed: list[str] = []
    rolled_back: list[str] = []
    sentinels: list[str] = []
    kept_orders: set[str] = set()

    for i in range(8):
        # a Session's transaction commits: task.apply_staged(using=session)
        with Session(engine) as session, session.begin():
            add_order(session, f"a{i}")
            committed.append(work.apply_staged([i], using=session).id)
        kept_orders.add(f"a{i}")
        # the same, rolled back by the caller
        with Session(engine) as session:
            add_order(session, f"b{i}")
            rolled_back.append(h.integration.stage(work, [i], using=session).id)
            session.rollback()
        # an exception out of the transaction block
        with pytest.raises(Boom), Session(engine) as session, session.begin():
            add_order(session, f"c{i}")
            rolled_back.append(h.integration.stage("e2e.work", [i], using=session).id)
            raise Boom
        # a savepoint rolled back inside a transaction that commits (staging_in + task.stage)
        with Session(engine) as session, session.begin(), staging_in(session):
            add_order(session, f"d{i}")
            committed.append(work.stage(i).id)
            savepoint = session.begin_nested()
            rolled_back.append(work.stage(i, seconds=0.0).id)
            savepoint.rollback()
        kept_orders.add(f"d{i}")
        # a Connection, commit as you go: a signature committed, then one rolled back
        with engine.connect() as conn:
            add_order(conn, f"e{i}")
            committed.append(h.integration.stage_signature(work.s(i), using=conn).id)
            conn.commit()
            add_order(conn, f"f{i}")
            rolled_back.append(h.integration.stage_signature(work.s(i), using=conn).id)
            conn.rollback()
        kept_orders.add(f"e{i}")

    if ledger == "postgresql":
        # the COMMIT itself fails (a deferred constraint): the transaction rolled back
        with Session(engine) as session:
            add_order(session, "g0", customer="nobody")
            rolled_back.append(work.apply_staged([100], using=session).id)
            with pytest.raises(sa_exc.IntegrityError):
                session.commit()
        # a job in a transaction still open is invisible to the relay, pass after pass
        held = Session(engine)
        add_order(held, "h0")
        pending = work.apply_staged([101], using=held).id
        sentinels += [j.id for j in relay_passes(h, 3)]
        assert h.store.get(pending) is None and pending not in starts(h)
        # committed now, it is past the relay's grace already (staged_at is the INSERT's
        # time): the fast path or the relay publishes it, whichever holds it first
        held.commit()
        held.close()
        committed.append(pending)
        kept_orders.add("h0")

    wait_for(
        "every committed job to run and succeed",
        lambda: all(dones(h)[i] == 1 for i in committed) and all_succeeded(h, committed),
    )
    # the workers' relay ran three more times after every rollback, past its grace
    sentinels += [j.id for j in relay_passes(h, 3)]

    ran = starts(h)
    assert all(ran[i] == 1 for i in committed), "a committed job ran twice or never"
    assert not set(rolled_back) & {r[0] for r in h.runs()}, "a rolled-back job ran"
    in_ledger = {j.id for j in h.store.iter_jobs(JobQuery())}
    assert not set(rolled_back) & in_ledger, "a rolled-back job is in the ledger"
    assert in_ledger == set(committed) | set(sentinels)
    extra = 1 if ledger == "postgresql" else 0  # the failed COMMIT's job, the held one's
    assert len(set(committed)) == len(committed) == 3 * 8 + extra
    assert len(set(rolled_back)) == len(rolled_back) == 4 * 8 + extra
    assert orders(engine) == kept_orders  # the business rows went the same way as the jobs
    # the broker was up: the fast path gave up on none. How many it published before the
    # workers' relay (grace 0.5 s) took one is up to the machine's load, not an invariant.
    counters = h.integration.outbox.counters
    assert 0 < counters["published"] <= len(committed)
    assert counters["left_to_relay"] == 0
    engine.dispose()


# -- 2. broker outage: staging goes on, the relay resumes by itself ------------------------


def test_broker_outage_staging_goes_on_and_the_relay_resumes_by_itself(
    private_redis: RedisServer,
    make_harness: Callable[..., Harness],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the broker down, 1,000 jobs stage and commit (the fast path tries the dead broker
    once per breaker period, not at each commit: counted, not timed), ``jobledger stats``
    shows them as the outbox backlog; when Redis comes back on the same port the running
    worker's relay publishes them by itself and each runs exactly once."""
    caplog.set_level(logging.WARNING, logger="jobledger.outbox")
    h = make_harness(private_redis.url, "postgresql")
    worker = h.start_worker("w1", concurrency=4, **RELAY_ENV)
    engine = business_engine(h)
    work = h.app.tasks["e2e.work"]
    with Session(engine) as session, session.begin():  # the broker is up: the fast path
        first = work.apply_staged([0], using=session).id
    wait_for("the first job to run", lambda: dones(h)[first] == 1)

    private_redis.stop()
    ids: list[str] = []
    began = time.monotonic()
    for t in range(100):  # 100 transactions of 10 jobs, each with its business row
        with Session(engine) as session, session.begin():
            add_order(session, f"o{t}")
            ids.extend(work.apply_staged([t * 10 + k], using=session).id for k in range(10))
    staging = time.monotonic() - began
    assert len(set(ids)) == 1000
    counters = h.integration.outbox.counters
    assert counters["staged"] == 1001 and counters["published"] == 1
    assert counters["left_to_relay"] == 1000
    # the fast path tried the dead broker once per breaker period, not at every commit
    tries = [r for r in caplog.records if "the broker failed a moment ago" not in r.getMessage()]
    breaker = h.integration.outbox.breaker
    assert breaker > 0 and 1 <= len(tries) <= 1 + staging // breaker, [
        r.getMessage() for r in tries
    ]

    stats = jobledger_cli(h, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    outbox = json.loads(stats.stdout)["outbox"]
    assert outbox["backlog"] == 1000
    assert outbox["oldest_staged_age"] > 0
    # the workers' relay tries, and is refused (it logs the backlog) while the broker is down
    wait_for(
        "the worker's relay to meet the outage", lambda: "relay: the broker" in worker.output()
    )
    assert h.store.count(JobQuery(states=STAGED)) == 1000

    private_redis.start()  # same port; nothing else is restarted
    wait_for(
        "all 1000 staged jobs to be published, run and succeed",
        lambda: all_succeeded(h, ids),
        timeout=60,
    )
    ran = starts(h)
    assert all(ran[i] == 1 for i in ids), "a job ran twice or never"
    assert all(dones(h)[i] == 1 for i in ids)
    assert worker.proc.poll() is None  # the same worker process, never restarted
    wait_for("the relay to say it resumed", lambda: "relay resumed" in worker.output())
    for job in h.store.iter_jobs(JobQuery(ids=frozenset(ids))):
        assert job.staged_at and job.queued_at and job.queued_at > job.staged_at
    assert h.store.count(JobQuery(states=STAGED)) == 0
    engine.dispose()


# -- 3. a relay SIGKILLed mid-batch --------------------------------------------------------


#: The relays' lease in this test: how long a killed relay's batch stays taken.
LEASE = 2.0


def leased(h: Harness) -> int:
    """Staged jobs a relay's lease holds (their owner says ``relay:…``)."""
    with h.store.engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT count(*) FROM jobledger_jobs WHERE state = 'staged' "
                "AND owner LIKE 'relay:%'"
            )
        ).scalar_one()
    return int(found)


def test_relay_killed_mid_batch_loses_nothing_and_runs_nothing_twice(
    make_harness: Callable[..., Harness],
) -> None:
    """``jobledger relay`` SIGKILLed part-way through publishing a batch: none of its jobs was
    marked queued, its lease ends, the next relay publishes them all again, and the claim
    guard skips every second delivery: each job runs exactly once, none is lost."""
    h = make_harness(REDIS, "postgresql")
    count, batch = 600, 250
    # committed staged jobs no fast path will publish (their client crashed after the commit)
    ids = insert_staged(h.store, staged_records(h.app, count))
    assert h.store.count(JobQuery(states=STAGED)) == count
    # the first relay reaches Redis through a proxy that holds every command 6ms: 1.5s a batch
    proxy = SlowProxy(REDIS, delay=0.006)
    proxy.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBLEDGER_", "E2E_"))}
    env.update(
        JOBLEDGER_DATABASE_URL=h.url,
        JOBLEDGER_RELAY_BATCH_SIZE=str(batch),
        JOBLEDGER_RELAY_LEASE=str(LEASE),
    )
    script = str(Path(sys.executable).with_name("jobledger"))
    log = (h.tmp_path / "relay1.log").open("wb")
    relay1 = subprocess.Popen(
        [script, "relay", "--broker", proxy.url, "--grace", "0"],
        cwd=h.tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()
    try:
        wait_for(
            "the relay to be part-way through its first batch",
            lambda: queue_length(REDIS, h.queue) >= 50 or relay1.poll() is not None,
        )
        os.killpg(relay1.pid, signal.SIGKILL)
        relay1.wait(10)
    finally:
        proxy.close()
    assert relay1.returncode == -signal.SIGKILL, (h.tmp_path / "relay1.log").read_text()
    # nothing it published was marked queued: its batch died with it
    assert h.store.count(JobQuery(states=STAGED)) == count
    assert leased(h) == batch  # its batch stays taken until the lease ends
    killed_at = h.store.now()
    wait_for("the killed relay's lease to end", lambda: h.store.now() > killed_at + LEASE)

    # a second relay, to completion, before any worker consumes: it publishes every staged
    # job, so each one the killed relay published is in the queue twice (a sure duplicate)
    relay2 = jobledger_cli(
        h, "relay", "--once", "--json", "--broker", REDIS, "--grace", "0", lease=LEASE
    )
    assert relay2.returncode == 0, relay2.stderr
    assert json.loads(relay2.stdout)["published"] == count
    assert h.store.count(JobQuery(states=QUEUED)) == count
    messages = Counter(m["headers"]["id"] for m in queue_messages(REDIS, h.queue))
    assert set(messages) == set(ids)
    twice = {i for i, n in messages.items() if n == 2}
    assert set(messages.values()) <= {1, 2}
    assert 50 <= len(twice) < batch, f"{len(twice)} published by the killed relay"

    worker = h.start_worker("w1", concurrency=4, **RELAY_ENV)
    wait_for("every job to succeed", lambda: all_succeeded(h, ids), timeout=45)
    wait_for("the queue to drain", lambda: queue_length(REDIS, h.queue) == 0)
    ran = starts(h)
    assert all(ran[i] == 1 for i in ids), "a job ran twice or never"
    assert sum(ran.values()) == count
    # each second copy was delivered and skipped by the claim guard (as already succeeded or,
    # on a machine slow enough for the copies to overlap, as running elsewhere)
    wait_for(
        "every duplicate delivery to be skipped",
        lambda: all(f"job {i} (e2e.work) not run: " in worker.output() for i in twice),
    )


# -- 4. relays side by side publish each job once ------------------------------------------


def overlapping(windows: list[tuple[int, float, float]]) -> list[tuple[int, int]]:
    """Pairs of relays (by index) that held a batch each at the same moment."""
    found = set()
    for a, start_a, end_a in windows:
        for b, start_b, end_b in windows:
            if a < b and start_a < end_b and start_b < end_a:
                found.add((a, b))
    return sorted(found)


def start_relay(h: Harness, n: int, go: Path) -> subprocess.Popen[bytes]:
    """Relay process ``n`` (:mod:`outbox_relay`), waiting at the start line for ``go``."""
    cmd = [
        sys.executable, str(HERE / "outbox_relay.py"), "--broker", REDIS,
        "--ready", str(h.tmp_path / f"ready{n}"), "--go", str(go),
        "--out", str(h.tmp_path / f"relay{n}.json"),
    ]  # fmt: skip
    env = h.env(f"relay{n}", JOBLEDGER_RELAY_BATCH_SIZE="250")
    with (h.tmp_path / f"relay{n}.log").open("wb") as log:
        return subprocess.Popen(
            cmd, cwd=h.tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("ledger", "count"),
    # SQLite has one writer: fewer jobs show the same in less time
    [("postgresql", 10_000), ("mariadb", 10_000), ("sqlite", 2_000)],
)
def test_parallel_relays_publish_each_job_once(
    make_harness: Callable[..., Harness], ledger: str, count: int
) -> None:
    """Four relay processes started at the same moment over one backlog publish every job
    exactly once (counted in the Redis list, without consumers), with batches held at the same
    time."""
    h = make_harness(REDIS, ledger)
    relays = 4
    ids = insert_staged(h.store, staged_records(h.app, count))
    assert h.store.count(JobQuery(states=STAGED)) == count
    go = h.tmp_path / "go"
    procs = [start_relay(h, n, go) for n in range(relays)]
    try:
        wait_for(
            "every relay at the start line",
            lambda: (
                all((h.tmp_path / f"ready{n}").exists() for n in range(relays))
                or any(p.poll() is not None for p in procs)
            ),
        )
        go.touch()
        for proc in procs:
            proc.wait(60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for n, proc in enumerate(procs):
        assert proc.returncode == 0, (h.tmp_path / f"relay{n}.log").read_text()
    reports = [json.loads((h.tmp_path / f"relay{n}.json").read_text()) for n in range(relays)]

    # every job's message is in the queue exactly once
    published = Counter(m["headers"]["id"] for m in queue_messages(REDIS, h.queue))
    assert set(published) == set(ids)
    twice = [i for i, n in published.items() if n > 1]
    ledger_errors = [e for r in reports for e in r["ledger_errors"]]
    assert not twice, (
        f"{len(twice)} jobs published more than once; {len(ledger_errors)} relay passes failed "
        f"on a ledger error, the first: {ledger_errors[:1]}"
    )
    assert sum(r["published"] for r in reports) == count
    assert not any(r["errors"] for r in reports)
    assert not ledger_errors, ledger_errors[:3]
    assert sum(published.values()) == count
    assert h.store.count(JobQuery(states=QUEUED)) == count
    per_relay = [r["published"] for r in reports]
    windows = [(n, b["start"], b["end"]) for n, r in enumerate(reports) for b in r["batches"]]
    # the relays shared the work, holding batches at the same time: the leases alone kept
    # those batches apart (taken with SKIP LOCKED, or by compare-and-set on SQLite)
    assert sum(1 for n in per_relay if n) >= 2, f"published per relay: {per_relay}"
    assert overlapping(windows), "the relays never held batches at the same time"


# -- 5. countdown and eta survive staging and the relay -----------------------------------


def test_countdown_and_eta_are_kept_through_the_fast_path_and_the_relay(
    make_harness: Callable[..., Harness],
) -> None:
    """``countdown`` and ``eta`` become an absolute eta at the call: a job published by the
    fast path or, seconds later, by the relay runs once, not before that eta and not a
    countdown after the relay's publish."""
    delay, grace = 4.0, 2.0  # the relay publishes half-way to the eta
    h = make_harness(REDIS, "postgresql")
    h.start_worker("w1", concurrency=2, **{**RELAY_ENV, "JOBLEDGER_RELAY_GRACE": str(grace)})
    engine = business_engine(h)
    # another client, whose broker is unreachable: its fast path fails, the relay publishes
    cut_off = cut_off_client(f"redis://127.0.0.1:{free_port()}/0", h.queue, h.settings)
    work, cut_off_work = h.app.tasks["e2e.work"], cut_off.app.tasks["e2e.work"]
    try:
        staged_at = datetime.now(timezone.utc)
        eta = staged_at + timedelta(seconds=delay)
        with Session(engine) as session, session.begin():
            fast = {
                "countdown": work.apply_staged([1], using=session, countdown=delay).id,
                "eta": h.integration.stage(work, [2], using=session, eta=eta).id,
            }
        with Session(engine) as session, session.begin():
            relayed = {
                "countdown": cut_off.stage(cut_off_work, [3], using=session, countdown=delay).id,
                "eta": cut_off.stage("e2e.work", [4], using=session, eta=eta.isoformat()).id,
            }
        assert h.integration.outbox.counters["published"] == 2
        assert cut_off.outbox.counters["left_to_relay"] == 2
        assert cut_off.outbox.counters["published"] == 0
    finally:
        cut_off.store.close()  # (not close(): that would unregister the harness's integration)
    ids = [*fast.values(), *relayed.values()]
    countdowns = {fast["countdown"], relayed["countdown"]}
    etas: dict[str, datetime] = {}
    for job_id in ids:  # the record keeps an absolute eta, whatever the call said
        job = h.store.get(job_id)
        assert job is not None and job.staged_at is not None
        etas[job_id] = datetime.fromisoformat(job.options["eta"])
        assert etas[job_id].tzinfo is not None, job.options
        if job_id in countdowns:  # the countdown counts from the staging call
            assert abs((etas[job_id] - job.staged_at).total_seconds() - delay) < 0.5
        else:
            assert etas[job_id] == eta
    states = {i: j.state for i in ids if (j := h.store.get(i)) is not None}
    assert [states[i] for i in fast.values()] == [JobState.QUEUED] * 2, "ran before its eta?"
    assert [states[i] for i in relayed.values()] == [JobState.STAGED] * 2

    wait_for("the four delayed jobs to succeed", lambda: all_succeeded(h, ids), timeout=30)
    ran = starts(h)
    assert all(ran[i] == 1 for i in ids), "a delayed job ran twice or never"
    started = {r[0]: r[3] for r in h.runs() if r[1] == "start"}
    for job_id in ids:
        job = h.store.get(job_id)
        assert job is not None and job.started_at is not None
        # never before its eta: by the worker's clock and by the ledger's
        assert started[job_id] >= etas[job_id].timestamp() - 0.05, (started[job_id], etas[job_id])
        assert job.started_at >= etas[job_id] - timedelta(seconds=0.1), (job, etas[job_id])
    for job_id in relayed.values():
        job = h.store.get(job_id)
        assert job is not None and job.queued_at and job.started_at and job.staged_at
        # published by the relay after its grace, and still run at the eta of the staging
        # call, not a countdown counted from the relay's publish
        assert job.queued_at - job.staged_at >= timedelta(seconds=grace - 0.05)
        assert job.started_at < job.queued_at + timedelta(seconds=delay - 1.0)
    engine.dispose()


# -- 6. bad input at the call --------------------------------------------------------------


def test_bad_input_is_refused_at_the_call_and_nothing_is_half_written(
    make_harness: Callable[..., Harness],
) -> None:
    """Unknown task, an Engine or a string as ``using=``, options that cannot be staged,
    wrong arguments, a chain, a transaction in another database or without the ledger's
    tables: StagingError at the call, nothing written, the caller's transaction still usable."""
    h = make_harness(REDIS, "postgresql")
    engine = business_engine(h)
    work = h.app.tasks["e2e.work"]
    refused: list[str] = []

    def refuse(call: Callable[[], object], why: str) -> None:
        with pytest.raises(StagingError, match=why) as caught:
            call()
        refused.append(str(caught.value))

    with Session(engine) as session, session.begin():
        add_order(session, "before")
        refuse(lambda: h.integration.stage("nope.task", [1], using=session), "not registered")
        refuse(lambda: h.integration.stage(work, [1], using=engine), "Engine holds no transaction")
        refuse(lambda: h.integration.stage(work, [1], using="default"), "cannot stage a job in")
        refuse(lambda: work.apply_staged([1], using=session, serializer="pickle"), "serializer")
        refuse(lambda: work.apply_staged([1], using=session, headers={"a": 1}), "headers")
        refuse(lambda: work.apply_staged([], using=session), "wrong arguments")
        refuse(lambda: work.apply_staged([1], using=session, countdown=-5), "countdown")
        refuse(lambda: work.apply_staged([1], using=session, eta="tomorrow"), "eta")
        chain = work.s(1) | work.s()
        refuse(lambda: h.integration.stage_signature(chain, using=session), "cannot be staged")
        add_order(session, "after")  # the caller's transaction is intact and commits
    assert orders(engine) >= {"before", "after"}

    # a transaction in another database, without the ledger's tables
    other = create_engine(f"sqlite:///{h.tmp_path / 'other.db'}")
    with other.begin() as conn:
        conn.execute(text("CREATE TABLE things (id TEXT PRIMARY KEY)"))
    with other.connect() as conn:
        conn.execute(text("INSERT INTO things VALUES ('one')"))
        refuse(lambda: h.integration.stage(work, [1], using=conn), "ledger is in")
        conn.execute(text("INSERT INTO things VALUES ('two')"))
        conn.commit()
    with other.connect() as conn:
        assert set(conn.execute(text("SELECT id FROM things")).scalars()) == {"one", "two"}
        tables = set(conn.execute(text("SELECT name FROM sqlite_master")).scalars())
        assert not {t for t in tables if t.startswith("jobledger")}
    other.dispose()

    # the ledger's own database, seen through a schema without the ledger's tables
    schema = f"outbox_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    elsewhere = create_engine(
        parse_url(h.url), connect_args={"options": f"-c search_path={schema}"}
    )
    try:
        with Session(elsewhere) as session, session.begin():
            session.execute(text("CREATE TABLE things (id TEXT PRIMARY KEY)"))
            session.execute(text("INSERT INTO things VALUES ('one')"))
            refuse(lambda: work.apply_staged([1], using=session), "ledger tables are not in")
            session.execute(text("INSERT INTO things VALUES ('two')"))
        with elsewhere.connect() as conn:
            assert set(conn.execute(text("SELECT id FROM things")).scalars()) == {"one", "two"}
    finally:
        elsewhere.dispose()
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))

    # nothing was written anywhere: no job, no publish, nothing counted as staged
    assert h.store.count(JobQuery()) == 0
    assert not h.integration.outbox.counters["staged"]
    assert queue_length(REDIS, h.queue) == 0
    assert len(refused) == 11 and all("\n" not in r for r in refused)  # one line each
    engine.dispose()


def test_a_refused_duplicate_job_id_leaves_the_callers_transaction_usable(
    make_harness: Callable[..., Harness],
) -> None:
    """``task_id=`` of a job that exists: StagingError, and the caller's transaction goes on
    (StagingError promises nothing was written; on PostgreSQL a failed INSERT would abort the
    whole transaction, silently rolling back the caller's own rows at COMMIT)."""
    h = make_harness(REDIS, "postgresql")
    engine = business_engine(h)
    work = h.app.tasks["e2e.work"]
    with Session(engine) as session, session.begin():
        existing = work.apply_staged([1], using=session).id
    with Session(engine) as session, session.begin():
        add_order(session, "kept")
        with pytest.raises(StagingError, match="exists already"):
            work.apply_staged([2], using=session, task_id=existing)
    assert orders(engine) == {"kept"}, "the caller's row was rolled back with the refused job"
    job = h.store.get(existing)
    assert job is not None and job.args == [1]
    engine.dispose()


def test_a_staged_untracked_task_is_refused_or_tracked(
    make_harness: Callable[..., Harness],
) -> None:
    """``e2e.untracked`` is not tracked (no ``tracked=True``, no ``track_all``): its body runs
    without the claim guard, so a staged record of it would say ``queued`` forever (and a
    duplicate delivery would run it twice). Staging it must be refused at the call, or the job
    must be tracked like any staged one."""
    h = make_harness(REDIS, "sqlite")
    try:
        job_id = h.integration.stage("e2e.untracked", [1]).id
    except StagingError:
        assert h.store.count(JobQuery()) == 0  # refused, and nothing written
        assert queue_length(REDIS, h.queue) == 0
        return
    h.start_worker("w1", concurrency=1, **RELAY_ENV)
    wait_for("the job to run", lambda: any(r[0] == job_id for r in h.runs()))
    wait_for(
        "the ledger to record the run",
        lambda: (j := h.store.get(job_id)) is not None and j.state is JobState.SUCCEEDED,
        timeout=5,
    )
