"""Tables for pruning usage records: each pruned lease's sums, and how far pruning went.

Usage records grow by ~1 GiB a day per thousand leases running and nothing deleted them
(README, "Database growth"). ``parallex db prune`` now deletes the records of leases that
ended before a horizon, keeping their sums per lease (``pruned_usage``: job records and
clusters' costs add them) and the horizon (``usage_pruning``: reports refuse partial days
before it). New tables only: nothing existing is rewritten.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-04 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'pruned_usage',
        sa.Column('lease_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('records', sa.Integer(), nullable=False),
        sa.Column('seconds', sa.Float(), nullable=False),
        sa.Column('cpu_seconds', sa.Float(), nullable=False),
        sa.Column('gpu_seconds', sa.Float(), nullable=False),
        sa.Column('charged', sa.BigInteger(), nullable=False),
        sa.Column('self_use', sa.BigInteger(), nullable=False),
        sa.Column('earned', sa.BigInteger(), nullable=False),
        sa.Column('cloud_cost', sa.Float(), nullable=False),
        sa.Column('any_self_use', sa.Boolean(), nullable=False),
        sa.Column('pruned_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('lease_id'))
    op.create_table(
        'usage_pruning',
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('before', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('through_ended_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('through_lease_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column('leases', sa.BigInteger(), nullable=False),
        sa.Column('records', sa.BigInteger(), nullable=False),
        sa.Column('pruned_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name'))


def downgrade() -> None:
    op.drop_table('usage_pruning')
    op.drop_table('pruned_usage')
