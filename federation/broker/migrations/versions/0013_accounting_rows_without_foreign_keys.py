"""Usage records and ledger entries without foreign keys.

A metering pass writes a usage record per lease and period and two ledger entries per charged
period, in bulk; PostgreSQL checked each row's foreign keys one by one (five on a usage record,
two on a ledger entry: a lookup and a row lock each), over a quarter of a pass's server CPU
(benchmarks/metering_pass.py, 10,000 leases: 1.36-1.41 s without them against 1.91-2.22 s in
the same hour; on SQLite, which checks them too, the pass's CPU 2.2-2.5 s against 3.0-3.2
s). The rows they named are read or written in the same transaction as the records, and
nothing in Parallex deletes a lab, a user, an account, a price version or a transfer
(docs/architecture.md, "Accounting rows have no foreign keys").

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 14:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

#: Each table's foreign keys: (column, the table it names by id).
FOREIGN_KEYS = {
    'usagerecord': [('consumer_lab_id', 'lab'), ('provider_lab_id', 'lab'), ('user_id', 'user'),
                    ('price_version_id', 'priceversion'), ('transfer_id', 'transfer')],
    'ledgerentry': [('transfer_id', 'transfer'), ('account_id', 'account')],
}
#: SQLite keeps these constraints unnamed: batch mode names them so, to drop them.
NAMING = {'fk': 'fk_%(table_name)s_%(column_0_name)s'}


def upgrade() -> None:
    bind = op.get_bind()
    for table, keys in FOREIGN_KEYS.items():
        # Read, not assumed: 0001 left them unnamed on SQLite (batch mode names them after
        # NAMING) and PostgreSQL named them ``<table>_<column>_fkey``; a downgrade names them.
        named = {}
        for fk in sa.inspect(bind).get_foreign_keys(table):
            column = fk['constrained_columns'][0]
            named[column] = fk['name'] or f'fk_{table}_{column}'
        with op.batch_alter_table(table, naming_convention=NAMING) as batch_op:
            for column, _referred in keys:
                batch_op.drop_constraint(named[column], type_='foreignkey')


def downgrade() -> None:
    for table, keys in FOREIGN_KEYS.items():
        with op.batch_alter_table(table) as batch_op:
            for column, referred in keys:
                batch_op.create_foreign_key(f'{table}_{column}_fkey', referred, [column], ['id'])
