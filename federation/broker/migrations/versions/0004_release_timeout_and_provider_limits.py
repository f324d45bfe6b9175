"""When a lease started releasing (for the release timeout); the agent's signing request in
place of the worker's private key, which the broker no longer holds; and the largest provider
machine an administrator allows per lab.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 04:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

DEFAULT_PROVIDER_MAX_CPUS = 256
DEFAULT_PROVIDER_MAX_MEMORY = 2 * 2**40
DEFAULT_PROVIDER_MAX_GPUS = 16


def upgrade() -> None:
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.add_column(sa.Column('releasing_at', sqlmodel.sql.sqltypes.UTCDateTime(),
                                      nullable=True))
        batch_op.add_column(sa.Column('worker_csr', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=False, server_default=''))
        # Private keys of earlier leases go with the column.
        batch_op.drop_column('worker_key')
    with op.batch_alter_table('lab', schema=None) as batch_op:
        batch_op.add_column(sa.Column('provider_max_cpus', sa.Integer(), nullable=False,
                                      server_default=str(DEFAULT_PROVIDER_MAX_CPUS)))
        batch_op.add_column(sa.Column('provider_max_memory', sa.BigInteger(), nullable=False,
                                      server_default=str(DEFAULT_PROVIDER_MAX_MEMORY)))
        batch_op.add_column(sa.Column('provider_max_gpus', sa.Integer(), nullable=False,
                                      server_default=str(DEFAULT_PROVIDER_MAX_GPUS)))
    # The server defaults stay: dropping them would make SQLite rebuild the lab table, which
    # other tables reference.


def downgrade() -> None:
    with op.batch_alter_table('lab', schema=None) as batch_op:
        batch_op.drop_column('provider_max_gpus')
        batch_op.drop_column('provider_max_memory')
        batch_op.drop_column('provider_max_cpus')
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker_key', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=False, server_default=''))
        batch_op.drop_column('worker_csr')
        batch_op.drop_column('releasing_at')
