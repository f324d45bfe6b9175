"""Lease indexes for reads that must not grow with the federation's history.

- A cluster's and a machine's leases indexed with their end time. The reads that run every
  few seconds (a cluster heartbeat's view, an agent heartbeat batch, an agent's lease list)
  want a cluster's or a machine's leases not ended, or ended lately. Indexed by cluster or
  machine alone, a cluster heartbeat or an agent heartbeat batch fetched every lease the
  cluster or machine ever had and dropped the ended ones (on a machine serving for a year,
  tens of thousands a heartbeat); a lease list, by its plan, that or every held lease.
- The ended leases whose end is not charged yet (a partial index, a handful of rows): each
  metering pass and each page of the job-record feed looked for them among every lease that
  ever ended (a scan of the lease table: 0.22 s a pass beside a million ended leases).
- The ended leases by end time (partial, written once per lease, at its end): the job-record
  feed's pages (0.79 s a page of 1,000 beside a million, 0.12 s with it).

docs/architecture.md, "Live leases are read by their end time; history has indexes of its
own". The new indexes are built before the old ones are dropped; on PostgreSQL each build
holds writes to the lease table until it is done (1.5-2.1 s for each of the first two over
a million leases on a 2-core machine, under 0.5 s for the partial ones).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

#: The column each index with the end time leads with (replacing its index of its own).
LEADING = ('cluster_id', 'provider_id')
#: models.END_NOT_CHARGED, as the index's predicate.
END_NOT_CHARGED = ("state = 'ended' AND started_at IS NOT NULL "
                   "AND (metered_until IS NULL OR metered_until < ended_at)")
ENDED = 'ended_at IS NOT NULL'


def _partial(name: str, columns: list[str], where: str) -> None:
    op.create_index(name, 'lease', columns, postgresql_where=sa.text(where),
                    sqlite_where=sa.text(where))


def upgrade() -> None:
    for column in LEADING:
        op.create_index(f'ix_lease_{column}_ended_at', 'lease', [column, 'ended_at'])
        op.drop_index(f'ix_lease_{column}', table_name='lease')
    _partial('ix_lease_end_not_charged', ['ended_at'], END_NOT_CHARGED)
    _partial('ix_lease_ended_at_id', ['ended_at', 'id'], ENDED)


def downgrade() -> None:
    op.drop_index('ix_lease_ended_at_id', table_name='lease')
    op.drop_index('ix_lease_end_not_charged', table_name='lease')
    for column in LEADING:
        op.create_index(f'ix_lease_{column}', 'lease', [column])
        op.drop_index(f'ix_lease_{column}_ended_at', table_name='lease')
