"""A releasing lease's target apart from its end: ``release_reason`` holds the reason it will
end with while it is releasing; ``end_reason`` is written only when it ends (it held both).

Backfill: a lease releasing now moves its end_reason to release_reason.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

REASONS = ('released', 'lost', 'failed', 'preempted')


def _reason_type(bind) -> sa.types.TypeEngine:
    if bind.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        # The end reasons' enum type exists since 0001 (lease.end_reason).
        return postgresql.ENUM(*REASONS, name='endreason', create_type=False)
    return sa.Enum(*REASONS, name='endreason')


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.add_column(sa.Column('release_reason', _reason_type(bind), nullable=True))
    bind.execute(sa.text("UPDATE lease SET release_reason = end_reason, end_reason = NULL "
                         "WHERE state = 'releasing'"))


def downgrade() -> None:
    bind = op.get_bind()
    bind.execute(sa.text("UPDATE lease SET end_reason = release_reason "
                         "WHERE state = 'releasing'"))
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.drop_column('release_reason')
