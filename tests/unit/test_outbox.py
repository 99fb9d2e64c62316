"""The outbox in one process: staging with and without a caller's transaction, the fast path
after the commit, its breaker while the broker is down, and finding the transaction holder.

The broker is a :class:`Broker` that records what it was handed and takes all, some or none of
it; the store a :class:`MemoryStore` on a :class:`ManualClock` (a SQLite file where the test is
about which database a transaction writes to). Transactions are a :class:`FakeTransaction` the
test commits or rolls back by hand, registered as a holder kind like the SQLAlchemy and Django
adapters; the real adapters are tested in ``tests/integration/test_sqlalchemy_staging.py``.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from jobledger.errors import PublishError, StagingError, StoreUnavailable
from jobledger.integrations.base import Published
from jobledger.model import JobRecord, JobState, to_datetime
from jobledger.outbox import DEFAULT_BREAKER, Outbox
from jobledger.query import JobQuery
from jobledger.staging import Flush, hand_over, holders, staging_in
from jobledger.stores.base import StagedBatch, Store
from jobledger.stores.sql import SQLStore
from jobledger.testing import ManualClock, MemoryStore

S = JobState


@dataclass
class Broker:
    """A publisher: records each batch it is handed; takes the first ``take`` jobs of a batch
    (all when None), then refuses the next one, or raises ``crash``."""

    take: int | None = None
    crash: BaseException | None = None
    batches: list[list[str]] = field(default_factory=list)

    def __call__(self, records: Sequence[JobRecord]) -> Published:
        self.batches.append([r.id for r in records])
        assert all(r.state is S.STAGED for r in records)
        if self.crash is not None:
            raise self.crash
        done = Published()
        for record in records:
            if self.take is not None and len(done.ids) >= self.take:
                done.error = PublishError(f"broker refused {record.id}: connection reset")
                break
            done.ids.append(record.id)
        return done

    @property
    def published(self) -> list[str]:
        """Ids handed over, in order, refused ones included."""
        return [job_id for batch in self.batches for job_id in batch]


class FakeTransaction:
    """A caller's transaction: jobs staged in it reach the store when the test commits it."""

    def __init__(self, store: Store, database: str | None = None) -> None:
        self.store = store
        self.database = database
        self.pending: list[JobRecord] = []
        self.hooks: list[tuple[str, Flush]] = []

    def commit(self) -> None:
        for record in self.pending:
            assert self.store.create(record)
        hooks, self.pending, self.hooks = self.hooks, [], []
        hand_over(hooks)

    def rollback(self) -> None:
        self.pending, self.hooks = [], []


class FakeHolder:
    def __init__(self, transaction: FakeTransaction) -> None:
        self.transaction = transaction
        self.database = transaction.database

    def insert(self, record: JobRecord) -> None:
        assert record.state is S.STAGED
        self.transaction.pending.append(record)

    def after_commit(self, job_id: str, flush: Flush) -> None:
        self.transaction.hooks.append((job_id, flush))

    def ledger_id(self) -> str | None:
        return None  # a memory store has no ledger id to compare


def _adapt(using: object) -> FakeHolder | None:
    return FakeHolder(using) if isinstance(using, FakeTransaction) else None


holders.register(_adapt)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


@pytest.fixture
def broker() -> Broker:
    return Broker()


@pytest.fixture
def outbox(store: MemoryStore, broker: Broker, clock: ManualClock) -> Outbox:
    return Outbox(store, publish=broker, clock=clock)


def job(job_id: str, **fields: Any) -> JobRecord:
    fields.setdefault("name", "tasks.send")
    fields.setdefault("system", "celery")
    return JobRecord(id=job_id, **fields)


def staged(store: Store, *job_ids: str) -> list[str]:
    """Committed staged jobs, one second apart (the first oldest), as a crash left them."""
    now = store.now()
    for n, job_id in enumerate(job_ids):
        moment = to_datetime(now - len(job_ids) + n)
        assert store.create(job(job_id, state=S.STAGED, staged_at=moment))
    return list(job_ids)


def state(store: Store, job_id: str) -> JobState | None:
    record = store.get(job_id)
    return None if record is None else record.state


# -- without a transaction ----------------------------------------------------------------------


def test_stage_without_a_transaction_publishes_at_once(
    outbox: Outbox, store: MemoryStore, broker: Broker, clock: ManualClock
) -> None:
    assert outbox.stage(job("job-1", args=[1], queue="mail", state=S.QUEUED)) == "job-1"
    assert broker.batches == [["job-1"]]
    got = store.get("job-1")
    assert got is not None
    assert (got.state, got.args, got.queue, got.owner) == (S.QUEUED, [1], "mail", None)
    assert got.staged_at == got.queued_at == got.first_queued_at == to_datetime(clock())
    assert dict(outbox.counters) == {"staged": 1, "published": 1}


def test_a_duplicate_id_is_refused_and_nothing_changes(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    assert store.create(job("job-1", state=S.STARTED, owner="w:1", args=["first"]))
    before = store.get("job-1")
    with pytest.raises(StagingError, match="job-1 exists already"):
        outbox.stage(job("job-1", args=["second"]))
    assert store.get("job-1") == before
    assert store.count(JobQuery()) == 1
    assert broker.batches == []
    assert outbox.counters["staged"] == 0


def test_a_refused_publish_leaves_the_job_staged_for_the_relay(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    broker.take = 0
    assert outbox.stage(job("job-1")) == "job-1"  # staging itself succeeded
    assert broker.batches == [["job-1"]]
    assert state(store, "job-1") is S.STAGED
    assert outbox.counters["left_to_relay"] == 1
    assert outbox.counters["published"] == 0


def test_the_breaker_leaves_jobs_to_the_relay_while_the_broker_is_down(
    outbox: Outbox, store: MemoryStore, broker: Broker, clock: ManualClock
) -> None:
    assert outbox.breaker == DEFAULT_BREAKER
    broker.take = 0
    outbox.stage(job("job-1"))
    assert len(broker.batches) == 1
    broker.take = None  # the broker is back, but the outbox cannot know yet
    clock.advance(DEFAULT_BREAKER - 0.25)
    outbox.stage(job("job-2"))
    assert len(broker.batches) == 1, "published while the breaker was open"
    assert state(store, "job-2") is S.STAGED
    assert outbox.counters["left_to_relay"] == 2
    clock.advance(0.25)
    outbox.stage(job("job-3"))
    assert broker.batches[1:] == [["job-3"]]
    assert state(store, "job-3") is S.QUEUED
    # The fast path does not come back for what it left: that is the relay's.
    assert (state(store, "job-1"), state(store, "job-2")) == (S.STAGED, S.STAGED)
    assert outbox.counters["published"] == 1


def test_a_breaker_of_its_own_length(
    store: MemoryStore, broker: Broker, clock: ManualClock
) -> None:
    outbox = Outbox(store, publish=broker, clock=clock, breaker=60)
    broker.take = 0
    outbox.stage(job("job-1"))
    broker.take = None
    clock.advance(59)
    outbox.stage(job("job-2"))
    assert len(broker.batches) == 1
    clock.advance(1)
    outbox.stage(job("job-3"))
    assert broker.batches[-1] == ["job-3"]


def test_a_publish_that_takes_some_jobs_marks_only_those(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    ids = staged(store, "job-0", "job-1", "job-2", "job-3")
    broker.take = 2
    done = outbox.flush(ids)
    assert done.ids == ["job-0", "job-1"]
    assert isinstance(done.error, PublishError)
    assert [state(store, i) for i in ids] == [S.QUEUED, S.QUEUED, S.STAGED, S.STAGED]
    assert outbox.counters["published"] == 2
    assert outbox.counters["left_to_relay"] == 2


def test_flush_publishes_in_batches_and_stops_at_a_refusal(
    store: MemoryStore, broker: Broker, clock: ManualClock
) -> None:
    outbox = Outbox(store, publish=broker, clock=clock, batch_size=2)
    ids = staged(store, *(f"job-{n}" for n in range(5)))
    assert outbox.flush(ids).ids == ids
    assert broker.batches == [["job-0", "job-1"], ["job-2", "job-3"], ["job-4"]]
    assert {state(store, i) for i in ids} == {S.QUEUED}

    more = staged(store, *(f"more-{n}" for n in range(5)))
    broker.batches.clear()
    broker.take = 1
    done = outbox.flush(more)
    assert done.ids == ["more-0"]
    assert broker.batches == [["more-0", "more-1"]]  # no batch after the refusal
    assert [state(store, i) for i in more] == [S.QUEUED] + [S.STAGED] * 4
    assert outbox.counters["left_to_relay"] == 4


def test_flush_of_the_same_id_twice_publishes_it_once(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    staged(store, "job-1")
    assert outbox.flush(["job-1", "job-1"]).ids == ["job-1"]
    assert outbox.flush(["job-1"]).ids == []  # queued now: nothing staged to publish
    assert broker.published == ["job-1"]


def test_the_fast_path_skips_a_job_a_relay_batch_holds(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    staged(store, "job-1", "job-2")
    with store.staged_batch(limit=1) as relay:
        assert [r.id for r in relay.records] == ["job-1"]
        assert outbox.flush(["job-1", "job-2"]).ids == ["job-2"]
    assert broker.published == ["job-2"]
    assert state(store, "job-1") is S.STAGED  # the relay did not mark it: still its to publish


class FailingStore(MemoryStore):
    """A ledger whose batches fail: on entry (unreachable) or at the end (the commit)."""

    def __init__(self, clock: ManualClock, *, fail_at: str) -> None:
        super().__init__(clock=clock)
        self.fail_at = fail_at

    @contextlib.contextmanager
    def staged_batch(self, **options: Any) -> Iterator[StagedBatch]:
        if self.fail_at == "enter":
            raise StoreUnavailable("the ledger database is unavailable: connection refused")
        with super().staged_batch(**options) as batch:
            yield batch
            raise StoreUnavailable("the ledger database is unavailable: commit failed")


@pytest.mark.parametrize("fail_at", ["enter", "exit"])
def test_a_ledger_error_never_raises_out_of_the_fast_path(
    clock: ManualClock, broker: Broker, fail_at: str
) -> None:
    store = FailingStore(clock, fail_at=fail_at)
    outbox = Outbox(store, publish=broker, clock=clock)
    assert outbox.stage(job("job-1")) == "job-1"  # the job is staged: the relay has it
    assert state(store, "job-1") is S.STAGED
    assert broker.published == ([] if fail_at == "enter" else ["job-1"])
    assert outbox.counters["left_to_relay"] == 1
    done = outbox.flush(["job-1"])  # no breaker: a ledger error says nothing of the broker
    assert done.ids == [] and done.error is None
    assert outbox.counters["left_to_relay"] == 2
    assert broker.published == ([] if fail_at == "enter" else ["job-1", "job-1"])
    assert state(store, "job-1") is S.STAGED


def test_a_crashing_publisher_never_raises_out_of_the_fast_path(
    outbox: Outbox, store: MemoryStore, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    broker.crash = RuntimeError("a bug in the integration")
    with caplog.at_level(logging.ERROR, logger="jobledger.outbox"):
        assert outbox.stage(job("job-1")) == "job-1"
    assert state(store, "job-1") is S.STAGED
    assert outbox.counters["left_to_relay"] == 1
    assert any(
        r.exc_info and "a bug in the integration" in str(r.exc_info[1]) for r in caplog.records
    )


# -- in a caller's transaction --------------------------------------------------------------------


def test_a_job_staged_in_a_transaction_is_published_once_after_the_commit(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    tx = FakeTransaction(store)
    assert outbox.stage(job("job-1"), using=tx) == "job-1"
    outbox.stage(job("job-2"), using=tx)
    assert [r.id for r in tx.pending] == ["job-1", "job-2"]
    assert store.get("job-1") is None and broker.batches == []
    tx.commit()
    assert broker.batches == [["job-1", "job-2"]]  # one flush for the transaction
    assert (state(store, "job-1"), state(store, "job-2")) == (S.QUEUED, S.QUEUED)
    assert dict(outbox.counters) == {"staged": 2, "published": 2}


def test_a_job_staged_in_a_rolled_back_transaction_never_existed(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    tx = FakeTransaction(store)
    outbox.stage(job("job-1"), using=tx)
    tx.rollback()
    tx.commit()  # a later transaction on the same connection
    assert store.get("job-1") is None
    assert broker.batches == []


def test_staging_in_binds_a_transaction_for_the_block(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    outer, inner = FakeTransaction(store), FakeTransaction(store)
    seen_elsewhere: list[object] = []
    with staging_in(outer):
        outbox.stage(job("in-outer"))
        with staging_in(inner):
            outbox.stage(job("in-inner"))
            explicit = FakeTransaction(store)
            outbox.stage(job("explicit"), using=explicit)  # using= wins over the binding
        outbox.stage(job("outer-again"))
        # Another thread does not see this thread's binding.
        thread = threading.Thread(target=lambda: seen_elsewhere.append(holders.resolve()))
        thread.start()
        thread.join(10)
    outbox.stage(job("no-binding"))  # after the block: the ledger's own connection
    assert seen_elsewhere == [None]
    assert [r.id for r in outer.pending] == ["in-outer", "outer-again"]
    assert [r.id for r in inner.pending] == ["in-inner"]
    assert [r.id for r in explicit.pending] == ["explicit"]
    assert broker.published == ["no-binding"]
    assert holders.resolve() is None


def test_an_unknown_transaction_kind_is_refused_with_what_to_pass(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    class NotATransaction:
        pass

    with pytest.raises(StagingError) as refused:
        holders.resolve(NotATransaction())
    message = str(refused.value)
    assert "NotATransaction" in message
    assert "Session or Connection" in message and "using=" in message
    with pytest.raises(StagingError):
        outbox.stage(job("job-1"), using=NotATransaction())
    with pytest.raises(StagingError), staging_in(NotATransaction()):
        outbox.stage(job("job-2"))
    assert store.count(JobQuery()) == 0 and broker.batches == []
    assert outbox.counters["staged"] == 0


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLStore]:
    store = SQLStore(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.migrate()
    yield store
    store.close()


def test_a_transaction_in_another_database_is_refused_before_any_write(
    sqlite_store: SQLStore, broker: Broker, tmp_path: Path
) -> None:
    """The caller's transaction writes to another SQLite file (with ledger tables of its own):
    jobs staged there would never be published, so staging refuses before writing."""
    elsewhere = SQLStore(f"sqlite:///{tmp_path / 'app.db'}")
    elsewhere.migrate()
    outbox = Outbox(sqlite_store, publish=broker)
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        with engine.connect() as conn:
            with pytest.raises(StagingError) as refused:
                outbox.stage(job("job-1"), using=conn)
            conn.commit()
        fake = FakeTransaction(sqlite_store, database=f"sqlite:{tmp_path / 'other.db'}")
        with pytest.raises(StagingError):
            outbox.stage(job("job-2"), using=fake)
        assert fake.pending == []
    finally:
        engine.dispose()
    assert str(tmp_path / "app.db") in str(refused.value)
    assert "JOBLEDGER_DATABASE_URL" in str(refused.value)
    assert elsewhere.count(JobQuery()) == 0
    assert sqlite_store.count(JobQuery()) == 0
    assert broker.batches == [] and outbox.counters["staged"] == 0
    elsewhere.close()


def test_the_same_sqlite_file_by_a_relative_path_is_the_same_database(
    sqlite_store: SQLStore, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    outbox = Outbox(sqlite_store, publish=broker)
    engine = create_engine("sqlite:///ledger.db")
    try:
        with engine.begin() as conn:
            outbox.stage(job("job-1"), using=conn)
    finally:
        engine.dispose()
    assert broker.published == ["job-1"]
    assert state(sqlite_store, "job-1") is S.QUEUED


def test_a_holder_of_unknown_database_is_trusted(
    outbox: Outbox, store: MemoryStore, broker: Broker
) -> None:
    tx = FakeTransaction(store, database=None)
    outbox.stage(job("job-1"), using=tx)
    tx.commit()
    assert broker.published == ["job-1"]


FIRST_USE_RACE = """
import importlib, sys, threading

real_import = importlib.import_module
importing = threading.Event()
release = threading.Event()

def slow_import(name, *args, **kwargs):
    # The SQLAlchemy adapter takes a moment to load (as Django's does, for real).
    if name == "jobledger.stores.staging" and name not in sys.modules:
        importing.set()
        release.wait(10)
    return real_import(name, *args, **kwargs)

importlib.import_module = slow_import

from sqlalchemy import create_engine
from jobledger.staging import holders

engine = create_engine("sqlite://")
found = {}

def resolve(who):
    with engine.connect() as conn:
        try:
            found[who] = type(holders.resolve(conn)).__name__
        except Exception as exc:
            found[who] = f"{type(exc).__name__}: {exc}"

first = threading.Thread(target=resolve, args=("first",))
first.start()
importing.wait(10)
second = threading.Thread(target=resolve, args=("second",))
second.start()
second.join(0.5)  # it may wait for the adapters to load, but not fail for want of them
release.set()
first.join(10)
second.join(10)
print(found["first"])
print(found["second"])
"""


def test_two_threads_staging_for_the_first_time_both_find_the_adapter() -> None:
    """The adapters load on first use; a second thread staging while the first one loads them
    must find them too, not be told its Session or Connection is no transaction."""
    done = subprocess.run(
        [sys.executable, "-c", FIRST_USE_RACE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ConnectionHolder", "ConnectionHolder"], done.stdout


class NamedStore(MemoryStore):
    """A store that names its ledger, as the SQL store does."""

    def ledger_id(self) -> str:
        return "ledger-a"


@pytest.mark.parametrize(("found", "refused"), [("ledger-a", False), ("ledger-b", True)])
def test_a_transaction_on_a_database_of_another_ledger_is_refused(
    found: str, refused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers may each have a database of the same name: the ledger ids tell them apart."""
    store = NamedStore()
    transaction = FakeTransaction(store, database="postgresql:shop")
    monkeypatch.setattr(FakeHolder, "ledger_id", lambda self: found)
    outbox = Outbox(store, publish=lambda records: Published(ids=[r.id for r in records]))
    if refused:
        with pytest.raises(StagingError, match="another database than the ledger's"):
            outbox.stage(job("job-1"), using=transaction)
        assert transaction.pending == []
    else:
        outbox.stage(job("job-1"), using=transaction)
        transaction.commit()
        assert state(store, "job-1") is S.QUEUED
