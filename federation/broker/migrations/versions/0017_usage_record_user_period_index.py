"""Usage records by user with their period's end, in place of by user alone.

A lab's members page tells when each member last used the federation; the daily rollups give
the day, and this index finds the time among that member's records of that day, where the
one-column index read every record the member ever had. It replaces that index, so metering
writes no more index entries than before (docs/architecture.md, "Reports read the daily
rollups for whole days").

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03 20:30:00
"""

from __future__ import annotations

from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_usagerecord_user_id_period_end', 'usagerecord',
                    ['user_id', 'period_end'])
    op.drop_index('ix_usagerecord_user_id', table_name='usagerecord')


def downgrade() -> None:
    op.create_index('ix_usagerecord_user_id', 'usagerecord', ['user_id'])
    op.drop_index('ix_usagerecord_user_id_period_end', table_name='usagerecord')
