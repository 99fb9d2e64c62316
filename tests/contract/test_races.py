"""Races on the real servers (the SQL databases and Redis): many threads, and several
processes, fighting over the same claim and the same lock. Compare-and-set promises exactly
one winner every time."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import race_workers

from jobledger.errors import UniqueKeyHeld
from jobledger.model import CLAIMABLE_STATES, JobState
from jobledger.query import JobQuery
from jobledger.stores.base import Store, Transition
from jobledger.stores.redis import RedisStore
from jobledger.stores.schema import locks
from jobledger.stores.sql import SQLStore
from jobledger.testing.contract.records import job
from ledgerdb import LEDGER_BACKENDS, ledger_url

T = TypeVar("T")

THREADS = 16
JOBS = 50
TAKEOVERS = 30
PROCESSES = 3


@pytest.fixture(params=LEDGER_BACKENDS)
def server_store(request: pytest.FixtureRequest, make_store: Callable[[str], Store]) -> Store:
    """A migrated, empty ledger on each real server."""
    return make_store(str(request.param))


@pytest.fixture
def racer(server_store: Store) -> Iterator[Store]:
    """A store on that ledger with a connection for every thread, so all of them really
    reach the server at once (redis-py's pool grows to one per thread by itself)."""
    if isinstance(server_store, RedisStore):
        yield server_store
        return
    assert isinstance(server_store, SQLStore)
    url = ledger_url(server_store)
    store = SQLStore(url, engine_options={"pool_size": THREADS, "max_overflow": 4})
    yield store
    store.close()


def fight(rounds: int, attempt: Callable[[int, int], T]) -> list[list[T]]:
    """Run ``attempt(round, thread)`` on THREADS threads released together by a barrier for
    each round; the results by round, then thread."""
    barrier = threading.Barrier(THREADS, timeout=60)
    results: list[list[T | None]] = [[None] * THREADS for _ in range(rounds)]
    errors: list[BaseException] = []

    def run(thread: int) -> None:
        try:
            for n in range(rounds):
                barrier.wait()
                results[n][thread] = attempt(n, thread)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results  # type: ignore[return-value]


def test_threads_claiming_the_same_job_have_one_winner(racer: Store) -> None:
    for n in range(JOBS):
        assert racer.create(job(f"job-{n}"))

    def attempt(n: int, thread: int) -> bool:
        claim = Transition(to=JobState.STARTED, expect=CLAIMABLE_STATES, owner=f"w:{thread}")
        return racer.transition(f"job-{n}", claim)

    for n, outcome in enumerate(fight(JOBS, attempt)):
        assert outcome.count(True) == 1, f"job-{n}: {outcome.count(True)} winners"
        record = racer.get(f"job-{n}")
        assert record is not None
        assert record.owner == f"w:{outcome.index(True)}"
        assert (record.state, record.attempts) == (JobState.STARTED, 1)


def test_threads_creating_jobs_with_one_unique_key_have_one_winner(racer: Store) -> None:
    """Each round every thread creates a job of its own id with the round's key: exactly one
    is created, and every other thread is told the winner's id."""

    def attempt(n: int, thread: int) -> str:
        try:
            assert racer.create(job(f"job-{n}-{thread}", unique_key=f"key-{n}"))
        except UniqueKeyHeld as held:
            return held.holder
        return f"job-{n}-{thread}"

    for n, outcome in enumerate(fight(JOBS, attempt)):
        winners = set(outcome)
        assert len(winners) == 1, f"round {n}: {sorted(winners)}"
        assert racer.count(JobQuery(ids=frozenset(f"job-{n}-{t}" for t in range(THREADS)))) == 1


def test_threads_finishing_against_a_takeover_have_one_winner(racer: Store) -> None:
    """Half the threads finish as the old owner, half take the job over: one of them wins."""
    for n in range(TAKEOVERS):
        assert racer.create(job(f"job-{n}", state=JobState.STARTED, owner="w:old"))

    def attempt(n: int, thread: int) -> bool:
        if thread % 2:
            change = Transition(
                to=JobState.SUCCEEDED, expect=frozenset({JobState.STARTED}), expect_owner="w:old"
            )
        else:
            change = Transition(
                to=JobState.STARTED,
                expect=frozenset({JobState.STARTED}),
                expect_owner="w:old",
                owner=f"w:{thread}",
                reason="recovery",
            )
        return racer.transition(f"job-{n}", change)

    for n, outcome in enumerate(fight(TAKEOVERS, attempt)):
        assert outcome.count(True) == 1, f"job-{n}: {outcome.count(True)} winners"
        record = racer.get(f"job-{n}")
        assert record is not None
        winner = outcome.index(True)
        if winner % 2:
            assert (record.state, record.owner, record.recoveries) == (
                JobState.SUCCEEDED,
                "w:old",
                0,
            )
        else:
            assert (record.state, record.owner, record.recoveries) == (
                JobState.STARTED,
                f"w:{winner}",
                1,
            )


def test_threads_creating_the_same_job_have_one_winner(racer: Store) -> None:
    """The missing-record path of a claim (and the relay) creates; one creator wins."""

    def attempt(n: int, thread: int) -> bool:
        return racer.create(job(f"job-{n}", name=f"by-{thread}"))

    for n, outcome in enumerate(fight(20, attempt)):
        assert outcome.count(True) == 1, f"job-{n}: {outcome.count(True)} creators"
        record = racer.get(f"job-{n}")
        assert record is not None and record.name == f"by-{outcome.index(True)}"
    assert racer.count(JobQuery()) == 20


def test_threads_taking_the_same_lock_have_one_holder(racer: Store) -> None:
    rounds = 30
    # Half the rounds fight over a free lock (insert), half over an expired one (update).
    # (Redis drops an expired lock's key itself: every round there fights over a free lock.)
    expired = [{"name": f"lock-{n}", "token": "gone", "expires_at": 0.0} for n in range(0, 30, 2)]
    if isinstance(racer, SQLStore):
        with racer.engine.begin() as conn:
            conn.execute(locks.insert(), expired)

    def attempt(n: int, thread: int) -> bool:
        return racer.acquire_lock(f"lock-{n}", f"t{thread}", ttl=60)

    for n, outcome in enumerate(fight(rounds, attempt)):
        assert outcome.count(True) == 1, f"lock-{n}: {outcome.count(True)} holders"
        holder = f"t{outcome.index(True)}"
        others = [f"t{t}" for t in range(THREADS) if f"t{t}" != holder]
        assert racer.acquire_lock(f"lock-{n}", holder, ttl=60)
        assert not any(racer.release_lock(f"lock-{n}", t) for t in others)
        assert racer.release_lock(f"lock-{n}", holder)


@pytest.fixture(scope="module")
def claimers() -> Iterator[tuple[list[Any], Any]]:
    """PROCESSES spawned children that claim jobs on command (see ``race_workers``): their
    command queues and the queue they report on. One set serves every backend's test."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    commands = [context.Queue() for _ in range(PROCESSES)]
    processes = [
        context.Process(target=race_workers.serve_claims, args=(queue, start, results))
        for queue in commands
    ]
    for process in processes:
        process.start()
    yield commands, results
    for queue in commands:
        queue.put(None)
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.kill()


def test_processes_claiming_the_same_jobs_claim_each_once(
    server_store: Store, claimers: tuple[list[Any], Any]
) -> None:
    commands, results = claimers
    job_ids = [f"job-{n:03d}" for n in range(100)]
    for job_id in job_ids:
        assert server_store.create(job(job_id))
    owners = [f"proc-{p}:1" for p in range(PROCESSES)]
    for queue, owner in zip(commands, owners, strict=True):
        queue.put((ledger_url(server_store), owner, job_ids, None))
    reports = dict(results.get(timeout=120) for _ in owners)
    assert set(reports) == set(owners)
    assert all(isinstance(won, list) for won in reports.values()), reports
    winners: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    for owner, won in reports.items():
        for job_id in won:
            winners[job_id].append(owner)
    assert {job_id: len(w) for job_id, w in winners.items()} == dict.fromkeys(job_ids, 1)
    for record in server_store.iter_jobs(JobQuery()):
        assert (record.state, record.attempts) == (JobState.STARTED, 1)
        assert record.owner == winners[record.id][0]
    assert server_store.count(JobQuery(states={JobState.STARTED})) == len(job_ids)


def test_processes_publishing_one_unique_key_create_one_job(
    server_store: Store, claimers: tuple[list[Any], Any]
) -> None:
    """Every child creates its own 300 jobs holding one key, all at once: one job exists."""
    commands, results = claimers
    owners = [f"proc-{p}:1" for p in range(PROCESSES)]
    for queue, owner in zip(commands, owners, strict=True):
        ids = [f"{owner}-{n:03d}" for n in range(300)]
        queue.put((ledger_url(server_store), owner, ids, "invoice:1"))
    reports = dict(results.get(timeout=120) for _ in owners)
    assert all(isinstance(won, list) for won in reports.values()), reports
    won = [job_id for ids in reports.values() for job_id in ids]
    assert len(won) == 1 and server_store.count(JobQuery()) == 1
    assert [r.id for r in server_store.iter_jobs(JobQuery())] == won
