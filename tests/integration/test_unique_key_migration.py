"""Revisions 0006 (unique keys) and 0007 (their index) on each SQL database holding jobs: the
upgrade keeps them (without a key), keys are held and refused afterwards, and a downgrade
gives back the older schema with the jobs still there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from jobledger.errors import UniqueKeyHeld
from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.stores.base import Transition
from jobledger.stores.sql import SQLStore, parse_url
from ledgerdb import SQL_BACKENDS, migrate_to, own_database


@pytest.fixture(params=SQL_BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own on each SQL backend (it migrates down and up)."""
    with own_database(request.param, tmp_path, "unique") as made:
        yield made


def _index(url: str, name: str = "ux_jobledger_jobs_unique_hold") -> dict[str, object] | None:
    engine = create_engine(parse_url(url))
    with engine.connect() as conn:
        found = [dict(i) for i in inspect(conn).get_indexes("jobledger_jobs") if i["name"] == name]
    engine.dispose()
    return found[0] if found else None


def _columns(url: str) -> set[str]:
    engine = create_engine(parse_url(url))
    with engine.connect() as conn:
        found = {c["name"] for c in inspect(conn).get_columns("jobledger_jobs")}
    engine.dispose()
    return found


def test_revision_0006_up_and_down_keeps_the_jobs(url: str) -> None:
    migrate_to(url, "0005")
    engine = create_engine(parse_url(url))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobledger_jobs (id, system, name, queue, args, kwargs, tags, "
                "options, state, attempts, recoveries, restarts, created_at, queued_at, "
                "updated_at) VALUES ('old', 'celery', 't', 'q', '[]', '{}', '{}', '{}', "
                "'queued', 0, 0, 0, 1, 1, 1)"
            )
        )
    engine.dispose()
    store = SQLStore(url)
    try:
        store.migrate()
        old = store.get("old")
        assert old is not None and old.unique_key is None
        assert store.create(JobRecord(id="a", name="t", unique_key="k"))
        with pytest.raises(UniqueKeyHeld):
            store.create(JobRecord(id="b", name="t", unique_key="k"))
        done = Transition(to=JobState.CANCELLED, expect=frozenset({JobState.QUEUED}))
        assert store.transition("a", done)
        assert store.create(JobRecord(id="b", name="t", unique_key="k"))
    finally:
        store.close()
    assert {"unique_key", "unique_hold"} <= _columns(url)
    index = _index(url)
    assert index is not None and index["unique"] and index["column_names"] == ["unique_hold"]
    if url.startswith("postgresql"):  # no entry for the jobs without a key
        assert "IS NOT NULL" in str(index["dialect_options"]["postgresql_where"])
    migrate_to(url, "0005", up=False)
    assert _index(url) is None
    assert not {"unique_key", "unique_hold"} & _columns(url)
    migrate_to(url, "head")
    store = SQLStore(url)
    try:
        assert {r.id for r in store.iter_jobs(JobQuery())} == {"old", "a", "b"}
        assert store.create(
            JobRecord(id="c", name="t", unique_key="k")
        )  # the downgrade dropped the holds
    finally:
        store.close()


def test_revision_0007_indexes_the_unique_key_and_goes_back(url: str) -> None:
    """The index ``jobs --unique-key`` reads: on the key, leaving out jobs without one where
    the database can; a downgrade to 0006 drops only it."""
    store = SQLStore(url)
    try:
        store.migrate()
        assert store.create(JobRecord(id="a", name="t", unique_key="k"))
    finally:
        store.close()
    index = _index(url, "ix_jobledger_jobs_unique_key")
    assert index is not None and index["column_names"] == ["unique_key"] and not index["unique"]
    if url.startswith("postgresql"):
        assert "IS NOT NULL" in str(index["dialect_options"]["postgresql_where"])
    migrate_to(url, "0006", up=False)
    assert _index(url, "ix_jobledger_jobs_unique_key") is None and _index(url) is not None
    migrate_to(url, "head")
    store = SQLStore(url)
    try:
        assert {r.id for r in store.iter_jobs(JobQuery(unique_keys={"k"}))} == {"a"}
    finally:
        store.close()
