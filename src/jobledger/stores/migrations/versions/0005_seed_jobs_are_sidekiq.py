"""Jobs reported through the seed endpoints are Sidekiq's.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

The seed's clients are a Sidekiq app's middleware; their jobs were recorded as system ``http``,
which nothing could publish back. They are now ``sidekiq``, which the Sidekiq integration
restarts and recovers. Data only: going back leaves them ``sidekiq`` (no row says which were
``http``, and ``http`` rows could not be restarted anyway).
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE jobledger_jobs SET system = 'sidekiq' WHERE system = 'http'")


def downgrade() -> None:
    pass
