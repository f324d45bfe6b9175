"""Software environments: clusters' environments, shipped wheels, build failures, and what
providers build or serve.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 21:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'environment',
        sa.Column('hash', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('python', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('packages_json', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('hash'))
    op.create_table(
        'environment_wheel',
        sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['user_id'], ['user.id']),
        sa.PrimaryKeyConstraint('sha256'))
    op.create_table(
        'environment_failure',
        sa.Column('environment', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('provider_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('message', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['environment'], ['environment.hash']),
        sa.ForeignKeyConstraint(['provider_id'], ['provider.id']),
        sa.PrimaryKeyConstraint('environment', 'provider_id'))
    # In place: a batch copy of cluster or provider would fail the leases' foreign keys on
    # SQLite. The cluster's environment is checked by the broker when the cluster registers.
    op.add_column('cluster', sa.Column('environment', sa.String(), nullable=True))
    op.add_column('provider', sa.Column('environment_json', sa.String(), nullable=False,
                                        server_default='{}'))
    op.add_column('provider', sa.Column('environments_json', sa.String(), nullable=False,
                                        server_default='[]'))


def downgrade() -> None:
    op.drop_column('provider', 'environments_json')
    op.drop_column('provider', 'environment_json')
    op.drop_column('cluster', 'environment')
    op.drop_table('environment_failure')
    op.drop_table('environment_wheel')
    op.drop_table('environment')
