"""Index builds that a site may have done beforehand.

On a large PostgreSQL database an index build in a migration holds writes to its table for
as long as it reads the table (migration 0017 reads every usage record), so the README tells
a site to build such an index first while the brokers run, with ``CREATE INDEX
CONCURRENTLY``. The migration then keeps a valid index of that name and builds it otherwise;
a concurrent build that failed leaves an invalid index, which is built again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


def create_unless_built(name: str, table: str, columns: list[str]) -> None:
    """Create index ``name`` on ``table`` (``columns``) unless a valid one of that name is
    there (PostgreSQL; on SQLite, unless one of that name is there)."""
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        valid = bind.execute(sa.text(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(:name)"),
            {"name": name}).scalar()
        if valid is False:
            op.drop_index(name, table_name=table)
    op.create_index(name, table, columns, if_not_exists=True)
