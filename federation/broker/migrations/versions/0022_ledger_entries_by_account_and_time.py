"""Ledger entries indexed by account and time together, in place of each alone.

A lab's ledger page (``GET /labs/{lab}/ledger``: its newest 200 entries, or those since a
time) read through the index by time, newest first, passing every other lab's entries until
it had 200 of its own: 20,003 rows for a lab with one entry in a hundred of a year's
400,000, and the whole ledger for a lab with none lately. By (account, time, id) it reads its
200. No other read uses the two indexes it replaces, and metering writes two entries per
charged period: one index fewer to write.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-04 03:00:00
"""

from __future__ import annotations

from alembic import op

from federation.broker.migrations.indexes import create_unless_built

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_unless_built('ix_ledgerentry_account_id_created_at_id', 'ledgerentry',
                        ['account_id', 'created_at', 'id'])
    op.drop_index('ix_ledgerentry_account_id', table_name='ledgerentry')
    op.drop_index('ix_ledgerentry_created_at', table_name='ledgerentry')


def downgrade() -> None:
    op.create_index('ix_ledgerentry_created_at', 'ledgerentry', ['created_at'])
    op.create_index('ix_ledgerentry_account_id', 'ledgerentry', ['account_id'])
    op.drop_index('ix_ledgerentry_account_id_created_at_id', table_name='ledgerentry')
