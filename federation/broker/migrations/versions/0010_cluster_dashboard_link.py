"""The Dask dashboard through the broker: a cluster's dashboard port and the hash of its
dashboard link's secret.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # In place: a batch copy of cluster would fail the leases' foreign key on SQLite.
    op.add_column('cluster', sa.Column('dashboard_port', sa.Integer(), nullable=True))
    op.add_column('cluster', sa.Column('dashboard_key_hash', sa.String(), nullable=True))


def downgrade() -> None:
    op.drop_column('cluster', 'dashboard_key_hash')
    op.drop_column('cluster', 'dashboard_port')
