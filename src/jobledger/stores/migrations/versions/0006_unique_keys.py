"""Unique jobs: the key a job was published with, and the key while the job holds it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

``jobs.unique_key`` is what the job was published with (kept, for a person to see);
``jobs.unique_hold`` holds the same key while the job is unfinished and is emptied by the move
that ends it. A unique index on ``unique_hold`` refuses a second unfinished job with the key
on every database: NULLs never collide, and the key is freed by the same UPDATE that moves the
job to a final state. One design for all three: MariaDB/MySQL have no partial index, and a
partial index on the state would take the key back when a person restarts a failed job, which
a restart must not do. The index leaves NULLs out where it can (PostgreSQL, SQLite), so a job
without a key costs its transitions no entry in it. Existing jobs get no key.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTERs, no batch (see 0002).
    op.add_column("jobledger_jobs", sa.Column("unique_key", sa.String(255)))
    op.add_column("jobledger_jobs", sa.Column("unique_hold", sa.String(255)))
    held = sa.text("unique_hold IS NOT NULL")
    op.create_index(
        "ux_jobledger_jobs_unique_hold",
        "jobledger_jobs",
        ["unique_hold"],
        unique=True,
        postgresql_where=held,
        sqlite_where=held,
    )


def downgrade() -> None:
    op.drop_index("ux_jobledger_jobs_unique_hold", table_name="jobledger_jobs")
    op.drop_column("jobledger_jobs", "unique_hold")
    op.drop_column("jobledger_jobs", "unique_key")
