"""The SQL store's per-job writes: one statement on an unpinged pooled connection, so a dropped
connection is replaced and the write tried once more, and a write whose first try may have
committed before its answer was lost is judged by what it left."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc

from jobledger.model import JobRecord, JobState
from jobledger.stores import sql
from jobledger.stores.base import Transition
from jobledger.stores.sql import SQLStore, parse_url

TO_STARTED = Transition(to=JobState.STARTED, expect=frozenset({JobState.QUEUED}), owner="w:1")
TO_SUCCEEDED = Transition(
    to=JobState.SUCCEEDED, expect=frozenset({JobState.STARTED}), expect_owner="w:1"
)


def test_only_sqlite_needs_the_fork_lock(sql_store: SQLStore, sql_backend: str) -> None:
    assert sql_store.serialize_across_fork is (sql_backend == "sqlite")


@pytest.mark.parametrize("sql_backend", ["postgresql", "mariadb"])
def test_a_dropped_connection_is_replaced_without_a_failed_write(
    sql_store: SQLStore, sql_url: str
) -> None:
    assert sql_store.create(JobRecord(id="job", name="t"))  # a pooled connection now
    admin = create_engine(parse_url(sql_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if sql_store.dialect == "postgresql":
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        else:
            own = conn.execute(text("SELECT CONNECTION_ID()")).scalar_one()
            for (pid,) in conn.execute(
                text(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = DATABASE() AND id <> :own"
                ),
                {"own": own},
            ).all():
                conn.execute(text(f"KILL {int(pid)}"))
    admin.dispose()
    assert sql_store.transition("job", TO_STARTED)
    assert sql_store.get("job").state is JobState.STARTED  # type: ignore[union-attr]


def _answer_lost_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next statement commits, then its connection drops before the answer comes."""
    run = sql._Prepared.run
    lost = [True]

    def run_and_lose(self: sql._Prepared, conn: Any, values: Any) -> Any:
        result = run(self, conn, values)
        if lost:
            lost.clear()
            conn.invalidate()
            raise sa_exc.OperationalError(
                "…",
                None,
                ConnectionError("server closed the connection"),
                connection_invalidated=True,
            )
        return result

    monkeypatch.setattr(sql._Prepared, "run", run_and_lose)


@pytest.mark.parametrize("sql_backend", ["sqlite", "postgresql"])
def test_a_write_whose_answer_was_lost_is_judged_by_what_it_left(
    sql_store: SQLStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _answer_lost_once(monkeypatch)
    assert sql_store.create(JobRecord(id="job", name="t"))  # its retry found our row
    _answer_lost_once(monkeypatch)
    assert sql_store.transition("job", TO_STARTED)  # its retry lost to our first try
    _answer_lost_once(monkeypatch)
    assert sql_store.transition("job", TO_SUCCEEDED)
    _answer_lost_once(monkeypatch)
    assert sql_store.delete("job", frozenset({JobState.SUCCEEDED}))
    assert sql_store.get("job") is None
    # without a lost answer, a lost race is still a lost race
    assert not sql_store.transition("job", TO_STARTED)


@pytest.mark.parametrize("sql_backend", ["postgresql"])
def test_a_relaxed_publish_record_is_written_once(sql_url: str, sql_store: SQLStore) -> None:
    relaxed = SQLStore(sql_url, synchronous_publish=False)
    try:
        assert relaxed.create(JobRecord(id="job", name="t", kwargs={"n": 1}))
        assert not relaxed.create(JobRecord(id="job", name="t"))
        record = sql_store.get("job")
        assert record is not None and record.state is JobState.QUEUED
        assert record.kwargs == {"n": 1} and record.queued_at is not None
        relaxed_sql = [s.sql for s in relaxed._statements.values()]
        assert any("set_config" in s for s in relaxed_sql)
        # the claim's create of a missing record stays durable
        started = JobRecord(id="other", name="t", state=JobState.STARTED, owner="w:1")
        assert relaxed.create(started)
        assert sum("set_config" in s.sql for s in relaxed._statements.values()) == 1
    finally:
        relaxed.close()
