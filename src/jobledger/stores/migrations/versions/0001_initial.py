"""The ledger: jobs, worker instances and locks.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from jobledger.stores.migrations import JOB_ID, LONG_TEXT
from jobledger.stores.migrations import MYSQL_TABLE as MYSQL

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def stamp(name: str, nullable: bool = True) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "jobledger_jobs",
        sa.Column("id", JOB_ID, primary_key=True),
        sa.Column("system", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        *(sa.Column(c, LONG_TEXT, nullable=False) for c in ("args", "kwargs", "tags", "options")),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(255)),
        *(sa.Column(c, sa.Integer, nullable=False) for c in ("attempts", "recoveries", "restarts")),
        sa.Column("error", sa.Text),
        stamp("created_at", nullable=False),
        *(stamp(c) for c in ("staged_at", "first_queued_at", "queued_at", "started_at")),
        *(stamp(c) for c in ("finished_at", "recovered_at")),
        stamp("updated_at", nullable=False),
        **MYSQL,
    )
    for name, columns in {
        "created": ["created_at", "id"],
        "state_created": ["state", "created_at", "id"],
        "state_updated": ["state", "updated_at"],
        "queue_state": ["queue", "state", "queued_at"],
        "name_state": ["name", "state"],
    }.items():
        op.create_index(f"ix_jobledger_jobs_{name}", "jobledger_jobs", columns)
    op.create_table(
        "jobledger_instances",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("nonce", sa.String(50), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        stamp("started_at", nullable=False),
        stamp("heartbeat_at", nullable=False),
        **MYSQL,
    )
    op.create_table(
        "jobledger_locks",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("token", sa.String(255), nullable=False),
        stamp("expires_at", nullable=False),
        **MYSQL,
    )


def downgrade() -> None:
    op.drop_table("jobledger_locks")
    op.drop_table("jobledger_instances")
    op.drop_table("jobledger_jobs")
