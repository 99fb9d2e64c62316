"""An index on the unique key a job was published with, for ``jobs --unique-key``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

The filter lists every job published with a key, finished ones included (the history of
``charge:42``), so ``unique_hold`` (emptied when a job ends) cannot serve it. Partial where
the database has it (PostgreSQL, SQLite): a job without a key costs no entry.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    keyed = sa.text("unique_key IS NOT NULL")
    op.create_index(
        "ix_jobledger_jobs_unique_key",
        "jobledger_jobs",
        ["unique_key"],
        postgresql_where=keyed,
        sqlite_where=keyed,
    )


def downgrade() -> None:
    op.drop_index("ix_jobledger_jobs_unique_key", table_name="jobledger_jobs")
