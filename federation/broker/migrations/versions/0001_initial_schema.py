"""Initial schema: identities, labs, the broker's tables, prices, usage and the ledger.

Databases created by earlier builds (before migrations) are stamped at this revision.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-22 05:09:29.402768
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('decayedusage',
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('key', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('as_of', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'key')
    )
    op.create_table('institution',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('institution', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_institution_name'), ['name'], unique=True)

    op.create_table('priceversion',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('effective_from', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('w_cpu', sa.Float(), nullable=False),
    sa.Column('w_mem_gib', sa.Float(), nullable=False),
    sa.Column('gpu_classes_json', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('default_gpu_weight', sa.Float(), nullable=False),
    sa.Column('fee_fraction', sa.Float(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('priceversion', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_priceversion_effective_from'), ['effective_from'], unique=True)

    op.create_table('transfer',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('usage', 'grant', 'adjustment', name='transferkind'), nullable=False),
    sa.Column('memo', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('transfer', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_transfer_created_at'), ['created_at'], unique=False)

    op.create_table('lab',
    sa.Column('share', sa.Float(), nullable=False),
    sa.Column('credit_limit', sa.Float(), nullable=False),
    sa.Column('max_cpus', sa.Float(), nullable=True),
    sa.Column('max_gpus', sa.Integer(), nullable=True),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('site', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('institution_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['institution_id'], ['institution.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('lab', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lab_name'), ['name'], unique=True)

    op.create_table('account',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Enum('lab', 'grants', 'federation', name='accountkind'), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('lab_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['lab_id'], ['lab.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('lab_id')
    )
    with op.batch_alter_table('account', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_account_name'), ['name'], unique=True)

    op.create_table('user',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('lab_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['lab_id'], ['lab.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_user_lab_id'), ['lab_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_user_name'), ['name'], unique=True)

    op.create_table('apitoken',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('kind', sa.Enum('admin', 'user', 'provider', name='tokenkind'), nullable=False),
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('lab_id', sa.Integer(), nullable=True),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('revoked_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['lab_id'], ['lab.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('apitoken', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_apitoken_token_hash'), ['token_hash'], unique=True)

    op.create_table('balance',
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['account.id'], ),
    sa.PrimaryKeyConstraint('account_id')
    )
    op.create_table('cluster',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('lab_id', sa.Integer(), nullable=False),
    sa.Column('scheduler_address', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('ca_cert', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('end_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('last_seen', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('closed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['lab_id'], ['lab.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('cluster', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cluster_lab_id'), ['lab_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_cluster_user_id'), ['user_id'], unique=False)

    op.create_table('ledgerentry',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('transfer_id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['account.id'], ),
    sa.ForeignKeyConstraint(['transfer_id'], ['transfer.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('ledgerentry', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ledgerentry_account_id'), ['account_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledgerentry_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledgerentry_transfer_id'), ['transfer_id'], unique=False)

    op.create_table('membership',
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('lab_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.Enum('member', 'pi', 'admin', name='role'), nullable=False),
    sa.Column('max_cpus', sa.Float(), nullable=True),
    sa.Column('max_gpus', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['lab_id'], ['lab.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('user_id', 'lab_id')
    )
    op.create_table('usagerecord',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('lease_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('period_start', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('period_end', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('cpus', sa.Float(), nullable=False),
    sa.Column('memory', sa.BigInteger(), nullable=False),
    sa.Column('gpus', sa.Integer(), nullable=False),
    sa.Column('gpu_model', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('gpu_class', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('pcu_per_hour', sa.Float(), nullable=False),
    sa.Column('charge', sa.BigInteger(), nullable=False),
    sa.Column('consumer_lab_id', sa.Integer(), nullable=False),
    sa.Column('provider_lab_id', sa.Integer(), nullable=False),
    sa.Column('provider_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('self_use', sa.Boolean(), nullable=False),
    sa.Column('reliability', sa.Float(), nullable=False),
    sa.Column('price_version_id', sa.Integer(), nullable=False),
    sa.Column('transfer_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['consumer_lab_id'], ['lab.id'], ),
    sa.ForeignKeyConstraint(['price_version_id'], ['priceversion.id'], ),
    sa.ForeignKeyConstraint(['provider_lab_id'], ['lab.id'], ),
    sa.ForeignKeyConstraint(['transfer_id'], ['transfer.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['user.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('lease_id', 'period_start', name='uq_usage_period')
    )
    with op.batch_alter_table('usagerecord', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usagerecord_consumer_lab_id'), ['consumer_lab_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_usagerecord_lease_id'), ['lease_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_usagerecord_period_end'), ['period_end'], unique=False)
        batch_op.create_index(batch_op.f('ix_usagerecord_provider_id'), ['provider_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_usagerecord_provider_lab_id'), ['provider_lab_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_usagerecord_user_id'), ['user_id'], unique=False)

    op.create_table('provider',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('lab_id', sa.Integer(), nullable=False),
    sa.Column('token_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('site', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('cpus', sa.Float(), nullable=False),
    sa.Column('memory', sa.BigInteger(), nullable=False),
    sa.Column('gpus_json', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('online', sa.Boolean(), nullable=False),
    sa.Column('registered_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('last_seen', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['lab_id'], ['lab.id'], ),
    sa.ForeignKeyConstraint(['token_id'], ['apitoken.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('provider', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_provider_lab_id'), ['lab_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_provider_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_provider_token_id'), ['token_id'], unique=False)

    op.create_table('lease',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('cluster_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('provider_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('group', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('cpus', sa.Float(), nullable=False),
    sa.Column('memory', sa.BigInteger(), nullable=False),
    sa.Column('gpus', sa.Integer(), nullable=False),
    sa.Column('gpu_model', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('gpu_indices_json', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('state', sa.Enum('pending', 'starting', 'running', 'releasing', 'ended', name='leasestate'), nullable=False),
    sa.Column('end_reason', sa.Enum('released', 'lost', 'failed', 'preempted', name='endreason'), nullable=True),
    sa.Column('message', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('worker_cert', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('worker_key', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('assigned_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('ended_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('metered_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['cluster_id'], ['cluster.id'], ),
    sa.ForeignKeyConstraint(['provider_id'], ['provider.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lease_cluster_id'), ['cluster_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_lease_provider_id'), ['provider_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_lease_state'), ['state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lease_state'))
        batch_op.drop_index(batch_op.f('ix_lease_provider_id'))
        batch_op.drop_index(batch_op.f('ix_lease_cluster_id'))

    op.drop_table('lease')
    with op.batch_alter_table('provider', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_provider_token_id'))
        batch_op.drop_index(batch_op.f('ix_provider_name'))
        batch_op.drop_index(batch_op.f('ix_provider_lab_id'))

    op.drop_table('provider')
    with op.batch_alter_table('usagerecord', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usagerecord_user_id'))
        batch_op.drop_index(batch_op.f('ix_usagerecord_provider_lab_id'))
        batch_op.drop_index(batch_op.f('ix_usagerecord_provider_id'))
        batch_op.drop_index(batch_op.f('ix_usagerecord_period_end'))
        batch_op.drop_index(batch_op.f('ix_usagerecord_lease_id'))
        batch_op.drop_index(batch_op.f('ix_usagerecord_consumer_lab_id'))

    op.drop_table('usagerecord')
    op.drop_table('membership')
    with op.batch_alter_table('ledgerentry', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledgerentry_transfer_id'))
        batch_op.drop_index(batch_op.f('ix_ledgerentry_created_at'))
        batch_op.drop_index(batch_op.f('ix_ledgerentry_account_id'))

    op.drop_table('ledgerentry')
    with op.batch_alter_table('cluster', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cluster_user_id'))
        batch_op.drop_index(batch_op.f('ix_cluster_lab_id'))

    op.drop_table('cluster')
    op.drop_table('balance')
    with op.batch_alter_table('apitoken', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_apitoken_token_hash'))

    op.drop_table('apitoken')
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_user_name'))
        batch_op.drop_index(batch_op.f('ix_user_lab_id'))

    op.drop_table('user')
    with op.batch_alter_table('account', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_account_name'))

    op.drop_table('account')
    with op.batch_alter_table('lab', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lab_name'))

    op.drop_table('lab')
    with op.batch_alter_table('transfer', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_transfer_created_at'))

    op.drop_table('transfer')
    with op.batch_alter_table('priceversion', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_priceversion_effective_from'))

    op.drop_table('priceversion')
    with op.batch_alter_table('institution', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_institution_name'))

    op.drop_table('institution')
    op.drop_table('decayedusage')
    # PostgreSQL keeps enum types after their tables are gone.
    for enum in ("transferkind", "accountkind", "tokenkind", "role", "leasestate", "endreason"):
        sa.Enum(name=enum).drop(op.get_bind(), checkfirst=True)
