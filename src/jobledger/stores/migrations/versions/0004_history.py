"""A job's history (its attempts that did not succeed, its recoveries and restarts), and an
index that finds the recovered jobs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

``jobs.history`` is a JSON list (at most ``HISTORY_KEPT`` entries), appended in the same
compare-and-set as the move it records; a success appends nothing. The dashboard counts and
lists jobs with ``recoveries > 0`` (the jobs jobledger saved) every few seconds: the index keeps
that a range read on a big ledger (``recoveries`` changes only at a recovery, off the hot path).
"""

import sqlalchemy as sa
from alembic import op

from jobledger.stores.migrations import LONG_TEXT

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobledger_jobs", sa.Column("history", LONG_TEXT))
    op.create_index("ix_jobledger_jobs_recovered", "jobledger_jobs", ["recoveries", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobledger_jobs_recovered", table_name="jobledger_jobs")
    op.drop_column("jobledger_jobs", "history")
