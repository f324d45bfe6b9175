"""Capacity samples and daily usage rollups (for the dashboards).

The rollups are filled from the usage records metered so far.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 06:15:09.357926
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usagedaily',
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('consumer_lab_id', sa.Integer(), nullable=False),
    sa.Column('provider_lab_id', sa.Integer(), nullable=False),
    sa.Column('provider_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('gpu_class', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('self_use', sa.Boolean(), nullable=False),
    sa.Column('charge', sa.BigInteger(), nullable=False),
    sa.Column('earned', sa.BigInteger(), nullable=False),
    sa.Column('cpu_seconds', sa.Float(), nullable=False),
    sa.Column('gpu_seconds', sa.Float(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('cloud_cost', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('day', 'consumer_lab_id', 'provider_lab_id', 'provider_id', 'user_id', 'gpu_class', 'self_use')
    )
    with op.batch_alter_table('usagedaily', schema=None) as batch_op:
        batch_op.create_index('ix_usagedaily_day_consumer', ['day', 'consumer_lab_id'], unique=False)
        batch_op.create_index('ix_usagedaily_day_provider', ['day', 'provider_lab_id'], unique=False)

    day = ("CAST(period_end AS DATE)" if op.get_bind().dialect.name == "postgresql"
           else "date(period_end)")
    op.execute(f"""
        INSERT INTO usagedaily (day, consumer_lab_id, provider_lab_id, provider_id, user_id,
                                gpu_class, self_use, charge, earned, cpu_seconds, gpu_seconds,
                                seconds, cloud_cost)
        SELECT {day}, consumer_lab_id, provider_lab_id, provider_id, user_id,
               COALESCE(gpu_class, ''), self_use, SUM(charge), SUM(earned),
               SUM(cpus * seconds), SUM(gpus * seconds), SUM(seconds), SUM(cloud_cost)
        FROM usagerecord
        GROUP BY {day}, consumer_lab_id, provider_lab_id, provider_id, user_id,
                 COALESCE(gpu_class, ''), self_use
    """)
    op.create_table('capacitysample',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('lab_id', sa.Integer(), nullable=False),
    sa.Column('providers_online', sa.Integer(), nullable=False),
    sa.Column('cpus_online', sa.Float(), nullable=False),
    sa.Column('cpus_leased', sa.Float(), nullable=False),
    sa.Column('gpus_online', sa.Integer(), nullable=False),
    sa.Column('gpus_leased', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['lab_id'], ['lab.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('capacitysample', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_capacitysample_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_capacitysample_lab_id'), ['lab_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('capacitysample', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_capacitysample_lab_id'))
        batch_op.drop_index(batch_op.f('ix_capacitysample_at'))

    op.drop_table('capacitysample')
    with op.batch_alter_table('usagedaily', schema=None) as batch_op:
        batch_op.drop_index('ix_usagedaily_day_provider')
        batch_op.drop_index('ix_usagedaily_day_consumer')

    op.drop_table('usagedaily')
