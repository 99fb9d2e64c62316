"""The hot path: a job's transitions stop rewriting the argument search indexes (PostgreSQL).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

PostgreSQL makes an UPDATE HOT (no new index entries) only when no indexed column changes, and
every transition changes ``state``, which the ledger's queries need indexed; so each one added
an entry to all nine indexes of ``jobledger_jobs``, three of them trigram GIN indexes on the
arguments (about 60% of a job's WAL). The searchable text now has a table of its own,
``jobledger_job_search``, filled by a trigger when a job is inserted (by the store, by staging
in the caller's transaction, by a bulk load) and emptied when it is deleted; the trigram
indexes move there (``ensure_search_index``, run by ``jobledger migrate`` after the
migrations). On SQLite and MariaDB/MySQL the table is made and stays empty.
"""

import sqlalchemy as sa
from alembic import op

from jobledger.stores.migrations import JOB_ID, LONG_TEXT, MYSQL_TABLE

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SEARCH_FIELDS = ("args", "kwargs", "tags")


def upgrade() -> None:
    op.create_table(
        "jobledger_job_search",
        sa.Column("id", JOB_ID, primary_key=True),
        *(sa.Column(c, LONG_TEXT, nullable=False) for c in SEARCH_FIELDS),
        **MYSQL_TABLE,
    )
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(
        "INSERT INTO jobledger_job_search (id, args, kwargs, tags) "
        "SELECT id, args, kwargs, tags FROM jobledger_jobs"
    )
    op.execute(
        "CREATE OR REPLACE FUNCTION jobledger_job_search_sync() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ "
        "BEGIN "
        "IF TG_OP = 'DELETE' THEN "
        "DELETE FROM jobledger_job_search WHERE id = OLD.id; "
        "ELSE "
        "INSERT INTO jobledger_job_search (id, args, kwargs, tags) "
        "VALUES (NEW.id, NEW.args, NEW.kwargs, NEW.tags) "
        "ON CONFLICT (id) DO UPDATE SET args = EXCLUDED.args, kwargs = EXCLUDED.kwargs, "
        "tags = EXCLUDED.tags; "
        "END IF; "
        "RETURN NULL; "
        "END $$"
    )
    # UPDATE OF: only an update that sets the searched columns fires it; transitions never do.
    op.execute(
        "CREATE TRIGGER jobledger_job_search_sync "
        "AFTER INSERT OR DELETE OR UPDATE OF args, kwargs, tags ON jobledger_jobs "
        "FOR EACH ROW EXECUTE FUNCTION jobledger_job_search_sync()"
    )
    for column in SEARCH_FIELDS:
        op.execute(f"DROP INDEX IF EXISTS ix_jobledger_jobs_{column}_trgm")


def downgrade() -> None:
    # The older jobledger's `migrate` builds its trigram indexes on the jobs table again.
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS jobledger_job_search_sync ON jobledger_jobs")
        op.execute("DROP FUNCTION IF EXISTS jobledger_job_search_sync()")
    op.drop_table("jobledger_job_search")
