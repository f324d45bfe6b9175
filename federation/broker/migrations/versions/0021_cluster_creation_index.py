"""Clusters indexed by the time they were made (then id: the listing's order).

``GET /clusters?all=true`` lists the newest clusters (200 by default) instead of every
cluster the federation ever had; without this index that was a scan and a sort of the whole
cluster table (10,100 rows read for 200 listed). A cluster's creation time never changes, so
its heartbeat's update of ``last_seen`` stays in place. A site may build it first while the
brokers run (``CREATE INDEX CONCURRENTLY ix_cluster_created_at_id ON cluster (created_at, id)``);
this upgrade keeps it.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04 03:20:00
"""

from __future__ import annotations

from alembic import op

from federation.broker.migrations.indexes import create_unless_built

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_unless_built('ix_cluster_created_at_id', 'cluster', ['created_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_cluster_created_at_id', table_name='cluster')
