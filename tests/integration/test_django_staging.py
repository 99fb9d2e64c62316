"""Django on SQLite, PostgreSQL and MariaDB: ``manage.py migrate`` makes the ledger's schema
(the one ``jobledger migrate`` makes), and jobs staged inside ``transaction.atomic`` commit,
roll back and publish with the block and the business rows beside them.

One Django project (``tests/django_project``) serves every backend: Django is set up once per
process, so each backend gets its aliases in it, on databases of this module's own: ``main``
(migrated; staging happens there), ``fresh`` (for the migration tests), ``pre`` (made by
``jobledger migrate`` first) and ``bare`` (no ledger tables).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

import django_project
from jobledger.errors import PublishError, StagingError
from jobledger.integrations.base import Published
from jobledger.model import JobRecord, JobState
from jobledger.outbox import Outbox
from jobledger.query import JobQuery
from jobledger.relay import Relay
from jobledger.staging import staging_in
from jobledger.stores.base import Transition
from jobledger.stores.schema import SCHEMA_REVISION, VERSION_TABLE, jobs, metadata
from jobledger.stores.sql import SQLStore, parse_url
from ledgerdb import MYSQL_URL, POSTGRES_URL, throwaway_database

#: backend → the alias prefix of its databases in the Django project ("sqlite": the default).
PREFIX = {"sqlite": "sqlite", "postgresql": "pg", "mariadb": "maria"}
ROLES = ("main", "fresh", "pre", "bare")
SERVERS = {"postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}
LEDGER_TABLES = sorted([*metadata.tables, VERSION_TABLE])


def alias(backend: str, role: str) -> str:
    if (backend, role) == ("sqlite", "main"):
        return "default"
    return f"{PREFIX[backend]}_{role}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The Django project, set up with every alias (alias → ledger URL)."""
    run = f"jl_dj_{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("django")
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as made:
        for role in ROLES:
            urls[alias("sqlite", role)] = f"sqlite:///{folder / role}.db"
            for backend, server in SERVERS.items():
                database = throwaway_database(server, f"{run}_{role}")
                urls[alias(backend, role)] = made.enter_context(database)
        django_project.setup(urls)
        from django.core.management import call_command
        from django.db import connections

        made.callback(connections.close_all)  # before the databases are dropped

        for backend in PREFIX:
            call_command("migrate", database=alias(backend, "main"), verbosity=0)
            call_command("migrate", "shop", database=alias(backend, "bare"), verbosity=0)
            pre = SQLStore(urls[alias(backend, "pre")])
            pre.migrate()  # `jobledger migrate`
            pre.close()
        yield urls


@pytest.fixture(params=list(PREFIX))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Recorder:
    """A publisher that takes every job and remembers each batch it was given; while
    ``down``, it takes none."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.down = False
        self.lock = threading.Lock()

    def __call__(self, records: Sequence[JobRecord]) -> Published:
        if self.down:
            return Published(error=PublishError("the broker is down"))
        ids = [record.id for record in records]
        with self.lock:
            self.batches.append(ids)
        return Published(ids=ids)

    @property
    def published(self) -> list[str]:
        return [job_id for batch in self.batches for job_id in batch]


@dataclass
class Env:
    """One backend's main database: its alias, the ledger on it and an outbox publishing to a
    recorder."""

    alias: str
    url: str
    store: SQLStore
    recorder: Recorder = field(default_factory=Recorder)
    outbox: Outbox = field(init=False)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.store, publish=self.recorder)

    def state(self, job_id: str) -> JobState | None:
        record = self.store.get(job_id)
        return None if record is None else record.state

    def relay_sees(self, job_id: str) -> bool:
        with self.store.staged_batch(limit=100) as batch:
            return job_id in {record.id for record in batch.records}


@pytest.fixture
def env(project: dict[str, str], backend: str) -> Iterator[Env]:
    from django_project.shop.models import Order

    name = alias(backend, "main")
    store = SQLStore(project[name])
    with store.engine.begin() as conn:
        conn.execute(jobs.delete())
    Order.objects.using(name).all().delete()
    yield Env(name, project[name], store)
    store.close()


def job(**changes: Any) -> JobRecord:
    fields: dict[str, Any] = {
        "id": f"job-{uuid.uuid4().hex}",
        "name": "shop.send_receipt",
        "args": [1, "two"],
        "kwargs": {"to": "ann@example.com", "note": "naïve 🧾"},
        "tags": {"order": "o-1"},
    }
    return JobRecord(**{**fields, **changes})


def orders(env: Env) -> set[str]:
    from django_project.shop.models import Order

    return set(Order.objects.using(env.alias).values_list("id", flat=True))


class Boom(Exception):
    pass


# -- manage.py migrate ---------------------------------------------------------------------


def schema(url: str) -> dict[str, Any]:
    """Everything about the ledger's tables a database reports: columns, types, collations,
    keys, indexes (the search index too) and, on MariaDB, the table options."""
    engine = create_engine(parse_url(url))
    found: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            tables = sorted(set(inspect(conn).get_table_names()) & set(LEDGER_TABLES))
            found["tables"] = tables
            dialect = conn.dialect.name
            for table in tables:
                if dialect == "sqlite":
                    rows = conn.execute(
                        text("SELECT type, name, sql FROM sqlite_master WHERE tbl_name = :t"),
                        {"t": table},
                    )
                    # Alembic's offline SQL indents with spaces, online with tabs.
                    found[table] = sorted(
                        (kind, item, " ".join((sql or "").split())) for kind, item, sql in rows
                    )
                elif dialect == "mysql":
                    found[table] = conn.execute(text(f"SHOW CREATE TABLE {table}")).one()[1]
                else:
                    columns = conn.execute(
                        text(
                            "SELECT column_name, data_type, character_maximum_length, "
                            "is_nullable, collation_name, column_default, ordinal_position "
                            "FROM information_schema.columns WHERE table_name = :t "
                            "AND table_schema = current_schema() ORDER BY ordinal_position"
                        ),
                        {"t": table},
                    )
                    indexes = conn.execute(
                        text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t"),
                        {"t": table},
                    )
                    found[table] = (sorted(map(tuple, columns)), sorted(map(tuple, indexes)))
    finally:
        engine.dispose()
    return found


def revision(url: str) -> str | None:
    engine = create_engine(parse_url(url))
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                return None
            return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    finally:
        engine.dispose()


def metadata_diff(url: str) -> list[Any]:
    """Alembic's autogenerate comparison of the ledger's tables with the SQLAlchemy metadata
    (the PostgreSQL search indexes are ``jobledger migrate``'s extra, not in the metadata)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    def ledger_only(obj: Any, name: str | None, kind: str, reflected: bool, other: Any) -> bool:
        if kind == "table":
            return bool(name and name.startswith("jobledger_"))
        return not (name or "").endswith("_trgm")

    engine = create_engine(parse_url(url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "include_object": ledger_only}
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def applied(name: str) -> bool:
    from django.db import connections
    from django.db.migrations.recorder import MigrationRecorder

    return ("jobledger", "0001_initial") in MigrationRecorder(
        connections[name]
    ).applied_migrations()


def test_migrate_makes_the_schema_jobledger_migrate_makes(
    project: dict[str, str], backend: str
) -> None:
    from django.core.management import call_command

    fresh, pre = project[alias(backend, "fresh")], project[alias(backend, "pre")]
    call_command("migrate", "jobledger", "zero", database=alias(backend, "fresh"), verbosity=0)
    assert schema(fresh)["tables"] == []

    call_command("migrate", "jobledger", database=alias(backend, "fresh"), verbosity=0)

    made = schema(fresh)
    assert made["tables"] == LEDGER_TABLES
    assert made == schema(pre)  # `jobledger migrate`'s, column by column, index by index
    if backend == "postgresql":
        assert any(name.endswith("_trgm") for name, _ in made["jobledger_job_search"][1])
    assert metadata_diff(fresh) == []
    assert revision(fresh) == SCHEMA_REVISION
    assert applied(alias(backend, "fresh"))

    call_command("migrate", "jobledger", database=alias(backend, "fresh"), verbosity=0)
    store = SQLStore(fresh)
    try:
        store.migrate()  # `jobledger migrate` finds the schema current
        assert schema(fresh) == made and revision(fresh) == SCHEMA_REVISION
        _exercise(store)
    finally:
        store.close()


def _exercise(store: SQLStore) -> None:
    """Real store work on a schema Django made."""
    first = job(state=JobState.QUEUED)
    assert store.create(first)
    started = Transition(to=JobState.STARTED, expect=frozenset({JobState.QUEUED}), owner="w1")
    assert store.transition(first.id, started)
    assert store.get(first.id).state is JobState.STARTED  # type: ignore[union-attr]
    assert [r.id for r in store.query(JobQuery(), limit=10).items] == [first.id]
    staged = job(state=JobState.STAGED)
    assert store.create(staged)
    with store.staged_batch(limit=10) as batch:
        assert [r.id for r in batch.records] == [staged.id]
        assert batch.mark_queued([staged.id]) == 1
    assert store.get(staged.id).state is JobState.QUEUED  # type: ignore[union-attr]


def test_migrate_leaves_a_ledger_jobledger_migrate_made(
    project: dict[str, str], backend: str
) -> None:
    from django.core.management import call_command

    name = alias(backend, "pre")
    before = schema(project[name])
    store = SQLStore(project[name])
    try:
        kept = job()
        assert store.create(kept)
        call_command("migrate", "jobledger", database=name, verbosity=0)
        assert applied(name)
        assert schema(project[name]) == before
        assert store.get(kept.id) is not None
    finally:
        store.close()


def test_migrate_backwards_drops_the_ledger(project: dict[str, str], backend: str) -> None:
    from django.core.management import call_command

    name = alias(backend, "fresh")
    url = project[name]
    call_command("migrate", "jobledger", database=name, verbosity=0)
    store = SQLStore(url)
    try:
        assert store.create(job())
        call_command("migrate", "jobledger", "zero", database=name, verbosity=0)
        assert schema(url)["tables"] == []
        assert not applied(name)
        call_command("migrate", "jobledger", database=name, verbosity=0)
        assert schema(url) == schema(project[alias(backend, "pre")])
        assert store.query(JobQuery(), limit=10).items == []
    finally:
        store.close()


def test_migrate_refuses_a_ledger_it_cannot_place(project: dict[str, str], backend: str) -> None:
    """A revision this jobledger does not know (a newer one migrated the database), or ledger
    tables without a revision: refused, nothing touched. An emptied version table (a
    downgrade to base) is made anew."""
    from django.core.management import call_command

    from jobledger.errors import SchemaMissing

    name = alias(backend, "fresh")
    url = project[name]
    call_command("migrate", "jobledger", database=name, verbosity=0)
    made = schema(url)
    engine = create_engine(parse_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
        call_command("migrate", "jobledger", "zero", fake=True, database=name, verbosity=0)
        with pytest.raises(SchemaMissing, match=r"9999.*upgrade jobledger"):
            call_command("migrate", "jobledger", database=name, verbosity=0)
        assert schema(url) == made

        with engine.begin() as conn:
            conn.execute(text(f"DELETE FROM {VERSION_TABLE}"))
        with pytest.raises(SchemaMissing, match="no schema revision"):
            call_command("migrate", "jobledger", database=name, verbosity=0)

        with engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(text(f"DROP TABLE {table.name}"))
        call_command("migrate", "jobledger", database=name, verbosity=0)
        assert schema(url) == made
        assert revision(url) == SCHEMA_REVISION
    finally:
        engine.dispose()


# -- staging ---------------------------------------------------------------------------------


def test_a_job_staged_in_a_committed_block_is_published_once(env: Env) -> None:
    from django.db import transaction

    from django_project.shop.models import Order

    record = job()
    with transaction.atomic(using=env.alias):
        Order.objects.using(env.alias).create(id="o-1")
        assert env.outbox.stage(record, using=env.alias) == record.id
        assert env.recorder.batches == []  # nothing leaves before the commit
    assert env.recorder.batches == [[record.id]]
    assert env.state(record.id) is JobState.QUEUED
    assert orders(env) == {"o-1"}
    assert not env.relay_sees(record.id)
    assert env.outbox.counters["published"] == 1


def test_a_job_the_fast_path_could_not_publish_is_left_to_the_relay(env: Env) -> None:
    from django.db import transaction

    record = job()
    env.recorder.down = True
    with transaction.atomic(using=env.alias):
        env.outbox.stage(record, using=env.alias)
    assert env.state(record.id) is JobState.STAGED
    assert env.outbox.counters["left_to_relay"] == 1

    env.recorder.down = False
    report = Relay(env.store, publish=env.recorder, grace=0, batch_size=100).run_once()
    assert report.published == 1
    assert env.recorder.batches == [[record.id]]
    assert env.state(record.id) is JobState.QUEUED


def test_a_rolled_back_block_takes_its_job_along(env: Env) -> None:
    from django.db import transaction

    from django_project.shop.models import Order

    record = job()
    with pytest.raises(Boom), transaction.atomic(using=env.alias):
        Order.objects.using(env.alias).create(id="o-1")
        env.outbox.stage(record, using=env.alias)
        raise Boom
    assert env.state(record.id) is None
    assert orders(env) == set()
    assert env.recorder.batches == []
    assert not env.relay_sees(record.id)


def test_a_rolled_back_savepoint_takes_only_its_own_job(env: Env) -> None:
    from django.db import transaction

    from django_project.shop.models import Order

    kept, dropped = job(), job()
    with transaction.atomic(using=env.alias):
        Order.objects.using(env.alias).create(id="o-kept")
        env.outbox.stage(kept, using=env.alias)
        with pytest.raises(Boom), transaction.atomic(using=env.alias):
            Order.objects.using(env.alias).create(id="o-dropped")
            env.outbox.stage(dropped, using=env.alias)
            raise Boom
    assert env.recorder.published == [kept.id]
    assert env.state(kept.id) is JobState.QUEUED
    assert env.state(dropped.id) is None
    assert orders(env) == {"o-kept"}


def test_a_block_whose_only_job_was_in_a_rolled_back_savepoint_publishes_nothing(
    env: Env,
) -> None:
    from django.db import transaction

    from django_project.shop.models import Order

    dropped = job()
    with transaction.atomic(using=env.alias):
        Order.objects.using(env.alias).create(id="o-1")
        with pytest.raises(Boom), transaction.atomic(using=env.alias):
            env.outbox.stage(dropped, using=env.alias)
            raise Boom
    assert env.recorder.batches == []
    assert env.state(dropped.id) is None
    assert orders(env) == {"o-1"}


def test_one_transaction_is_one_batch_through_savepoints(env: Env) -> None:
    from django.db import transaction

    first, inner, last = job(), job(), job()
    with transaction.atomic(using=env.alias):
        env.outbox.stage(first, using=env.alias)
        with transaction.atomic(using=env.alias):
            env.outbox.stage(inner, using=env.alias)
        env.outbox.stage(last, using=env.alias)
    assert len(env.recorder.batches) == 1
    assert sorted(env.recorder.batches[0]) == sorted([first.id, inner.id, last.id])
    assert {env.state(r.id) for r in (first, inner, last)} == {JobState.QUEUED}


def test_consecutive_transactions_publish_their_own_jobs(env: Env) -> None:
    from django.db import transaction

    rolled_back, committed = job(), job()
    with pytest.raises(Boom), transaction.atomic(using=env.alias):
        env.outbox.stage(rolled_back, using=env.alias)
        raise Boom
    with transaction.atomic(using=env.alias):
        env.outbox.stage(committed, using=env.alias)
    assert env.recorder.batches == [[committed.id]]


def test_threads_stage_in_their_own_transactions(env: Env) -> None:
    from django.db import connections, transaction

    records = [job() for _ in range(4)]
    errors: list[BaseException] = []
    # Every thread holds an open transaction at once; SQLite has one writer, so there they
    # take turns.
    ready = threading.Barrier(1 if env.alias == "default" else len(records))

    def stage(record: JobRecord) -> None:
        try:
            with transaction.atomic(using=env.alias):
                env.outbox.stage(record, using=env.alias)
                ready.wait(timeout=30)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=stage, args=(record,)) for record in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(env.recorder.batches) == sorted([[record.id] for record in records])


def test_ambient_block_on_the_default_database(project: dict[str, str]) -> None:
    from django.db import transaction

    store = SQLStore(project["default"])
    recorder = Recorder()
    outbox = Outbox(store, publish=recorder)
    try:
        dropped, kept = job(), job()
        with pytest.raises(Boom), transaction.atomic():
            outbox.stage(dropped)
            assert recorder.batches == []
            raise Boom
        assert store.get(dropped.id) is None
        with transaction.atomic():
            outbox.stage(kept)
            assert recorder.batches == []
        assert recorder.batches == [[kept.id]]
        assert store.get(kept.id).state is JobState.QUEUED  # type: ignore[union-attr]
    finally:
        store.close()


def test_staging_in_binds_an_alias(env: Env) -> None:
    from django.db import transaction

    record = job()
    with pytest.raises(Boom), transaction.atomic(using=env.alias), staging_in(env.alias):
        env.outbox.stage(record)
        raise Boom
    assert env.state(record.id) is None
    assert env.recorder.batches == []


def test_a_connection_object_works_as_using(env: Env) -> None:
    from django.db import connections, transaction

    record = job()
    with transaction.atomic(using=env.alias):
        env.outbox.stage(record, using=connections[env.alias])
    assert env.recorder.batches == [[record.id]]


def test_in_atomic_block(env: Env) -> None:
    from django.db import transaction

    from jobledger.contrib.django import in_atomic_block

    assert not in_atomic_block(env.alias)
    with transaction.atomic(using=env.alias):
        assert in_atomic_block(env.alias)
    assert not in_atomic_block(env.alias)
    with pytest.raises(StagingError, match="nope"):
        in_atomic_block("nope")


# -- refusals --------------------------------------------------------------------------------


def test_unknown_alias_is_refused(env: Env) -> None:
    from django.db import transaction

    with transaction.atomic(using=env.alias), pytest.raises(StagingError, match="'nope'"):
        env.outbox.stage(job(), using="nope")
    assert env.recorder.batches == []


def test_an_alias_outside_an_atomic_block_is_refused(env: Env) -> None:
    record = job()
    with pytest.raises(StagingError, match=r"not inside transaction\.atomic"):
        env.outbox.stage(record, using=env.alias)
    assert env.state(record.id) is None
    assert env.recorder.batches == []


def test_a_transaction_on_another_database_is_refused(env: Env) -> None:
    from django.db import transaction

    other = alias("postgresql" if env.alias == "default" else "sqlite", "main")
    with transaction.atomic(using=other), pytest.raises(StagingError, match="the ledger is in"):
        env.outbox.stage(job(), using=other)
    assert env.recorder.batches == []


def test_a_database_without_the_ledger_tables_is_refused(
    project: dict[str, str], backend: str
) -> None:
    """And the caller's transaction carries on: the check fails no statement (PostgreSQL
    would abort the transaction on one)."""
    from django.db import transaction

    from django_project.shop.models import Order

    name = alias(backend, "bare")
    store = SQLStore(project[name])
    outbox = Outbox(store, publish=Recorder())
    try:
        with transaction.atomic(using=name):
            Order.objects.using(name).create(id="before")
            with pytest.raises(StagingError, match=r"INSTALLED_APPS.*manage\.py migrate"):
                outbox.stage(job(), using=name)
            Order.objects.using(name).create(id="after")
        assert set(Order.objects.using(name).values_list("id", flat=True)) >= {"before", "after"}
        assert jobs.name not in inspect(store.engine).get_table_names()
    finally:
        Order.objects.using(name).all().delete()
        store.close()


def test_a_duplicate_id_is_refused_and_the_block_goes_on(env: Env) -> None:
    """A refused duplicate writes nothing and breaks nothing: the caller may catch the
    StagingError and commit the rest of its block (on PostgreSQL too, where a failed statement
    would have aborted the whole transaction)."""
    from django.db import transaction

    from django_project.shop.models import Order

    record = job()
    with transaction.atomic(using=env.alias):
        env.outbox.stage(record, using=env.alias)
        with pytest.raises(StagingError, match="exists already"):
            env.outbox.stage(record, using=env.alias)
        Order.objects.using(env.alias).create(id="o-1")
    assert env.recorder.batches == [[record.id]]
    assert orders(env) == {"o-1"}

    with transaction.atomic(using=env.alias):
        with pytest.raises(StagingError, match="exists already"):
            env.outbox.stage(record, using=env.alias)  # committed before: still refused
        Order.objects.using(env.alias).create(id="o-2")
    assert orders(env) == {"o-1", "o-2"}
    assert env.recorder.batches == [[record.id]]


def test_a_held_unique_key_stages_nothing_and_the_block_goes_on(env: Env) -> None:
    """The holder's id comes back and nothing is written, in the block that staged the
    holder and in a later one; the block's own rows commit."""
    from django.db import transaction

    from django_project.shop.models import Order

    first, second = job(unique_key="order:9"), job(unique_key="order:9")
    with transaction.atomic(using=env.alias):
        assert env.outbox.stage(first, using=env.alias) == first.id
        assert env.outbox.stage(second, using=env.alias) == first.id
        Order.objects.using(env.alias).create(id="o-1")
    with transaction.atomic(using=env.alias):
        assert env.outbox.stage(second, using=env.alias) == first.id
        Order.objects.using(env.alias).create(id="o-2")
    assert orders(env) == {"o-1", "o-2"}
    assert env.recorder.batches == [[first.id]]


# -- the ledger URL from Django's settings ---------------------------------------------------


def test_database_url_points_the_ledger_at_the_django_database(env: Env) -> None:
    from jobledger.contrib.django import DjangoHolder, database_url

    url = database_url(env.alias)
    assert parse_url(url) == parse_url(env.url)
    store = SQLStore(url)
    try:
        assert store.database == DjangoHolder(env.alias).database == env.store.database
        record = job()
        assert store.create(record)
        assert env.store.get(record.id) is not None
    finally:
        store.close()


def test_database_url_refuses_what_a_url_cannot_say(project: dict[str, str]) -> None:
    from jobledger.contrib.django import database_url
    from jobledger.errors import ConfigError

    with pytest.raises(ConfigError, match="no database 'nope'"):
        database_url("nope")


@pytest.mark.parametrize(
    ("backend", "spec", "expected"),
    [
        (
            "postgresql",
            {"HOST": "/run/postgresql", "PORT": "", "OPTIONS": {"sslmode": "require", "pool": 1}},
            "postgresql+psycopg://app:s%40cret@/shop?host=%2Frun%2Fpostgresql&sslmode=require",
        ),
        (
            "mariadb",
            {"HOST": "db", "PORT": 3307, "OPTIONS": {"charset": "utf8", "ssl": {"ca": "/ca.pem"}}},
            "mysql+pymysql://app:s%40cret@db:3307/shop?ssl_ca=%2Fca.pem",
        ),
        (
            "mariadb",
            {"HOST": "/run/mysqld/mysqld.sock", "OPTIONS": {}},
            "mysql+pymysql://app:s%40cret@/shop?unix_socket=%2Frun%2Fmysqld%2Fmysqld.sock",
        ),
    ],
)
def test_database_url_carries_what_a_url_can_say(
    project: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    spec: dict[str, Any],
    expected: str,
) -> None:
    """Sockets and SSL settings carry over; Django-only options (a pool, the charset: the
    ledger needs utf8mb4) do not."""
    from django.db import connections

    from jobledger.contrib.django import database_url

    name = alias(backend, "main")
    base = {"NAME": "shop", "USER": "app", "PASSWORD": "s@cret", "PORT": ""}
    settings_dict = {**connections[name].settings_dict, **base, **spec}
    monkeypatch.setattr(connections[name], "settings_dict", settings_dict)
    assert database_url(name) == expected


def test_import_needs_no_settings(tmp_path: Path) -> None:
    """The core imports the adapter whenever Django is installed, configured or not."""
    import subprocess
    import sys

    code = (
        "import jobledger.contrib.django as d\n"
        "from jobledger.staging import holders\n"
        "from django.conf import settings\n"
        "assert not settings.configured\n"
        "assert holders.resolve() is None and not d.in_atomic_block()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)


# -- Celery tasks in a Django project: task.stage, and delay() staged inside atomic -------------
CELERY_BROKER = "redis://127.0.0.1:6379/14"


@dataclass
class CeleryEnv:
    app: Any
    integration: Any
    queue: str
    store: SQLStore
    tasks: dict[str, Any]

    def messages(self) -> list[dict[str, Any]]:
        """The task messages waiting in the queue's Redis list (no worker consumes them)."""
        import json

        import redis

        client = redis.Redis.from_url(CELERY_BROKER)  # LPUSH: the newest first
        return [json.loads(raw) for raw in reversed(client.lrange(self.queue, 0, -1))]

    def published_ids(self) -> list[str]:
        return [m["headers"]["id"] for m in self.messages()]


@pytest.fixture
def celery_env(project: dict[str, str]) -> Iterator[CeleryEnv]:
    """A Celery app on a real Redis broker with a queue of its own, tracked by jobledger with
    ``stage_in_atomic`` on, its ledger the Django project's default database."""
    import redis
    from celery import Celery

    from jobledger.config import Settings
    from jobledger.integrations.celery import install

    queue = f"djstage-{uuid.uuid4().hex[:8]}"
    app = Celery("djstage", broker=CELERY_BROKER, set_as_current=False)
    app.conf.task_default_queue = queue

    @app.task(name="shop.send_receipt", tracked=True, shared=False)
    def send_receipt(order_id: str) -> None: ...

    @app.task(name="shop.audit", tracked=True, staged=False, shared=False)
    def audit(order_id: str) -> None: ...

    settings = Settings(database_url=project["default"], stage_in_atomic=True, relay=False)
    integration = install(app, settings=settings)
    app.finalize()
    store = SQLStore(project["default"])
    try:
        yield CeleryEnv(app, integration, queue, store, {"send": send_receipt, "audit": audit})
    finally:
        integration.close()
        store.close()
        redis.Redis.from_url(CELERY_BROKER).delete(queue)


def test_delay_inside_atomic_is_staged_and_published_after_commit(celery_env: CeleryEnv) -> None:
    from django.db import transaction

    from django_project.shop.models import Order

    send, store = celery_env.tasks["send"], celery_env.store
    with transaction.atomic():
        Order.objects.create(id="o-1")
        result = send.delay("o-1")
        assert result.id  # the id at once (Celery's delay_on_commit gives none)
        assert store.get(result.id) is None  # not committed: the ledger's connection sees none
        with transaction.get_connection().cursor() as cursor:  # the transaction's own does
            cursor.execute("SELECT state FROM jobledger_jobs WHERE id = %s", [result.id])
            assert cursor.fetchall() == [("staged",)]
        assert celery_env.published_ids() == []  # nothing reaches the broker before the commit
    assert celery_env.published_ids() == [result.id]
    assert store.get(result.id).state is JobState.QUEUED

    with pytest.raises(RuntimeError), transaction.atomic():
        Order.objects.create(id="o-2")
        doomed = send.delay("o-2")
        raise RuntimeError("the order failed")
    assert store.get(doomed.id) is None
    assert not Order.objects.filter(id="o-2").exists()
    assert celery_env.published_ids() == [result.id]


def test_a_task_that_opts_out_publishes_at_once_even_inside_atomic(
    celery_env: CeleryEnv,
) -> None:
    from django.db import transaction

    audit = celery_env.tasks["audit"]
    with transaction.atomic():
        sent = audit.delay("o-3")
        assert celery_env.published_ids() == [sent.id]  # published before the commit
    assert celery_env.store.get(sent.id).state is JobState.QUEUED


def test_delay_outside_atomic_publishes_as_usual(celery_env: CeleryEnv) -> None:
    sent = celery_env.tasks["send"].delay("o-4")
    assert celery_env.published_ids() == [sent.id]
    assert celery_env.store.get(sent.id).state is JobState.QUEUED


def test_task_stage_keeps_a_countdown_as_an_absolute_eta(celery_env: CeleryEnv) -> None:
    from datetime import datetime, timezone

    from django.db import transaction

    send = celery_env.tasks["send"]
    before = datetime.now(timezone.utc)
    with transaction.atomic():
        staged = send.apply_staged(("o-5",), countdown=60)
        plain = send.stage("o-6")
    by_id = {m["headers"]["id"]: m for m in celery_env.messages()}
    assert sorted(by_id) == sorted([staged.id, plain.id])
    first, second = by_id[staged.id], by_id[plain.id]
    eta = datetime.fromisoformat(first["headers"]["eta"])
    assert 59 <= (eta - before).total_seconds() <= 61
    assert second["headers"]["eta"] is None
    assert celery_env.store.get(staged.id).options["eta"] == first["headers"]["eta"]


def test_apply_staged_on_a_named_database(celery_env: CeleryEnv, project: dict[str, str]) -> None:
    """``using=`` a Django alias: the job commits with that database's block. The ledger must be
    in that database, so a ledger elsewhere is refused before anything is written."""
    from django.db import transaction

    send = celery_env.tasks["send"]
    other = alias("postgresql", "main")
    with transaction.atomic(using=other), pytest.raises(StagingError, match="ledger is in"):
        send.apply_staged(("o-7",), using=other)
    assert celery_env.published_ids() == []


def test_an_unknown_task_is_refused_at_the_call(celery_env: CeleryEnv) -> None:
    from django.db import transaction

    with transaction.atomic(), pytest.raises(StagingError, match="not registered"):
        celery_env.integration.stage("shop.nope", ("o-8",))
    assert celery_env.store.count(JobQuery(queues={celery_env.queue})) == 0


def test_a_chain_inside_atomic_publishes_as_before(celery_env: CeleryEnv) -> None:
    """A chain's first task carries options a staged job does not keep: inside an atomic
    block it is published as it was before jobledger, not refused."""
    from celery import chain
    from django.db import transaction

    send = celery_env.tasks["send"]
    with transaction.atomic():
        chain(send.s("o-9"), send.si("o-10")).delay()
        assert len(celery_env.published_ids()) == 1  # published at once, before the commit
