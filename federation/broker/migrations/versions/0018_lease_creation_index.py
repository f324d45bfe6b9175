"""Leases indexed by the time they were asked for.

The dashboard's wait times read the leases asked for in the period it shows; without this
index that was a scan of every lease the federation ever had (a month's view beside a year
of a million leases: 0.25 s, 0.14 s with it; issue 14's load churns 15,000 leases in two
minutes). A lease's creation time never changes, so no update writes this index. A site
may build it first while the brokers run (``CREATE INDEX CONCURRENTLY ix_lease_created_at ON
lease (created_at)``; 0.3 s for a million leases here); this upgrade keeps it.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03 21:00:00
"""

from __future__ import annotations

from alembic import op

from federation.broker.migrations.indexes import create_unless_built

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_unless_built('ix_lease_created_at', 'lease', ['created_at'])


def downgrade() -> None:
    op.drop_index('ix_lease_created_at', table_name='lease')
