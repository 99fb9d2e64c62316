"""A ledger that accepts the connection and then hangs: every statement of the store's is bounded
by ``statement_timeout`` and ends in :class:`StoreUnavailable` (what callers already treat as an
outage: the enqueue logs and counts it, a worker defers its write), on each real database."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, create_engine, text, update

from jobledger.config import DEFAULT_STATEMENT_TIMEOUT, Settings
from jobledger.errors import StoreUnavailable
from jobledger.model import JobRecord, JobState
from jobledger.stores import store_for
from jobledger.stores.base import Transition
from jobledger.stores.schema import jobs
from jobledger.stores.sql import SQLStore, parse_url

TIMEOUT = 1.0
#: Far below what the databases wait for a lock by default (PostgreSQL: forever; MariaDB's
#: innodb_lock_wait_timeout: 50 s; SQLite before: 30 s), far above the timeout on a busy host.
BOUND = 10.0
TO_STARTED = Transition(to=JobState.STARTED, expect=frozenset({JobState.QUEUED}), owner="w:1")


@pytest.fixture
def store(sql_url: str, sql_store: SQLStore) -> Iterator[SQLStore]:
    """A second store on the migrated ledger, with a short statement timeout."""
    short = SQLStore(sql_url, statement_timeout=TIMEOUT)
    yield short
    short.close()


@pytest.fixture
def holder(sql_url: str) -> Iterator[Connection]:
    """Another client's connection, in a transaction the test opens and ends."""
    engine = create_engine(parse_url(sql_url))
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def _timed_out(call: object) -> float:
    began = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        call()  # type: ignore[operator]
    elapsed = time.monotonic() - began
    assert "unavailable" in str(raised.value) and "\n" not in str(raised.value)
    return elapsed


def test_a_write_waiting_on_a_lock_ends_as_an_outage(
    store: SQLStore, sql_store: SQLStore, holder: Connection
) -> None:
    """Another client holds the job's row (on SQLite: the database's write lock) in an open
    transaction: the worker's claim waits at most the timeout, then the ledger is "down"; once
    the lock is gone the same store works again, and the timed-out write left nothing."""
    assert sql_store.create(JobRecord(id="held", name="t"))
    with holder.begin():
        holder.execute(update(jobs).where(jobs.c.id == "held").values(error="held"))
        elapsed = _timed_out(lambda: store.transition("held", TO_STARTED))
        assert TIMEOUT * 0.9 <= elapsed < BOUND, elapsed
        holder.rollback()
    record = sql_store.get("held")
    assert record is not None and record.state is JobState.QUEUED and record.owner is None
    assert store.transition("held", TO_STARTED)
    assert store.get("held").owner == "w:1"  # type: ignore[union-attr]


@pytest.mark.parametrize("sql_backend", ["postgresql", "mariadb"])
def test_a_slow_statement_ends_as_an_outage(store: SQLStore, sql_backend: str) -> None:
    """A server that takes too long to answer (a sleeping statement stands in for it)."""
    sleep = "pg_sleep" if sql_backend == "postgresql" else "SLEEP"

    def slow() -> None:
        with store._read() as conn:
            conn.execute(text(f"SELECT {sleep}(30)"))

    assert _timed_out(slow) < BOUND
    assert store.now() > 0  # the pool gives a working connection next


@pytest.mark.parametrize("sql_backend", ["postgresql", "mariadb"])
def test_migrations_run_without_the_timeout(store: SQLStore, sql_backend: str) -> None:
    """``migrate`` may build an index over a large ledger for minutes: its connections have no
    statement timeout (a statement longer than the store's runs to its end there)."""
    sleep = "pg_sleep" if sql_backend == "postgresql" else "SLEEP"
    with store._migration_engine() as engine, engine.connect() as conn:
        conn.execute(text(f"SELECT {sleep}({TIMEOUT * 1.5})"))
    store.migrate()


def test_settings_reach_the_store(sql_url: str, sql_store: SQLStore) -> None:
    configured = store_for(Settings(database_url=sql_url, statement_timeout=2.5))
    try:
        assert configured.statement_timeout == 2.5  # type: ignore[attr-defined]
    finally:
        configured.close()
    assert SQLStore(sql_url).statement_timeout == DEFAULT_STATEMENT_TIMEOUT
