"""A job's history: its attempts that did not succeed, its recoveries and restarts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

``jobs.history`` is a JSON list (at most ``HISTORY_KEPT`` entries), appended in the same
compare-and-set as the move it records; a success appends nothing.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.add_column("jobledger_jobs", sa.Column("history", LONG_TEXT))


def downgrade() -> None:
    op.drop_column("jobledger_jobs", "history")
