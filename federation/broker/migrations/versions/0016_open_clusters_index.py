"""The clusters still open, indexed: the reaper looks for silent ones every second, and with
no index for ``active`` each look scanned the cluster table, every notebook cluster the
federation ever had with its certificate (0.19 s beside 200,000 closed clusters, 0.6 ms
with this index). Keyed by id, not by last heartbeat, so a cluster heartbeat's update stays
in place (docs/architecture.md, "Live leases are read by their end time; history has
indexes of its own").

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03 17:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    # As models.ACTIVE_CLUSTER renders on each database (its queries' own words, which
    # SQLite needs to see the index applies).
    where = 'active = true' if bind.dialect.name == 'postgresql' else 'active = 1'
    op.create_index('ix_cluster_active', 'cluster', ['id'], postgresql_where=sa.text(where),
                    sqlite_where=sa.text(where))


def downgrade() -> None:
    op.drop_index('ix_cluster_active', table_name='cluster')
