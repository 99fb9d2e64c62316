"""The outbox part of the Store contract: :meth:`Store.staged_batch` and
:meth:`StagedBatch.mark_queued`, one suite run unchanged against SQLite, PostgreSQL, MariaDB and
memory (the memory store on a :class:`ManualClock`, so its ages are its own clock's).

What the relay and the fast path rely on: a batch holds only committed ``staged`` jobs, oldest
staging first; the moves it marks happen when it ends well and never when it raises; and no two
batches, in threads or processes, ever hold the same job.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from jobledger.errors import ConfigError
from jobledger.model import CLAIMABLE_STATES, JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.stores import open_store
from jobledger.stores.base import Store, Transition
from jobledger.stores.memory import MemoryStore
from jobledger.stores.sql import SQLStore
from jobledger.stores.staging import staged_insert
from jobledger.testing import ManualClock, wait_for
from jobledger.testing.contract.records import CLOCK_SLACK, dt, epoch, ids, job
from ledgerdb import LEDGER_BACKENDS, ledger_url

S = JobState
STAGED = frozenset({S.STAGED})
STORE_BACKENDS = [*LEDGER_BACKENDS, "memory"]


@pytest.fixture(params=STORE_BACKENDS)
def store(request: pytest.FixtureRequest, make_store: Callable[[str], Store]) -> Store:
    """Every store; the memory one on a manual clock years behind the host's, so a store that
    judged ages on ``time.time()`` instead of its own clock would find every job old."""
    if request.param == "memory":
        return MemoryStore(clock=ManualClock(start=1_000_000_000.0))
    return make_store(str(request.param))


def stage(store: Store, job_id: str, *, age: float = 0.0, **fields: Any) -> JobRecord:
    """Create a staged job that entered ``staged`` ``age`` seconds ago on the store's clock."""
    fields.setdefault("system", "celery")
    record = job(job_id, state=S.STAGED, staged_at=dt(store.now() - age), **fields)
    assert store.create(record)
    return record


def state_of(store: Store, job_id: str) -> JobState:
    record = store.get(job_id)
    assert record is not None, job_id
    return record.state


def held(store: Store, **options: Any) -> list[str]:
    """The ids one batch holds (and lets go of, unmarked)."""
    options.setdefault("limit", 1000)
    with store.staged_batch(**options) as batch:
        return [r.id for r in batch.records]


def is_sqlite(store: Store) -> bool:
    return isinstance(store, SQLStore) and store.dialect == "sqlite"


# -- what a batch holds --------------------------------------------------------------------------


def test_a_batch_holds_only_staged_jobs(store: Store) -> None:
    stage(store, "staged-1", age=20)
    stage(store, "staged-2", age=10)
    for state in S:
        if state is not S.STAGED:
            owner = "w:1" if state is S.STARTED else None
            assert store.create(job(f"job-{state.value}", state=state, owner=owner))
    with store.staged_batch(limit=100) as batch:
        assert [r.id for r in batch.records] == ["staged-1", "staged-2"]
        assert all(r.state is S.STAGED for r in batch.records)
        first = batch.records[0]
        assert (first.name, first.system, first.owner) == ("tasks.example", "celery", None)


def test_an_empty_ledger_gives_an_empty_batch(store: Store) -> None:
    with store.staged_batch(limit=10) as batch:
        assert batch.records == []
        assert batch.mark_queued([]) == 0
        assert batch.mark_queued(["nope"]) == 0
    assert store.count(JobQuery()) == 0


def test_oldest_staging_first_and_at_most_limit(store: Store) -> None:
    for job_id, age in [("c", 30), ("a", 10), ("e", 50), ("b", 20), ("d", 40)]:
        stage(store, job_id, age=age)
    assert held(store) == ["e", "d", "c", "b", "a"]
    assert held(store, limit=2) == ["e", "d"]
    assert held(store, limit=1) == ["e"]
    # Jobs staged at the same moment come in some order, all before younger ones.
    now = store.now()
    for job_id in ("tie-b", "tie-a", "tie-c"):
        assert store.create(job(job_id, state=S.STAGED, staged_at=dt(now - 100)))
    first = held(store, limit=4)
    assert sorted(first[:3]) == ["tie-a", "tie-b", "tie-c"] and first[3] == "e"


def test_older_than_is_judged_on_the_store_clock(store: Store) -> None:
    stage(store, "old", age=100)
    stage(store, "middle", age=40)
    stage(store, "fresh")
    assert held(store, older_than=60) == ["old"]
    assert held(store, older_than=30) == ["old", "middle"]
    assert held(store, older_than=0) == ["old", "middle", "fresh"]
    assert held(store, older_than=1000) == []


def test_older_than_follows_the_memory_clock_to_the_boundary() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    stage(store, "job-1")
    assert held(store, older_than=5) == []
    clock.advance(4.75)
    assert held(store, older_than=5) == []
    clock.advance(0.25)
    assert held(store, older_than=5) == ["job-1"]  # exactly ``older_than`` old counts


def test_ids_and_systems_narrow_the_batch(store: Store) -> None:
    stage(store, "c-1", age=30)
    stage(store, "c-2", age=20)
    stage(store, "rq-1", age=25, system="rq")
    stage(store, "rq-2", age=15, system="rq")
    assert store.create(job("queued-1", system="celery"))
    # a fast path's batch comes in no particular order (the primary key serves it)
    assert sorted(held(store, ids=["c-2", "rq-1", "queued-1", "unknown"])) == ["c-2", "rq-1"]
    assert held(store, ids=[]) == []
    assert held(store, systems={"rq"}) == ["rq-1", "rq-2"]
    assert held(store, systems={"celery", "rq"}) == ["c-1", "rq-1", "c-2", "rq-2"]
    assert held(store, systems={"sidekiq"}) == []
    assert held(store, ids={"c-1", "c-2", "rq-2"}, systems=["celery"]) == ["c-1", "c-2"]
    assert held(store, ids=("c-1", "rq-1"), older_than=28) == ["c-1"]
    assert held(store, systems=["rq"], limit=1) == ["rq-1"]


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "10", None])
def test_a_bad_limit_is_a_config_error(store: Store, limit: Any) -> None:
    stage(store, "job-1")
    with pytest.raises(ConfigError), store.staged_batch(limit=limit):
        pytest.fail("a batch with a bad limit must not start")
    assert state_of(store, "job-1") is S.STAGED
    assert held(store) == ["job-1"]  # nothing left held (nor, on SQLite, locked)


# -- marking ---------------------------------------------------------------------------------------


def test_mark_queued_moves_held_jobs_when_the_batch_ends(store: Store) -> None:
    for n in range(4):
        stage(store, f"job-{n}", age=50 - n)
    before = store.now()
    with store.staged_batch(limit=10) as batch:
        assert batch.mark_queued(["job-0", "job-2"]) == 2
        assert batch.mark_queued(["job-0"]) == 0  # marked already: counted once
        # Not yet: another reader still sees them staged until the batch ends.
        assert state_of(store, "job-0") is S.STAGED
        assert state_of(store, "job-2") is S.STAGED
    after = store.now()
    for job_id in ("job-0", "job-2"):
        got = store.get(job_id)
        assert got is not None
        assert (got.state, got.owner) == (S.QUEUED, None)
        assert before - CLOCK_SLACK <= epoch(got.queued_at) <= after + CLOCK_SLACK
        assert got.first_queued_at == got.queued_at
        assert got.updated_at == got.queued_at
        assert got.staged_at is not None and epoch(got.staged_at) < epoch(got.queued_at)
    for job_id in ("job-1", "job-3"):
        got = store.get(job_id)
        assert got is not None
        assert (got.state, got.queued_at, got.first_queued_at) == (S.STAGED, None, None)
    assert held(store) == ["job-1", "job-3"]


def test_mark_queued_moves_only_jobs_the_batch_holds(store: Store) -> None:
    """An id the batch does not hold (past its limit, another batch's, not staged) is neither
    moved nor counted: marking it queued would record a publish that never happened."""
    stage(store, "held-1", age=30)
    stage(store, "held-2", age=20)
    stage(store, "not-held", age=10)
    assert store.create(job("queued-1"))
    with store.staged_batch(limit=2) as batch:
        assert ids(batch.records) == {"held-1", "held-2"}
        assert batch.mark_queued(["held-1", "not-held", "queued-1", "unknown"]) == 1
    assert state_of(store, "held-1") is S.QUEUED
    assert state_of(store, "not-held") is S.STAGED
    assert state_of(store, "held-2") is S.STAGED


class Boom(Exception):
    pass


def test_an_exception_in_the_batch_undoes_its_moves(store: Store) -> None:
    stage(store, "job-1", age=20)
    stage(store, "job-2", age=10)
    with pytest.raises(Boom), store.staged_batch(limit=10) as batch:
        assert batch.mark_queued(["job-1", "job-2"]) == 2
        raise Boom("the process failed after publishing")
    for job_id in ("job-1", "job-2"):
        got = store.get(job_id)
        assert got is not None
        assert (got.state, got.queued_at, got.first_queued_at) == (S.STAGED, None, None)
    # Nothing is left held or locked: the next batch takes them again.
    with store.staged_batch(limit=10) as batch:
        assert [r.id for r in batch.records] == ["job-1", "job-2"]
        assert batch.mark_queued(["job-1", "job-2"]) == 2
    assert {state_of(store, "job-1"), state_of(store, "job-2")} == {S.QUEUED}


def test_a_job_claimed_while_held_is_not_marked_back_to_queued(store: Store) -> None:
    """A worker may start a staged job while a batch holds it (the message of an earlier publish
    came first). The batch's mark must not move the running job back to queued. PostgreSQL and
    MariaDB make the claim wait for the batch; SQLite and memory let it through at once."""
    stage(store, "claimed", age=20)
    stage(store, "other", age=10)
    claim = Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner="w:1")
    outcome: dict[str, Any] = {}

    def worker() -> None:
        try:
            outcome["won"] = store.transition("claimed", claim)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=worker)
    try:
        with store.staged_batch(limit=10) as batch:
            assert ids(batch.records) == {"claimed", "other"}
            thread.start()
            wait_for("the worker's claim", lambda: outcome)  # a lease holds up no claim
            batch.mark_queued(["claimed", "other"])
    finally:
        thread.join(60)
    assert not thread.is_alive()
    assert outcome == {"won": True}
    got = store.get("claimed")
    assert got is not None
    assert (got.state, got.owner, got.attempts) == (S.STARTED, "w:1", 1)
    assert state_of(store, "other") is S.QUEUED


def done_while_held(
    store: Store, batch: dict[str, Any], actions: dict[str, Callable[[], object]]
) -> dict[str, object]:
    """Run each action in a thread of its own while a batch (``batch``: its options) is held,
    unmarked; what each returned before the batch ended. An action that waits for the batch
    is missing from the result (the batch ends after 5 s, so a failing test does not hang)."""
    results: dict[str, object] = {}

    def run(name: str, action: Callable[[], object]) -> None:
        try:
            results[name] = action()
        except BaseException as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in actions.items()]
    try:
        with store.staged_batch(**batch) as held_batch:
            assert held_batch.records, "the batch under test holds nothing"
            for thread in threads:
                thread.start()
            with contextlib.suppress(TimeoutError):
                wait_for("every action", lambda: len(results) == len(actions), timeout=5)
            during = dict(results)
    finally:
        for thread in threads:
            if thread.ident is not None:
                thread.join(120)
    return during


#: The batches a relay and a fast path hold: every staged job old enough (the relay's usual
#: case: its backlog is smaller than its batch), and the few ids one transaction staged.
BATCHES = {
    "relay": {"limit": 500, "older_than": 30},
    "fast path": {"limit": 4, "ids": ["mine-0", "mine-1", "mine-2", "mine-3"]},
}


@pytest.mark.parametrize("kind", list(BATCHES))
def test_a_held_batch_holds_up_no_other_job(store: Store, kind: str) -> None:
    """While a batch publishes (a broker round trip; seconds with a slow broker) workers go on
    claiming and finishing other jobs and the application goes on staging: the batch must not
    hold up writes to jobs it does not hold."""
    for n in range(4):
        stage(store, f"mine-{n}", age=60 + n)
    stage(store, "theirs", age=0)  # another transaction's, committed a moment ago
    for n in range(3):
        assert store.create(job(f"queued-{n}"))
    assert store.create(job("running", state=S.STARTED, owner="w:1", attempts=1))
    claim = Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner="w:2")
    finish = Transition(to=S.SUCCEEDED, expect=frozenset({S.STARTED}), expect_owner="w:1")
    during = done_while_held(
        store,
        BATCHES[kind],
        {
            "claim a queued job": lambda: store.transition("queued-1", claim),
            "finish a running job": lambda: store.transition("running", finish),
            "stage a new job": lambda: store.create(job("new", state=S.STAGED)),
        },
    )
    assert during == {
        "claim a queued job": True,
        "finish a running job": True,
        "stage a new job": True,
    }, "held up by the batch"


def test_fast_paths_side_by_side_each_hold_their_own_jobs(store: Store) -> None:
    """Two transactions commit at once and their fast paths run side by side: each holds the
    jobs its transaction staged. A job skipped here is silently left to the relay (seconds
    late, and counted nowhere)."""
    for n in range(4):
        stage(store, f"mine-{n}", age=10 + n)
    for n in range(2):
        stage(store, f"theirs-{n}", age=20 + n)
    assert store.create(job("queued-0"))
    with store.staged_batch(limit=4, ids=[f"mine-{n}" for n in range(4)]) as mine:
        assert len(mine.records) == 4
        with store.staged_batch(limit=2, ids=["theirs-0", "theirs-1"]) as theirs:
            assert ids(theirs.records) == {"theirs-0", "theirs-1"}
            assert theirs.mark_queued(["theirs-0", "theirs-1"]) == 2
        assert mine.mark_queued([r.id for r in mine.records]) == 4
    assert store.count(JobQuery(states={S.QUEUED})) == 7


def test_a_staged_job_not_yet_committed_is_not_seen(sql_store: SQLStore) -> None:
    """The caller's transaction has staged a job and not committed: no batch sees it. (On
    SQLite a batch, which writes its lease, waits for that one writer: nothing to look at.)"""
    stage(sql_store, "committed", age=10)
    with sql_store.engine.connect() as conn:
        conn.execute(staged_insert(job("uncommitted", state=S.STAGED), sql_store.dialect))
        if sql_store.dialect != "sqlite":
            assert held(sql_store, ids=["committed", "uncommitted"]) == ["committed"]
            assert held(sql_store) == ["committed"]
        conn.commit()
    assert held(sql_store) == ["committed", "uncommitted"]


# -- batches side by side -------------------------------------------------------------------------


def test_two_batches_at_once_never_hold_the_same_job(store: Store) -> None:
    for n in range(20):
        stage(store, f"job-{n:02d}", age=100 - n)
    first_in = threading.Event()
    second_done = threading.Event()
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with store.staged_batch(limit=10) as batch:
                got["first"] = [r.id for r in batch.records]
                first_in.set()
                # The second batch must run to its end while this one holds its jobs; if it
                # waits on this one instead, end this one so the test fails fast, not hangs.
                if not second_done.wait(5):
                    errors.append(AssertionError("the second batch waited for the first"))
                batch.mark_queued(got["first"])
        except BaseException as exc:
            errors.append(exc)
            first_in.set()

    def second() -> None:
        try:
            if not first_in.wait(60):
                raise TimeoutError("the first batch never started")
            with store.staged_batch(limit=10) as batch:
                got["second"] = [r.id for r in batch.records]
                batch.mark_queued(got["second"])
        except BaseException as exc:
            errors.append(exc)
        finally:
            second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got["first"] == [f"job-{n:02d}" for n in range(10)]
    assert got["second"] == [f"job-{n:02d}" for n in range(10, 20)]
    marked = set(got["first"]) | set(got["second"])
    assert store.count(JobQuery(states={S.QUEUED})) == len(marked)
    assert all(state_of(store, job_id) is S.QUEUED for job_id in marked)


def drain(store: Store, batch_size: int, deadline: float) -> list[str]:
    """What one relay does: take batches and mark all of each, until nothing is staged."""
    taken: list[str] = []
    pause = threading.Event()
    while store.count(JobQuery(states=STAGED)):
        if time.monotonic() > deadline:
            raise TimeoutError("staged jobs are left")
        with store.staged_batch(limit=batch_size) as batch:
            found = [r.id for r in batch.records]
            taken.extend(found)
            assert batch.mark_queued(found) == len(found)
        if not found:  # all held by the others (SQLite: the relay lock is taken)
            pause.wait(0.01)
    return taken


def test_relays_in_threads_take_every_job_exactly_once(store: Store) -> None:
    job_ids = [f"job-{n:03d}" for n in range(120)]
    now = store.now()
    for n, job_id in enumerate(job_ids):
        assert store.create(job(job_id, state=S.STAGED, staged_at=dt(now - 500 + n)))
    deadline = time.monotonic() + 60
    start = threading.Barrier(4, timeout=60)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def relay() -> None:
        try:
            start.wait()
            results.append(drain(store, 7, deadline))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=relay) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    taken = [job_id for result in results for job_id in result]
    assert sorted(taken) == job_ids, "a job was held by two batches, or by none"
    assert store.count(JobQuery(states={S.QUEUED})) == len(job_ids)


def _relay_process(url: str, start: Any, results: Any) -> None:
    """A relay in a child process (forked): its own store, released with the others."""
    try:
        store = open_store(url)
        store.now()  # connect before the gun, so only the batches race
        start.wait(60)
        taken = drain(store, 5, time.monotonic() + 60)
        store.close()
        results.put(taken)
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "redis"])
def test_relays_in_processes_take_every_job_exactly_once(
    backend: str, make_store: Callable[[str], Store]
) -> None:
    server_store = make_store(backend)
    processes = 3
    job_ids = [f"job-{n:03d}" for n in range(90)]
    now = server_store.now()
    for n, job_id in enumerate(job_ids):
        assert server_store.create(job(job_id, state=S.STAGED, staged_at=dt(now - 500 + n)))
    context = multiprocessing.get_context("fork")
    start = context.Barrier(processes)
    results = context.Queue()
    url = ledger_url(server_store)
    children = [
        context.Process(target=_relay_process, args=(url, start, results)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        reports = [results.get(timeout=90) for _ in children]
    finally:
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
    assert all(isinstance(r, list) for r in reports), reports
    taken = [job_id for report in reports for job_id in report]
    assert sorted(taken) == job_ids, "a job was held by two relays, or by none"
    assert server_store.count(JobQuery(states={S.QUEUED})) == len(job_ids)


def test_a_refused_job_fails_and_leaves_the_rest_to_go(store: Store) -> None:
    """The queue system refused one job's message itself (no such queue): it fails with the
    reason, for a person, instead of heading every batch after it."""
    stage(store, "poison", age=30)
    stage(store, "fine", age=20)
    with store.staged_batch(limit=10) as batch:
        assert batch.mark_refused({"poison": "Queue 'gone' missing", "unknown": "?"}) == 1
        assert batch.mark_queued(["fine", "poison"]) == 1  # refused is refused
    poison = store.get("poison")
    assert poison is not None and poison.state is S.FAILED
    assert poison.owner is None  # the lease is not an owner a person should see
    assert poison.error == "the queue system refused the message: Queue 'gone' missing"
    assert state_of(store, "fine") is S.QUEUED
    assert held(store) == []
