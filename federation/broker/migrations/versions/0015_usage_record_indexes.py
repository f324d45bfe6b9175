"""Two indexes fewer on usage records: the one by lease (the unique key by lease and period
start serves every read by lease) and the one by machine (no read looks records up by
machine; the usage export groups by it over a lab's or a period's records).

Metering writes a usage record per running lease and metered period (10,000 a minute for
10,000 running leases), and each index is written with every record; nine indexes became
seven (docs/architecture.md, "Usage records keep only the indexes a read uses").

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 17:10:00
"""

from __future__ import annotations

from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

#: The columns whose indexes of their own go.
COLUMNS = ('lease_id', 'provider_id')


def upgrade() -> None:
    for column in COLUMNS:
        op.drop_index(f'ix_usagerecord_{column}', table_name='usagerecord')


def downgrade() -> None:
    for column in COLUMNS:
        op.create_index(f'ix_usagerecord_{column}', 'usagerecord', [column])
