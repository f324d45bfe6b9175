"""Usage records by user with their period's end, in place of by user alone.

A lab's members page tells when each member last used the federation; the daily rollups give
the day, and this index finds the time among that member's records of that day, where the
one-column index read every record the member ever had. It replaces that index, so metering
writes no more index entries than before (docs/architecture.md, "Reports read the daily
rollups for whole days").

The build reads every usage record (1.6 s for 3 million on the 2-core test machine) and holds
metering's writes meanwhile; on a large PostgreSQL database a site builds it first while the
brokers run, ``CREATE INDEX CONCURRENTLY ix_usagerecord_user_id_period_end ON usagerecord
(user_id, period_end)``, and this upgrade keeps it (``migrations/indexes.py``).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03 20:30:00
"""

from __future__ import annotations

from alembic import op

from federation.broker.migrations.indexes import create_unless_built

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_unless_built('ix_usagerecord_user_id_period_end', 'usagerecord',
                        ['user_id', 'period_end'])
    op.drop_index('ix_usagerecord_user_id', table_name='usagerecord', if_exists=True)


def downgrade() -> None:
    op.create_index('ix_usagerecord_user_id', 'usagerecord', ['user_id'])
    op.drop_index('ix_usagerecord_user_id_period_end', table_name='usagerecord')
