"""Usage records lose their indexes by consumer lab and by provider lab.

They served the usage reports (a lab's members, its machines, ``GET /usage`` of a lab), which
summed a lab's records; since 0017 those reports read the daily rollups for whole days and a
partial day's records by ``period_end`` (``accounting/usage_totals.py``), and no read looks
records up by lab. Metering writes every index with every record (one a running lease and
metered period): a COPY of 10,000 records into a table of a million took 124–151 ms with
five indexes against 160–182 ms with seven (four alternated rounds; docs/architecture.md,
"Usage records keep only the indexes a read uses").

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03 21:20:00
"""

from __future__ import annotations

from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None

#: The columns whose indexes of their own go.
COLUMNS = ('consumer_lab_id', 'provider_lab_id')


def upgrade() -> None:
    for column in COLUMNS:
        op.drop_index(f'ix_usagerecord_{column}', table_name='usagerecord')


def downgrade() -> None:
    for column in COLUMNS:
        op.create_index(f'ix_usagerecord_{column}', 'usagerecord', [column])
