"""Provider reliability; usage records gain the provider's earnings, the cloud cost and an index.

Records metered before this revision get their earnings back from the ledger (the provider
lab's entry of the record's transfer); their cloud cost stays 0, since no reference table was
in force when they were metered.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 05:14:11.291149
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('providerreliability',
    sa.Column('provider_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('penalty', sa.Float(), nullable=False),
    sa.Column('lost_leases', sa.Integer(), nullable=False),
    sa.Column('failed_leases', sa.Integer(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('provider_id')
    )
    # server_default fills the rows already there; it is dropped again so the schema matches
    # the models (which set the value on every insert).
    with op.batch_alter_table('usagerecord', schema=None) as batch_op:
        batch_op.add_column(sa.Column('earned', sa.BigInteger(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('cloud_cost', sa.Float(), nullable=False,
                                      server_default='0'))
        # Explaining a ledger entry looks its usage record up by transfer.
        batch_op.create_index(batch_op.f('ix_usagerecord_transfer_id'), ['transfer_id'],
                              unique=False)
    op.execute("""
        UPDATE usagerecord SET earned = COALESCE((
            SELECT ledgerentry.amount FROM ledgerentry
            JOIN account ON account.id = ledgerentry.account_id
            WHERE ledgerentry.transfer_id = usagerecord.transfer_id
              AND account.lab_id = usagerecord.provider_lab_id), 0)
        WHERE transfer_id IS NOT NULL
    """)
    with op.batch_alter_table('usagerecord', schema=None) as batch_op:
        batch_op.alter_column('earned', server_default=None)
        batch_op.alter_column('cloud_cost', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('usagerecord', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usagerecord_transfer_id'))
        batch_op.drop_column('cloud_cost')
        batch_op.drop_column('earned')

    op.drop_table('providerreliability')
