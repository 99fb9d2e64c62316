"""What a person sees when the ledger cannot work: one readable line naming the cause and the
fix, as the right exception, never a driver's traceback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from jobledger.errors import ConfigError, SchemaMissing, StoreUnavailable
from jobledger.model import JobRecord
from jobledger.query import JobQuery
from jobledger.stores import migrations, open_store
from jobledger.stores.schema import SCHEMA_REVISION, VERSION_TABLE, jobs
from jobledger.stores.sql import SQLStore
from ledgerdb import own_database


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "",
        "postgresql://user@host:notaport/db",
        "nosuchdatabase://user@host/db",
        "postgresql+nosuchdriver://user@host/db",
    ],
)
def test_a_malformed_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        open_store(url)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:1/jobledger",
        "mysql://root@127.0.0.1:1/jobledger",
        "sqlite:////nonexistent-directory/for/jobledger.db",
    ],
)
def test_an_unreachable_database_is_unavailable_in_one_line(url: str) -> None:
    store = SQLStore(url)
    try:
        for call in (store.now, lambda: store.get("job-1"), lambda: store.count(JobQuery())):
            with pytest.raises(StoreUnavailable) as raised:
                call()
            message = str(raised.value)
            assert "\n" not in message
            assert "unavailable" in message and store.safe_url in message
    finally:
        store.close()


def test_an_unreachable_database_hides_its_password() -> None:
    store = SQLStore("postgresql://postgres:s3cret-pw@127.0.0.1:1/jobledger")
    with pytest.raises(StoreUnavailable) as raised:
        store.now()
    assert "s3cret-pw" not in str(raised.value) and "***" in str(raised.value)


@pytest.fixture
def fresh_url(sql_backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty database with no ledger tables on the backend's server (a new SQLite file)."""
    with own_database(sql_backend, tmp_path, "fresh") as url:
        yield url


def test_missing_schema_names_jobledger_migrate(fresh_url: str) -> None:
    store = SQLStore(fresh_url)
    try:
        for call in (
            lambda: store.get("job-1"),
            lambda: store.create(JobRecord(id="job-1", name="t")),
            store.now,
        ):
            with pytest.raises(SchemaMissing) as raised:
                call()
            assert "jobledger migrate" in str(raised.value)
            assert "\n" not in str(raised.value)
        store.migrate()
        store.migrate()  # idempotent
        assert store.create(JobRecord(id="job-1", name="t"))
        assert store.count(JobQuery()) == 1
    finally:
        store.close()
    again = SQLStore(fresh_url)
    again.migrate()  # a third time, from another store: still nothing to do, nothing lost
    assert again.count(JobQuery()) == 1
    again.close()


def test_auto_migrate_creates_the_schema_on_first_use(fresh_url: str) -> None:
    store = SQLStore(fresh_url, auto_migrate=True)
    try:
        assert store.count(JobQuery()) == 0
    finally:
        store.close()


def test_migrate_is_idempotent_on_a_ledger_in_use(sql_store: SQLStore) -> None:
    assert sql_store.create(JobRecord(id="job-1", name="t"))
    sql_store.migrate()
    sql_store.migrate()
    assert sql_store.get("job-1") is not None
    with sql_store.engine.connect() as conn:
        versions = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    assert versions == [SCHEMA_REVISION]


def test_an_older_schema_is_refused_with_the_revisions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    SQLStore(url).migrate()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '0000'"))
    engine.dispose()
    with pytest.raises(SchemaMissing, match=r"revision 0000.*jobledger migrate"):
        SQLStore(url).count(JobQuery())


def test_tables_dropped_under_a_running_store_are_reported(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.migrate()
    assert store.count(JobQuery()) == 0
    with store.engine.begin() as conn:
        jobs.drop(conn)
    with pytest.raises(SchemaMissing, match="jobledger migrate"):
        store.count(JobQuery())
    store.close()


def test_schema_revision_is_the_head_of_the_shipped_migrations() -> None:
    scripts = ScriptDirectory(str(migrations.HERE))
    assert scripts.get_heads() == [SCHEMA_REVISION]


def test_a_newer_schema_is_refused_by_migrate_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    SQLStore(url).migrate()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(SchemaMissing, match="upgrade jobledger") as caught:
        SQLStore(url).migrate()
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_the_migrations_build_exactly_the_tables_the_code_uses(
    backend: str, make_sql_store: Callable[[str], SQLStore]
) -> None:
    """schema.py (what queries use) and the migrations (what databases get) never drift."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from jobledger.stores.schema import metadata

    store = make_sql_store(backend)
    with store.engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": VERSION_TABLE,
                # the session database holds other tests' tables too (staging's app_orders)
                "include_name": lambda name, kind, parent: (
                    kind != "table" or str(name).startswith("jobledger")
                ),
            },
        )
        differences = [
            d
            for d in compare_metadata(context, metadata)
            # the trigram indexes are made beside the migrations, where pg_trgm can be had
            if not (d[0] == "remove_index" and d[1].name.endswith("_trgm"))
        ]
    assert differences == []
