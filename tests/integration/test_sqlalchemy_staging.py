"""Staging through a caller's SQLAlchemy transaction, on SQLite (a file), PostgreSQL and MariaDB.

The application has its own engine on the ledger's database and a business table; jobs are
staged with ``using=`` a Session or a Connection. What must hold: a job commits or rolls back
with the business row; after the commit the fast path publishes it once and marks it queued;
a rolled-back job (or one staged in a rolled-back savepoint) is never published, by the fast
path or the relay; and a transaction staging cannot go through is refused before any write.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.orm import Session

from jobledger.errors import PublishError, StagingError
from jobledger.integrations.base import Published
from jobledger.model import JobRecord, JobState
from jobledger.outbox import Outbox
from jobledger.query import JobQuery
from jobledger.relay import Relay, RelayReport
from jobledger.staging import staging_in
from jobledger.stores.sql import SQLStore, parse_url
from jobledger.testing import MemoryStore
from ledgerdb import throwaway_database

S = JobState

business = MetaData()
orders = Table(
    "app_orders",
    business,
    Column("id", String(64), primary_key=True),
    Column("total", Integer, nullable=False),
)


@dataclass
class Broker:
    """Records what it is handed and the ledger state of each job at that moment (a publish
    must come after the commit: the job is there, staged); refuses all while ``down``."""

    store: SQLStore
    down: bool = False
    published: list[str] = field(default_factory=list)
    seen_states: list[JobState | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, records: Sequence[JobRecord]) -> Published:
        if self.down:
            return Published(error=PublishError("broker down"))
        with self.lock:
            for record in records:
                current = self.store.get(record.id)
                self.seen_states.append(None if current is None else current.state)
                self.published.append(record.id)
        return Published(ids=[r.id for r in records])


@pytest.fixture
def app_engine(sql_url: str, sql_store: SQLStore) -> Iterator[Engine]:
    """The application's own engine on the ledger's database, with its business table."""
    engine = create_engine(parse_url(sql_url))
    business.create_all(engine)
    with engine.begin() as conn:
        conn.execute(orders.delete())
    yield engine
    engine.dispose()


@pytest.fixture
def broker(sql_store: SQLStore) -> Broker:
    return Broker(sql_store)


@pytest.fixture
def outbox(sql_store: SQLStore, broker: Broker) -> Outbox:
    return Outbox(sql_store, publish=broker)


def job(job_id: str, **fields: Any) -> JobRecord:
    fields.setdefault("name", "tasks.confirm_order")
    fields.setdefault("system", "celery")
    return JobRecord(id=job_id, **fields)


def order_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(orders.c.id)).scalars())


def state(store: SQLStore, job_id: str) -> JobState | None:
    record = store.get(job_id)
    return None if record is None else record.state


def relay_pass(store: SQLStore, broker: Broker) -> RelayReport:
    return Relay(store, publish=broker, grace=0, batch_size=100).run_once()


# -- commit and rollback ---------------------------------------------------------------------------


def test_a_session_commit_publishes_the_job_once(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    with Session(app_engine) as session:
        session.execute(orders.insert().values(id="order-1", total=10))
        assert outbox.stage(job("job-1", args=["order-1"]), using=session) == "job-1"
        assert broker.published == []
        assert sql_store.get("job-1") is None  # not committed: not there for anyone else
        session.commit()
    assert broker.published == ["job-1"]
    assert broker.seen_states == [S.STAGED]
    record = sql_store.get("job-1")
    assert record is not None
    assert (record.state, record.args, record.owner) == (S.QUEUED, ["order-1"], None)
    assert record.staged_at is not None and record.queued_at is not None
    assert order_ids(app_engine) == {"order-1"}
    # Later transactions on the pooled connections do not publish it again.
    for _ in range(3):
        with Session(app_engine) as session:
            session.execute(select(func.count()).select_from(orders))
            session.commit()
    assert broker.published == ["job-1"]
    assert relay_pass(sql_store, broker) == RelayReport()


def test_a_held_unique_key_stages_nothing_and_the_transaction_lives_on(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    """The holder's id comes back, with nothing written: on PostgreSQL a failed INSERT would
    have aborted the caller's transaction, so its business row must still commit. A job staged
    earlier in the same transaction holds its key there too; a taken job id is refused."""
    assert outbox.stage(job("held", unique_key="order:1")) == "held"  # own connection
    with Session(app_engine) as session:
        session.execute(orders.insert().values(id="order-1", total=10))
        assert outbox.stage(job("job-1", unique_key="order:1"), using=session) == "held"
        assert outbox.stage(job("job-2", unique_key="order:2"), using=session) == "job-2"
        assert outbox.stage(job("job-3", unique_key="order:2"), using=session) == "job-2"
        with pytest.raises(StagingError, match="exists already"):
            outbox.stage(job("job-2", unique_key="order:3"), using=session)
        session.execute(orders.insert().values(id="order-2", total=20))
        session.commit()
    assert order_ids(app_engine) == {"order-1", "order-2"}
    assert sorted(broker.published) == ["held", "job-2"]
    assert {r.id for r in sql_store.iter_jobs(JobQuery())} == {"held", "job-2"}
    assert outbox.counters["unique_held"] == 2


def test_a_session_rollback_leaves_no_job_and_publishes_nothing(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    with Session(app_engine) as session:
        session.execute(orders.insert().values(id="order-1", total=10))
        outbox.stage(job("job-1"), using=session)
        session.rollback()
        # The next transaction of the same session commits: still nothing for job-1.
        session.execute(orders.insert().values(id="order-2", total=20))
        outbox.stage(job("job-2"), using=session)
        session.commit()
    with Session(app_engine) as session:
        outbox.stage(job("job-3"), using=session)
        # Closed without a commit: rolled back.
    assert sql_store.get("job-1") is None and sql_store.get("job-3") is None
    assert order_ids(app_engine) == {"order-2"}
    assert broker.published == ["job-2"]
    assert relay_pass(sql_store, broker) == RelayReport()
    assert broker.published == ["job-2"]


def test_a_connection_commit_publishes_the_job(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    with app_engine.begin() as conn:
        conn.execute(orders.insert().values(id="order-1", total=10))
        outbox.stage(job("job-1"), using=conn)
        outbox.stage(job("job-2"), using=conn)
        assert broker.published == []
    assert sorted(broker.published) == ["job-1", "job-2"]
    assert {state(sql_store, "job-1"), state(sql_store, "job-2")} == {S.QUEUED}

    with pytest.raises(ZeroDivisionError), app_engine.begin() as conn:
        conn.execute(orders.insert().values(id="order-2", total=20))
        outbox.stage(job("job-3"), using=conn)
        raise ZeroDivisionError  # the application failed: everything rolls back
    assert sql_store.get("job-3") is None
    assert order_ids(app_engine) == {"order-1"}
    assert sorted(broker.published) == ["job-1", "job-2"]


def test_a_connection_used_after_its_commit_publishes_at_the_next_begin_or_close(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    with app_engine.connect() as conn:
        outbox.stage(job("job-1"), using=conn)
        conn.commit()
        conn.execute(select(func.count()).select_from(orders))  # the next transaction begins
        assert broker.published == ["job-1"]
        assert state(sql_store, "job-1") is S.QUEUED
        outbox.stage(job("job-2"), using=conn)
        conn.commit()
        outbox.stage(job("job-3"), using=conn)
        conn.rollback()
    assert broker.published == ["job-1", "job-2"]
    assert state(sql_store, "job-2") is S.QUEUED
    assert sql_store.get("job-3") is None


def test_a_savepoint_rolled_back_takes_its_job_with_it(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    with Session(app_engine) as session:
        session.execute(orders.insert().values(id="order-1", total=10))
        outbox.stage(job("kept-1"), using=session)
        nested = session.begin_nested()
        session.execute(orders.insert().values(id="order-dropped", total=0))
        outbox.stage(job("dropped"), using=session)
        nested.rollback()
        with session.begin_nested():
            outbox.stage(job("kept-2"), using=session)
        session.commit()
    assert sorted(broker.published) == ["kept-1", "kept-2"]
    assert sql_store.get("dropped") is None
    assert order_ids(app_engine) == {"order-1"}
    assert relay_pass(sql_store, broker) == RelayReport()


def test_staging_in_binds_the_session(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    with Session(app_engine) as session, staging_in(session):
        outbox.stage(job("job-1"))
        session.rollback()
        outbox.stage(job("job-2"))
        session.commit()
    assert sql_store.get("job-1") is None
    assert broker.published == ["job-2"]


def test_sessions_staging_side_by_side_each_publish_their_own(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    start = threading.Barrier(3, timeout=30)
    errors: list[BaseException] = []

    def place_orders(worker: int) -> None:
        try:
            start.wait()
            for n in range(3):
                with Session(app_engine) as session:
                    session.execute(orders.insert().values(id=f"order-{worker}-{n}", total=n))
                    outbox.stage(job(f"job-{worker}-{n}"), using=session)
                    outbox.stage(job(f"job-{worker}-{n}-b"), using=session)
                    if n == 1:
                        session.rollback()
                    else:
                        session.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=place_orders, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    expected = sorted(f"job-{w}-{n}{s}" for w in range(3) for n in (0, 2) for s in ("", "-b"))
    assert sorted(broker.published) == expected  # each exactly once
    assert set(broker.seen_states) == {S.STAGED}
    assert sql_store.count(JobQuery(states={S.QUEUED})) == len(expected)
    assert sql_store.count(JobQuery()) == len(expected)
    assert len(order_ids(app_engine)) == 6


def real_sqlite_transactions(engine: Engine) -> None:
    """SQLAlchemy's recipe for SAVEPOINT on pysqlite, which otherwise emits no BEGIN before the
    first write, so an outer transaction opened with a SAVEPOINT commits at its RELEASE
    (https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#pysqlite-serializable)."""

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def test_a_session_joined_to_an_outer_transaction_publishes_when_the_outer_commits(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    """The pattern of test suites and of code that hands a Session a Connection it controls:
    the Session's commit only releases a savepoint; the outer transaction decides."""
    if app_engine.dialect.name == "sqlite":
        real_sqlite_transactions(app_engine)
    with app_engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        session.execute(orders.insert().values(id="order-1", total=10))
        outbox.stage(job("job-1"), using=session)
        session.commit()
        session.close()
        assert broker.published == []
        assert sql_store.get("job-1") is None
        outer.commit()
    assert broker.published == ["job-1"]
    assert state(sql_store, "job-1") is S.QUEUED

    with app_engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        session.execute(orders.insert().values(id="order-2", total=20))
        outbox.stage(job("job-2"), using=session)
        session.commit()
        session.close()
        outer.rollback()  # the test suite's teardown: nothing happened
    assert sql_store.get("job-2") is None
    assert order_ids(app_engine) == {"order-1"}
    assert broker.published == ["job-1"]
    assert relay_pass(sql_store, broker) == RelayReport()


# -- the relay behind the fast path ----------------------------------------------------------------


def test_what_the_fast_path_could_not_publish_the_relay_does(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    broker.down = True
    with Session(app_engine) as session:
        session.execute(orders.insert().values(id="order-1", total=10))
        outbox.stage(job("job-1"), using=session)
        session.commit()
    assert state(sql_store, "job-1") is S.STAGED  # committed, not yet published
    assert outbox.counters["left_to_relay"] == 1
    broker.down = False
    assert relay_pass(sql_store, broker) == RelayReport(published=1, batches=1)
    assert broker.published == ["job-1"] and state(sql_store, "job-1") is S.QUEUED


# -- refused before any write ----------------------------------------------------------------------


def test_an_engine_holds_no_transaction(
    app_engine: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    with pytest.raises(StagingError, match="Engine"):
        outbox.stage(job("job-1"), using=app_engine)
    assert sql_store.count(JobQuery()) == 0 and broker.published == []


def test_a_closed_connection_is_refused(app_engine: Engine, outbox: Outbox) -> None:
    conn = app_engine.connect()
    conn.close()
    with pytest.raises(StagingError):
        outbox.stage(job("job-1"), using=conn)


@pytest.fixture
def bare(sql_backend: str, sql_url: str, tmp_path: Any) -> Iterator[Engine]:
    """An engine on a database the ledger was never migrated into (PostgreSQL: the ledger's
    own database with an empty schema first on the search path, so only the tables differ)."""
    if sql_backend == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'bare.db'}")
        yield engine
        engine.dispose()
        return
    url = parse_url(sql_url)
    if sql_backend == "postgresql":
        with create_engine(url).begin() as conn:
            conn.execute(text("CREATE SCHEMA IF NOT EXISTS jl_bare"))
        engine = create_engine(url, connect_args={"options": "-csearch_path=jl_bare"})
        yield engine
        engine.dispose()
        return
    with throwaway_database(sql_url, f"jl_bare_{uuid.uuid4().hex[:8]}") as bare_url:
        engine = create_engine(parse_url(bare_url))
        yield engine
        engine.dispose()


def test_a_database_without_the_ledger_tables_is_refused_and_the_transaction_lives_on(
    sql_backend: str, bare: Engine, sql_store: SQLStore, broker: Broker
) -> None:
    # A memory ledger says nothing of its database: only the tables decide here.
    outbox = Outbox(MemoryStore(), publish=broker)
    with bare.connect() as conn:
        conn.execute(text("CREATE TEMPORARY TABLE scratch (n INTEGER)"))
        conn.execute(text("INSERT INTO scratch (n) VALUES (1)"))
        with pytest.raises(StagingError, match="jobledger migrate"):
            outbox.stage(job("job-1"), using=conn)
        # The caller's transaction is still usable: staging broke nothing.
        conn.execute(text("INSERT INTO scratch (n) VALUES (2)"))
        assert conn.execute(text("SELECT count(*) FROM scratch")).scalar_one() == 2
        conn.commit()
    if sql_backend == "postgresql":  # the same database, found through the search path
        refusing = Outbox(sql_store, publish=broker)
        with bare.connect() as conn:
            with pytest.raises(StagingError, match="jobledger migrate"):
                refusing.stage(job("job-2"), using=conn)
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
            conn.commit()
    assert sql_store.count(JobQuery()) == 0 and broker.published == []


def test_a_transaction_in_another_database_is_refused_before_any_write(
    sql_backend: str, bare: Engine, outbox: Outbox, broker: Broker, sql_store: SQLStore
) -> None:
    if sql_backend == "postgresql":  # the bare schema is in the ledger's own database
        other = create_engine(sql_store.url.set(database="postgres"))
    else:
        other = bare
    try:
        with other.connect() as conn:
            with pytest.raises(StagingError, match="JOBLEDGER_DATABASE_URL"):
                outbox.stage(job("job-1"), using=conn)
            assert conn.execute(text("SELECT 1")).scalar_one() == 1  # still usable
    finally:
        if other is not bare:
            other.dispose()
    assert sql_store.count(JobQuery()) == 0 and broker.published == []


@pytest.mark.parametrize("sql_backend", ["mariadb"])
def test_a_mariadb_url_names_the_same_database_as_a_mysql_one(
    sql_url: str, sql_store: SQLStore, outbox: Outbox, broker: Broker
) -> None:
    """``mysql://`` and ``mariadb://`` reach the same server and database: an application on
    ``mariadb+pymysql://…`` may stage into a ledger configured as ``mysql://…``."""
    engine = create_engine(parse_url(sql_url).set(drivername="mariadb+pymysql"))
    try:
        with engine.begin() as conn:
            outbox.stage(job("job-1"), using=conn)
    finally:
        engine.dispose()
    assert broker.published == ["job-1"]
    assert state(sql_store, "job-1") is S.QUEUED


def test_a_sqlite_connection_that_begins_immediate_does_not_wait_on_its_own_fast_path(
    tmp_path: Any,
) -> None:
    """A common SQLite recipe takes the write lock at BEGIN (``BEGIN IMMEDIATE``). The fast
    path of a commit on a connection that goes on being used must not run inside the next
    BEGIN, after the lock is taken: its own write would wait for the caller's, and the caller
    for it."""
    url = f"sqlite:///{tmp_path / 'immediate.db'}"
    store = SQLStore(url, statement_timeout=2)  # a wait on the lock fails in 2 s
    store.migrate()
    broker = Broker(store)
    outbox = Outbox(store, publish=broker)
    app = create_engine(url)

    @event.listens_for(app, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(app, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    try:
        with app.connect() as conn:
            outbox.stage(job("job-1"), using=conn)
            conn.commit()
            conn.execute(select(1))  # the next transaction: BEGIN IMMEDIATE
            conn.commit()
        assert broker.published == ["job-1"]
        assert outbox.counters["left_to_relay"] == 0
        assert state(store, "job-1") is S.QUEUED
    finally:
        app.dispose()
        store.close()


def test_the_ledger_statement_timeout_stays_out_of_the_callers_transaction(
    sql_backend: str, sql_url: str, sql_store: SQLStore, app_engine: Engine, broker: Broker
) -> None:
    """The statement timeout is the ledger store's own: a caller's transaction that stages a
    job may run a statement longer than it (and hold its locks as long), and the job still
    commits and is published."""
    store = SQLStore(sql_url, statement_timeout=0.5)
    outbox = Outbox(store, publish=broker)
    sleep = {"postgresql": "pg_sleep", "mariadb": "SLEEP", "sqlite": "sleep"}[sql_backend]
    try:
        with app_engine.begin() as conn:
            conn.execute(orders.insert().values(id="o-1", total=5))
            outbox.stage(job("job-1"), using=conn)
            if sql_backend == "sqlite":
                conn.connection.driver_connection.create_function("sleep", 1, time.sleep)
            conn.execute(text(f"SELECT {sleep}(1)"))
    finally:
        store.close()
    assert order_ids(app_engine) == {"o-1"}
    assert broker.published == ["job-1"]
    assert state(sql_store, "job-1") is S.QUEUED
