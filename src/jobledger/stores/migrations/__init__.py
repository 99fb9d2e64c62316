"""The ledger's Alembic migrations, applied by ``jobledger migrate`` (or on start-up)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.dialects import mysql, postgresql

from jobledger.stores.schema import VERSION_TABLE

log = logging.getLogger(__name__)

HERE = Path(__file__).parent

# What the revisions' tables share. Frozen as the revisions are: a later change of type gets a
# name of its own here, so that no applied revision changes under a database.
MYSQL_TABLE: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}
LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
JOB_ID = sa.String(255).with_variant(postgresql.VARCHAR(255, collation="C"), "postgresql")


def alembic_config(connection: Connection) -> Config:
    """An Alembic config that runs the shipped migrations on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection) -> str:
    """Bring the schema to the newest revision (idempotent), then make sure the argument search
    index exists where the database can have one. Returns how argument search is served."""
    command.upgrade(alembic_config(connection), "head")
    return ensure_search_index(connection)


def ensure_search_index(connection: Connection) -> str:
    """On PostgreSQL, trigram GIN indexes on the arguments (their copy in
    ``jobledger_job_search``) make ``match`` fast on big ledgers.

    ``pg_trgm`` ships with PostgreSQL's contrib package but needs ``CREATE`` rights to enable;
    where it cannot be had, search still works by scanning, and this says so (run
    ``jobledger migrate`` again once the extension is there). Other databases scan.
    """
    if connection.dialect.name != "postgresql":
        return "scan (no substring index on this database)"
    available = connection.execute(
        text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
    ).scalar()
    if not available:
        reason = "pg_trgm is not installed on the server (PostgreSQL contrib package)"
        log.warning("argument search will scan the jobs table: %s", reason)
        return f"scan ({reason})"
    try:
        with connection.begin_nested():
            connection.execute(text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    except Exception as exc:
        reason = f"cannot enable pg_trgm: {str(exc).splitlines()[0]}"
        log.warning("argument search will scan the jobs table: %s", reason)
        return f"scan ({reason})"
    for column in ("args", "kwargs", "tags"):  # on the search copy: see revision 0003
        connection.execute(
            text(
                f"CREATE INDEX IF NOT EXISTS ix_jobledger_job_search_{column}_trgm "
                f"ON jobledger_job_search USING gin ({column} gin_trgm_ops)"
            )
        )
    return "pg_trgm (trigram GIN indexes)"


__all__ = [
    "JOB_ID",
    "LONG_TEXT",
    "MYSQL_TABLE",
    "VERSION_TABLE",
    "alembic_config",
    "ensure_search_index",
    "upgrade",
]
