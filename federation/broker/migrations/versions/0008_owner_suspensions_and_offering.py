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
    # Plain ADD COLUMN (SQLite has it): a batch copy would drop and recreate provider, which
    # leases reference, and fail the foreign-key check.
    op.add_column('lease', sa.Column('suspensions_json', sa.String(), nullable=False,
                                     server_default='[]'))
    op.add_column('provider', sa.Column('offering', sa.Boolean(), nullable=False,
                                        server_default=sa.true()))
    op.add_column('provider', sa.Column('offer_note', sa.String(), nullable=False,
                                        server_default=''))


def downgrade() -> None:
    bind = op.get_bind()
    # A suspended lease runs again on the old schema (which cannot say suspended).
    bind.execute(sa.text("UPDATE lease SET state = 'running' WHERE state = 'suspended'"))
    # DROP COLUMN in place (SQLite 3.35+), for the same reason as above.
    op.drop_column('provider', 'offer_note')
    op.drop_column('provider', 'offering')
    op.drop_column('lease', 'suspensions_json')
    # PostgreSQL cannot drop an enum value; 'suspended' stays unused in leasestate.
