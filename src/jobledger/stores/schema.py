"""The ledger's tables, and the database clock every SQL timestamp comes from.

Times are stored as epoch seconds in double-precision columns rather than as dialect date types:
one code path serves SQLite, PostgreSQL and MariaDB/MySQL, ages and durations are plain
subtraction in SQL, and the only per-dialect piece is :class:`db_now`. Tables carry a
``jobledger_`` prefix so they can live in the application's own database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    select,
    text,
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

#: The Alembic revision this version of jobledger needs; ``jobledger migrate`` brings a
#: database there. A test checks it is the newest revision shipped.
SCHEMA_REVISION = "0007"

#: Alembic's version table for the ledger's own migrations, apart from the application's.
VERSION_TABLE = "jobledger_alembic_version"

_MYSQL_TABLE: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    # Binary collation: ids, names and argument search are case-sensitive on every database.
    "mysql_collate": "utf8mb4_bin",
}

LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
#: Job ids order byte-wise on every database (PostgreSQL's "C" collation, MySQL's utf8mb4_bin,
#: SQLite's BINARY), so keyset pages tie-break the same way everywhere.
JobId = String(255).with_variant(postgresql.VARCHAR(255, collation="C"), "postgresql")

metadata = MetaData()


def _stamp(name: str, nullable: bool = True) -> Column[Any]:
    return Column(name, Double(), nullable=nullable)


jobs = Table(
    "jobledger_jobs",
    metadata,
    Column("id", JobId, primary_key=True),
    Column("system", String(64), nullable=False),
    Column("name", String(255), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("args", LongText, nullable=False),
    Column("kwargs", LongText, nullable=False),
    Column("tags", LongText, nullable=False),
    Column("options", LongText, nullable=False),
    Column("state", String(16), nullable=False),
    Column("owner", String(255)),
    Column("attempts", Integer, nullable=False),
    Column("recoveries", Integer, nullable=False),
    Column("restarts", Integer, nullable=False),
    Column("generation", Integer, nullable=False, server_default="0"),
    Column("recent_recoveries", Text),
    Column("history", LongText),
    Column("error", Text),
    _stamp("created_at", nullable=False),
    _stamp("staged_at"),
    _stamp("first_queued_at"),
    _stamp("queued_at"),
    _stamp("started_at"),
    _stamp("finished_at"),
    _stamp("recovered_at"),
    _stamp("updated_at", nullable=False),
    Column("unique_key", String(255)),
    # The key while the job holds it (see ``rows.UNIQUE_HOLD``): a unique index, in which
    # NULLs (no key, or freed) never collide.
    Column("unique_hold", String(255)),
    Index("ix_jobledger_jobs_created", "created_at", "id"),
    Index("ix_jobledger_jobs_state_created", "state", "created_at", "id"),
    Index("ix_jobledger_jobs_state_updated", "state", "updated_at"),
    Index("ix_jobledger_jobs_queue_state", "queue", "state", "queued_at"),
    Index("ix_jobledger_jobs_name_state", "name", "state"),
    Index("ix_jobledger_jobs_recovered", "recoveries", "created_at"),
    # Partial where the database has it: on PostgreSQL every transition is a non-HOT UPDATE
    # that adds an entry to each full index, and most jobs hold no key.
    Index(
        "ux_jobledger_jobs_unique_hold",
        "unique_hold",
        unique=True,
        postgresql_where=text("unique_hold IS NOT NULL"),
        sqlite_where=text("unique_hold IS NOT NULL"),
    ),
    # ``jobs --unique-key``: the jobs published with a key, finished ones included.
    Index(
        "ix_jobledger_jobs_unique_key",
        "unique_key",
        postgresql_where=text("unique_key IS NOT NULL"),
        sqlite_where=text("unique_key IS NOT NULL"),
    ),
    **_MYSQL_TABLE,
)

#: PostgreSQL's copy of each job's searchable text, written once by a trigger when the job is
#: inserted and deleted with it: its trigram GIN indexes live here, apart from the jobs table,
#: whose every transition is an UPDATE that PostgreSQL cannot make HOT (the state is indexed)
#: and that would otherwise add entries to all three. Empty, and unused, on other databases,
#: whose argument search scans the jobs table (InnoDB and SQLite rewrite only the index entries
#: whose columns change).
job_search = Table(
    "jobledger_job_search",
    metadata,
    Column("id", JobId, primary_key=True),
    Column("args", LongText, nullable=False),
    Column("kwargs", LongText, nullable=False),
    Column("tags", LongText, nullable=False),
    **_MYSQL_TABLE,
)

instances = Table(
    "jobledger_instances",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("nonce", String(50), nullable=False),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", Text, nullable=False),
    Column("state", String(16), nullable=False),
    _stamp("started_at", nullable=False),
    _stamp("heartbeat_at", nullable=False),
    Column("holding", LongText),
    Column("stats", Text),
    **_MYSQL_TABLE,
)

locks = Table(
    "jobledger_locks",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("token", String(255), nullable=False),
    _stamp("expires_at", nullable=False),
    **_MYSQL_TABLE,
)


#: The row of ``jobledger_locks`` that names a ledger: a random token written once (by
#: ``jobledger migrate``, the Django migration or the store's first use) and never taken as a
#: lock. A caller's transaction reads it to prove it writes to the ledger's own database.
LEDGER_ID = "jobledger.ledger-id"
#: The ``expires_at`` of that row: never.
LEDGER_ID_EXPIRES = 1e18


def key_holder(key: Any) -> Select[Any]:
    """The id of the unfinished job that holds unique ``key`` (a value, or a bind parameter
    for a statement prepared once)."""
    return select(jobs.c.id).where(jobs.c.unique_hold == key)


def ledger_id_select() -> Select[Any]:
    return select(locks.c.token).where(locks.c.name == LEDGER_ID)


class db_now(FunctionElement[float]):
    """The database server's clock in epoch seconds (never the caller's)."""

    type = Double()
    inherit_cache = True


@compiles(db_now)
def _now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _now_postgresql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(extract(epoch from statement_timestamp()) AS double precision)"


@compiles(db_now, "mysql")
@compiles(db_now, "mariadb")
def _now_mysql(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # UTC_TIMESTAMP, not NOW: the value must not depend on the session time zone, which is not
    # ours on a connection staging through the application's transaction (Django's).
    return "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1000000e0)"
