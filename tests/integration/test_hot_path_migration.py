"""Revision 0003 on a PostgreSQL ledger that has jobs: their arguments stay searchable (the
search copy is filled from them), new and deleted jobs keep the copy in step, the trigram
indexes are on the copy, and a downgrade to 0002 gives back the older schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.stores.base import Transition
from jobledger.stores.sql import SQLStore, parse_url
from ledgerdb import migrate_to, own_database


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL database of this test's own (it migrates down and up)."""
    with own_database("postgresql", tmp_path, "hot") as made:
        yield made


def _search_indexes(url: str) -> dict[str, list[str]]:
    engine = create_engine(parse_url(url))
    with engine.connect() as conn:
        found = {
            table: sorted(i["name"] for i in inspect(conn).get_indexes(table))
            for table in ("jobledger_jobs", "jobledger_job_search")
            if inspect(conn).has_table(table)
        }
    engine.dispose()
    return {t: [n for n in names if n.endswith("_trgm")] for t, names in found.items()}


def test_an_existing_ledger_stays_searchable_across_revision_0003(url: str) -> None:
    migrate_to(url, "0002")
    engine = create_engine(parse_url(url))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobledger_jobs (id, system, name, queue, args, kwargs, tags, "
                "options, state, attempts, recoveries, restarts, created_at, queued_at, "
                "updated_at) VALUES ('old', 'celery', 't', 'q', '[]', "
                """'{"model_id": 4242}', '{}', '{}', 'queued', 0, 0, 0, 1, 1, 1)"""
            )
        )
    engine.dispose()
    store = SQLStore(url)
    try:
        store.migrate()
        assert _search_indexes(url) == {
            "jobledger_jobs": [],
            "jobledger_job_search": [
                "ix_jobledger_job_search_args_trgm",
                "ix_jobledger_job_search_kwargs_trgm",
                "ix_jobledger_job_search_tags_trgm",
            ],
        }
        assert store.create(JobRecord(id="new", name="t", kwargs={"model_id": 4242}))
        start = Transition(to=JobState.STARTED, expect=frozenset({JobState.QUEUED}), owner="w:1")
        assert store.transition("new", start)
        found = {j.id for j in store.iter_jobs(JobQuery(match='model_id": 4242'))}
        assert found == {"old", "new"}
        assert store.delete("old", frozenset({JobState.QUEUED}))
        assert store.create(JobRecord(id="old", name="t", kwargs={"model_id": 7}))
        assert {j.id for j in store.iter_jobs(JobQuery(match='model_id": 4242'))} == {"new"}
        assert {j.id for j in store.iter_jobs(JobQuery(match="model_id.: 7", regex=True))} == {
            "old"
        }
    finally:
        store.close()
    migrate_to(url, "0002", up=False)
    assert "jobledger_job_search" not in _search_indexes(url)
