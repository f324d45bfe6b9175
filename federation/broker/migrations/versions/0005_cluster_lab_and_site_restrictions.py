"""The labs and sites a cluster's owner allows its workers on ([] means any).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 05:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cluster', schema=None) as batch_op:
        batch_op.add_column(sa.Column('allowed_labs_json', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('allowed_sites_json', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('cluster', schema=None) as batch_op:
        batch_op.drop_column('allowed_sites_json')
        batch_op.drop_column('allowed_labs_json')
