"""Fencing generations, windowed recovery counts, and what each instance holds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

``jobs.generation`` is the fencing token every message carries (raised by each republish);
``jobs.recent_recoveries`` the times of a job's latest recoveries (the poison-pill window);
``instances.holding`` the jobs an instance had received at its last beat (the sweep puts back
a dead instance's prefetched jobs); ``instances.stats`` its own counters, for ``/metrics``.
"""

import sqlalchemy as sa
from alembic import op

from jobledger.stores.migrations import LONG_TEXT

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTERs, no batch: SQLite adds and (3.35+) drops columns natively, and the Django
    # migration renders these revisions offline, where a batch could not reflect the table.
    op.add_column(
        "jobledger_jobs", sa.Column("generation", sa.Integer, nullable=False, server_default="0")
    )
    op.add_column("jobledger_jobs", sa.Column("recent_recoveries", sa.Text))
    op.add_column("jobledger_instances", sa.Column("holding", LONG_TEXT))
    op.add_column("jobledger_instances", sa.Column("stats", sa.Text))


def downgrade() -> None:
    op.drop_column("jobledger_instances", "stats")
    op.drop_column("jobledger_instances", "holding")
    op.drop_column("jobledger_jobs", "recent_recoveries")
    op.drop_column("jobledger_jobs", "generation")
