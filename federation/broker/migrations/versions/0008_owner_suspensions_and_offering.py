"""Owner policies: a lease can be suspended for its machine's owner (the ``suspended`` state
and the spans it spent so, which are not metered), and a provider can withhold its capacity
(``offering``, with the policy's reason in ``offer_note``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # Inside the migration's transaction (PostgreSQL 12+); nothing here uses the value.
        op.execute("ALTER TYPE leasestate ADD VALUE IF NOT EXISTS 'suspended'")
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.add_column(sa.Column('suspensions_json', sa.String(), nullable=False,
                                      server_default='[]'))
    with op.batch_alter_table('provider', schema=None) as batch_op:
        batch_op.add_column(sa.Column('offering', sa.Boolean(), nullable=False,
                                      server_default=sa.true()))
        batch_op.add_column(sa.Column('offer_note', sa.String(), nullable=False,
                                      server_default=''))


def downgrade() -> None:
    bind = op.get_bind()
    # A suspended lease runs again on the old schema (which cannot say suspended).
    bind.execute(sa.text("UPDATE lease SET state = 'running' WHERE state = 'suspended'"))
    with op.batch_alter_table('provider', schema=None) as batch_op:
        batch_op.drop_column('offer_note')
        batch_op.drop_column('offering')
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.drop_column('suspensions_json')
    # PostgreSQL cannot drop an enum value; 'suspended' stays unused in leasestate.
