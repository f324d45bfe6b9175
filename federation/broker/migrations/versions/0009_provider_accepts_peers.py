"""Sites and peer traffic: whether a provider's workers accept connections from other sites
(``accepts_peers``; False behind NAT or a firewall, and a cluster using it stays within its
site).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # In place: a batch copy of provider would fail the leases' foreign key on SQLite.
    op.add_column('provider', sa.Column('accepts_peers', sa.Boolean(), nullable=False,
                                        server_default=sa.true()))


def downgrade() -> None:
    op.drop_column('provider', 'accepts_peers')
