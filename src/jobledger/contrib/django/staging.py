# mypy: disable-error-code="import-untyped"
"""Staging through a Django ``transaction.atomic`` block: the outbox's Django adapter.

``using=`` may be a database alias (or its connection object); without ``using=`` a job staged
inside ``transaction.atomic()`` on the default database goes into that block. The job row is
inserted with the SQL of the SQLAlchemy adapter (:func:`~jobledger.stores.staging.staged_insert`),
compiled for the connection's database and run on Django's cursor, so it commits or rolls back
with the block. Django's ``on_commit`` hands the ids to the fast path after the outermost
commit.

A refused job (a duplicate job id, missing ledger tables) leaves the block usable: the tables
are checked before any write, and a duplicate inserts nothing (on PostgreSQL through ``ON
CONFLICT DO NOTHING``, since a failed statement would abort the transaction). Any other failed
INSERT marks the block for rollback, as a failed ``Model.save()`` does.

Importing this module needs no Django settings; it touches them only when staging.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from typing import Any, cast

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, IntegrityError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from sqlalchemy.dialects.mysql.base import MySQLDialect
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from jobledger.errors import ConfigError, StagingError
from jobledger.model import JobRecord
from jobledger.staging import Flush, TransactionHolder, hand_over, holders
from jobledger.stores.schema import jobs, key_holder, ledger_id_select
from jobledger.stores.staging import refusal, staged_insert

#: Django's database vendor → jobledger's backend name (as in ``database_identity``). MariaDB
#: is Django's "mysql"; the ledger's ``mysql+pymysql://`` URL says "mysql" for it too.
BACKENDS = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mysql"}

#: The dialects the INSERT is compiled for, with ``%s`` placeholders: Django's cursor takes
#: them on every backend. Base dialects, so no driver's bind casts leak into the SQL.
_DIALECTS: dict[str, Dialect] = {
    "sqlite": SQLiteDialect(paramstyle="format"),
    "postgresql": PGDialect(paramstyle="format"),  # type: ignore[no-untyped-call]
    "mysql": MySQLDialect(paramstyle="format"),
}

#: (alias, database) → the ledger id found there, read once (see ``DjangoHolder.ledger_id``).
_ledger_ids: dict[tuple[str, str | None], str] = {}

#: (alias, database) pairs whose ledger tables were seen: checked once, not per job.
_has_tables: set[tuple[str, str | None]] = set()

#: The attribute on a Django connection holding (weakly) its :class:`_Pending` ids.
_PENDING = "_jobledger_pending"

#: libpq parameters a PostgreSQL ``OPTIONS`` entry may carry over to the ledger's URL.
_LIBPQ_OPTIONS = frozenset(
    {
        "application_name",
        "channel_binding",
        "gssencmode",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "options",
        "passfile",
        "service",
        "sslcert",
        "sslcrl",
        "sslkey",
        "sslmode",
        "sslpassword",
        "sslrootcert",
        "target_session_attrs",
    }
)
#: MySQL ``OPTIONS`` PyMySQL takes from the URL (charset is not one: the ledger needs utf8mb4).
_MYSQL_OPTIONS = frozenset({"unix_socket", "read_default_file", "read_default_group"})


class DjangoHolder:
    """The open ``transaction.atomic`` block of one Django database connection."""

    def __init__(self, using: str | Any = DEFAULT_DB_ALIAS) -> None:
        """``using``: a database alias, or its connection object."""
        self.connection: Any = connections[using] if isinstance(using, str) else using
        self.alias: str = self.connection.alias
        vendor = self.connection.vendor
        if vendor not in BACKENDS:
            raise StagingError(
                f"cannot stage jobs in Django database {self.alias!r}: jobledger supports "
                f"SQLite, PostgreSQL and MariaDB/MySQL, not {vendor}"
            )
        self.dialect = _DIALECTS[vendor]
        self.database = _identity(self.connection)

    def __repr__(self) -> str:
        return f"DjangoHolder({self.alias!r})"

    def insert(self, record: JobRecord) -> str | None:
        connection = self.connection
        if connection.needs_rollback:
            raise StagingError(
                f"cannot stage job {record.id}: the transaction.atomic block on {self.alias!r} "
                "already failed and will roll back"
            )
        self._check_tables()
        sql, params = _compile(staged_insert(record, self.dialect.name), self.dialect)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                if self.dialect.name != "postgresql" or cursor.fetchone() is not None:
                    return None
        except IntegrityError:  # MySQL, SQLite: only the statement failed, not the block
            pass
        except DatabaseError as exc:  # the block may be broken (PostgreSQL): Django's rule
            transaction.set_rollback(True, using=self.alias)
            raise StagingError(f"staging job {record.id} failed: {exc}") from exc
        # nothing inserted (PostgreSQL's ON CONFLICT DO NOTHING: the block goes on)
        holder = None
        if record.unique_key is not None:
            sql, params = _compile(key_holder(record.unique_key), self.dialect)
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                row = cursor.fetchone()
            holder = None if row is None else row[0]
        return refusal(record, holder)

    def ledger_id(self) -> str | None:
        self._check_tables()
        key = (self.alias, self.database)
        found = _ledger_ids.get(key)
        if found is None:
            sql, params = _compile(ledger_id_select(), self.dialect)
            with self.connection.cursor() as cursor:
                cursor.execute(sql, params)
                row = cursor.fetchone()
            if row is not None:
                found = _ledger_ids[key] = str(row[0])
        return found

    def _check_tables(self) -> None:
        """Before any write, so a missing table never fails a statement: on PostgreSQL that
        would abort the caller's transaction."""
        key = (self.alias, self.database)
        if key in _has_tables:
            return
        try:
            with transaction.mark_for_rollback_on_error(using=self.alias):
                found = jobs.name in self.connection.introspection.table_names()
        except DatabaseError as exc:
            raise StagingError(f"cannot stage in Django database {self.alias!r}: {exc}") from exc
        if not found:
            raise StagingError(
                f"the ledger tables are not in Django database {self.alias!r}: add "
                "'jobledger.contrib.django' to INSTALLED_APPS and run `manage.py migrate` "
                f"(`manage.py migrate --database {self.alias}` for that database)"
            )
        _has_tables.add(key)

    def after_commit(self, job_id: str, flush: Flush) -> None:
        pending = _pending(self.connection)
        pending.items.append((job_id, flush))
        # One callback per id: Django drops those registered in a savepoint that rolls back,
        # and each surviving one hands over every id, so the first to run does it all.
        transaction.on_commit(pending.hand_over, using=self.alias, robust=True)


def _compile(statement: ClauseElement, dialect: Dialect) -> tuple[str, list[Any]]:
    """``statement`` as SQL with ``%s`` placeholders and its parameters, each passed through
    its column type's bind processing as SQLAlchemy would."""
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
    params = []
    for name in compiled.positiontup or ():
        value = compiled.params[name]
        process = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
        params.append(value if process is None or value is None else process(value))
    return str(compiled), params


class _Pending:
    """The ids staged on one connection in its current transaction.

    Only the ``on_commit`` callbacks hold it strongly (the connection keeps a weak reference),
    so when Django drops them at a rollback the ids go with them, and the next transaction
    starts a fresh list. The ids of a rolled-back savepoint may ride along with the rest: the
    fast path reads the rows back, and those are not there.
    """

    __slots__ = ("__weakref__", "items")

    def __init__(self) -> None:
        self.items: list[tuple[str, Flush]] = []

    def hand_over(self) -> None:
        items, self.items = self.items, []
        hand_over(items)


def _pending(connection: Any) -> _Pending:
    ref: weakref.ref[_Pending] | None = getattr(connection, _PENDING, None)
    pending = ref() if ref is not None else None
    if pending is None:
        pending = _Pending()
        setattr(connection, _PENDING, weakref.ref(pending))
    return pending


def _identity(connection: Any) -> str | None:
    """``backend:name`` like :func:`jobledger.stores.sql.database_identity`; None when the
    settings do not name the database (a PostgreSQL service file)."""
    backend = BACKENDS.get(connection.vendor)
    name = connection.settings_dict.get("NAME")
    if backend is None or not name:
        return None
    name = os.fspath(name)
    if backend == "sqlite" and name != ":memory:" and not name.startswith("file:"):
        name = os.path.abspath(name)
    return f"{backend}:{name}"


def _configured() -> bool:
    """Django's settings are loaded, or will be at first touch (``DJANGO_SETTINGS_MODULE``:
    ``configured`` stays False until something reads a setting)."""
    return bool(settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"))


def adapt(using: object) -> TransactionHolder | None:
    """A holder for a Django database alias or connection inside ``transaction.atomic``;
    None for anything else (another adapter's kind, or an alias Django does not have)."""
    if isinstance(using, BaseDatabaseWrapper):
        connection: Any = using
    elif isinstance(using, str) and _configured() and using in connections:
        connection = connections[using]
    else:
        return None
    if not connection.in_atomic_block:
        raise StagingError(
            f"not inside transaction.atomic(using={connection.alias!r}): staging commits with "
            "your transaction; wrap the call in transaction.atomic, or leave using= out to "
            "stage and publish at once"
        )
    return DjangoHolder(connection)


def current() -> TransactionHolder | None:
    """The default database's ``transaction.atomic`` block open in this thread, if any."""
    if not in_atomic_block(DEFAULT_DB_ALIAS):
        return None
    return DjangoHolder(DEFAULT_DB_ALIAS)


def in_atomic_block(using: str = DEFAULT_DB_ALIAS) -> bool:
    """Whether this thread is inside ``transaction.atomic`` on database ``using``; False when
    Django is not set up. :class:`StagingError` for an alias Django does not have."""
    if not _configured():
        return False
    if using not in connections:
        raise StagingError(f"Django has no database {using!r} (DATABASES: {_aliases()})")
    return bool(connections[using].in_atomic_block)


def database_url(alias: str = DEFAULT_DB_ALIAS) -> str:
    """A ledger URL for the database Django's ``DATABASES[alias]`` describes, so the ledger
    (``JOBLEDGER_DATABASE_URL``, :class:`~jobledger.stores.sql.SQLStore`) can share it without
    repeating the settings. Carries host, port, user, password, name and the connection
    ``OPTIONS`` a URL can express (SSL, sockets); :class:`ConfigError` if there is no such
    URL (an in-memory SQLite database, an unsupported backend)."""
    if not _configured() or alias not in connections:
        raise ConfigError(f"Django has no database {alias!r}")
    connection = connections[alias]
    vendor = connection.vendor
    spec: Mapping[str, Any] = connection.settings_dict
    name = spec.get("NAME")
    if vendor == "sqlite":
        if not name or os.fspath(name) == ":memory:" or os.fspath(name).startswith("file:"):
            raise ConfigError(
                f"Django database {alias!r} is an in-memory SQLite database: the ledger cannot "
                "share it"
            )
        return f"sqlite:///{os.path.abspath(os.fspath(name))}"
    options: Mapping[str, Any] = spec.get("OPTIONS") or {}
    query: dict[str, str] = {}
    host = spec.get("HOST") or None
    if vendor == "postgresql":
        driver = "postgresql+psycopg"
        query.update({k: str(v) for k, v in options.items() if k in _LIBPQ_OPTIONS})
        if host and host.startswith("/"):  # a socket directory
            query["host"], host = host, None
    elif vendor == "mysql":
        driver = "mysql+pymysql"
        query.update({k: str(v) for k, v in options.items() if k in _MYSQL_OPTIONS})
        ssl = options.get("ssl")
        if isinstance(ssl, Mapping):
            query.update({f"ssl_{k}": str(v) for k, v in ssl.items()})
        if host and host.startswith("/"):
            query["unix_socket"], host = host, None
    else:
        raise ConfigError(
            f"Django database {alias!r} is {vendor}: jobledger supports SQLite, PostgreSQL and "
            "MariaDB/MySQL"
        )
    port = spec.get("PORT")
    url = URL.create(
        driver,
        username=spec.get("USER") or None,
        password=spec.get("PASSWORD") or None,
        host=host,
        port=int(port) if port else None,
        database=os.fspath(name) if name else None,
        query=query,
    )
    return url.render_as_string(hide_password=False)


def _aliases() -> str:
    return ", ".join(connections) or "none"


holders.register(adapt, current)
