# mypy: disable-error-code="import-untyped"
"""Django migrations that put the ledger's tables in a Django database (``manage.py migrate``).

The SQL is Alembic's: the revisions ``jobledger migrate`` applies
(:mod:`jobledger.stores.migrations`), rendered offline for the database's dialect and run
through Django's connection. So a ledger made by Django is the very schema ``jobledger
migrate`` makes, with the same version table, and either tool can take it from there: a
database ``jobledger migrate`` already brought up to date is left alone. A later Django
migration of this app calls :func:`upgrade_ledger` again to apply new Alembic revisions.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from typing import Any, TextIO, cast

from django.db import transaction

from jobledger.errors import SchemaMissing
from jobledger.stores.schema import (
    LEDGER_ID,
    LEDGER_ID_EXPIRES,
    SCHEMA_REVISION,
    VERSION_TABLE,
    locks,
    metadata,
)

log = logging.getLogger(__name__)

#: Django's database vendor → the SQLAlchemy dialect Alembic renders for (MariaDB is Django's
#: "mysql", and ``jobledger migrate`` through ``mysql+pymysql`` renders for "mysql" too).
DIALECTS = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mysql"}

LEDGER_TABLES = tuple(table.name for table in metadata.sorted_tables)


def upgrade_ledger(apps: Any, schema_editor: Any) -> None:
    """``RunPython`` forward: bring the ledger schema in this database to the revision this
    jobledger needs, then (PostgreSQL) the argument search index, as ``jobledger migrate``
    does. Idempotent."""
    connection = schema_editor.connection
    dialect = dialect_for(connection)
    current = current_revision(connection)
    if current != SCHEMA_REVISION:
        if current is None:
            tables = set(connection.introspection.table_names())
            found = sorted(tables.intersection(LEDGER_TABLES))
            if found:
                raise SchemaMissing(
                    f"database {connection.alias!r} has ledger tables ({', '.join(found)}) but "
                    f"no schema revision in {VERSION_TABLE}: drop them, or record their "
                    "revision there, before migrating"
                )
            if VERSION_TABLE in tables:  # empty (a downgrade to base): Alembic makes it anew
                _drop_version_table(schema_editor)
        for statement in alembic_sql(dialect, current, "head"):
            schema_editor.execute(statement, params=None)
    _ensure_ledger_id(connection)
    if dialect == "postgresql":
        from sqlalchemy import Connection

        from jobledger.stores.migrations import ensure_search_index

        served = ensure_search_index(cast(Connection, _DjangoConnection(connection)))
        log.info("ledger argument search in %r: %s", connection.alias, served)


def _ensure_ledger_id(connection: Any) -> None:
    """Name this ledger, as ``jobledger migrate`` does: staging compares the name its
    transaction's database holds with the ledger's (see ``LEDGER_ID``)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT token FROM {locks.name} WHERE name = %s", [LEDGER_ID])
        if cursor.fetchone() is None:
            cursor.execute(
                f"INSERT INTO {locks.name} (name, token, expires_at) VALUES (%s, %s, %s)",
                [LEDGER_ID, secrets.token_hex(16), LEDGER_ID_EXPIRES],
            )


def downgrade_ledger(apps: Any, schema_editor: Any) -> None:
    """``RunPython`` backward: drop the ledger's tables (its jobs with them) and its version
    table."""
    connection = schema_editor.connection
    current = current_revision(connection)
    if current is not None:
        for statement in alembic_sql(dialect_for(connection), current, "base"):
            schema_editor.execute(statement, params=None)
    if VERSION_TABLE in connection.introspection.table_names():
        _drop_version_table(schema_editor)


def downgrade_ledger_to(revision: str) -> Any:
    """A ``RunPython`` backward that takes the ledger schema back to ``revision`` (the one
    the Django migration before it brought), keeping the tables and their jobs."""

    def backward(apps: Any, schema_editor: Any) -> None:
        connection = schema_editor.connection
        current = current_revision(connection)
        if current is not None and current != revision:
            for statement in alembic_sql(dialect_for(connection), current, revision, upward=False):
                schema_editor.execute(statement, params=None)

    return backward


def _drop_version_table(schema_editor: Any) -> None:
    schema_editor.execute(f"DROP TABLE {schema_editor.quote_name(VERSION_TABLE)}", params=None)


def dialect_for(connection: Any) -> str:
    try:
        return DIALECTS[connection.vendor]
    except KeyError:
        raise SchemaMissing(
            f"jobledger supports SQLite, PostgreSQL and MariaDB/MySQL, not {connection.vendor} "
            f"(database {connection.alias!r})"
        ) from None


def current_revision(connection: Any) -> str | None:
    """The ledger's Alembic revision in this database; None if it has none."""
    if VERSION_TABLE not in connection.introspection.table_names():
        return None
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT version_num FROM {connection.ops.quote_name(VERSION_TABLE)}")
        found = [str(row[0]) for row in cursor.fetchall()]
    if len(found) > 1:
        raise SchemaMissing(
            f"{VERSION_TABLE} in database {connection.alias!r} holds several revisions "
            f"({', '.join(found)}); jobledger's migrations are linear"
        )
    return found[0] if found else None


def alembic_sql(
    dialect: str, start: str | None, destination: str, *, upward: bool | None = None
) -> list[str]:
    """The statements Alembic runs to take the ledger from revision ``start`` (None: no
    schema) to ``destination`` on ``dialect``, in order: up for ``head``, down for ``base``,
    as ``upward`` says for a revision."""
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext
    from alembic.runtime.migration import MigrationContext, RevisionStep
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    from jobledger.stores import migrations as ledger_migrations

    config = Config()
    config.set_main_option("script_location", str(ledger_migrations.HERE))
    script = ScriptDirectory.from_config(config)
    if upward is None:
        upward = destination != "base"

    def steps(heads: Any, context: MigrationContext) -> Iterable[RevisionStep]:
        if upward:
            return script._upgrade_revs(destination, heads)
        return script._downgrade_revs(destination, heads)

    output = _Statements()
    try:
        # What env.py does online (the same version table), with offline options instead.
        with EnvironmentContext(
            config,
            script,
            fn=steps,
            as_sql=True,
            starting_rev=start,
            destination_rev=destination,
        ) as env:
            env.configure(
                dialect_name=dialect,
                output_buffer=cast(TextIO, output),
                version_table=VERSION_TABLE,
                target_metadata=metadata,
                transactional_ddl=False,  # Django's migration holds the transaction
                literal_binds=True,
            )
            # The version-row INSERT needs no RETURNING, which SQLite < 3.35 lacks.
            env.get_context().dialect.insert_returning = False
            with env.begin_transaction():
                env.run_migrations()
    except CommandError as exc:  # e.g. a database migrated by a newer jobledger
        raise SchemaMissing(
            f"cannot migrate the ledger from revision {start}: {exc}; if a newer jobledger "
            "migrated it, upgrade jobledger"
        ) from None
    return output.statements


class _Statements:
    """Alembic's offline output, one statement per write (comments dropped)."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def write(self, text: str) -> int:
        statement = text.strip()
        if statement and not statement.startswith("--"):
            self.statements.append(statement.removesuffix(";").rstrip())
        return len(text)

    def flush(self) -> None:
        pass


class _DjangoConnection:
    """Enough of a SQLAlchemy Connection over Django's for
    :func:`~jobledger.stores.migrations.ensure_search_index`, so the search index is made by
    the same code as under ``jobledger migrate``."""

    class _Dialect:
        name = "postgresql"

    class _Result:
        def __init__(self, rows: list[Any]) -> None:
            self.rows = rows

        def scalar(self) -> Any:
            return self.rows[0][0] if self.rows else None

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.dialect = self._Dialect()

    def execute(self, statement: object) -> _DjangoConnection._Result:
        with self.connection.cursor() as cursor:
            cursor.execute(str(statement))
            return self._Result(list(cursor.fetchall()) if cursor.description else [])

    def begin_nested(self) -> Any:
        return transaction.atomic(using=self.connection.alias)


__all__ = ["current_revision", "downgrade_ledger", "upgrade_ledger"]
