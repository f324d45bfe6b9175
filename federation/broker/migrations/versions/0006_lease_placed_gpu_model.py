"""The model of the GPUs a lease was placed on, which it is priced by (it was priced by the
model asked for, or the default class when none was asked).

Backfill: a placed GPU lease takes the model of its first GPU from its provider's GPU list.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 08:00:00
"""

from __future__ import annotations

import json

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.add_column(sa.Column('placed_gpu_model', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
    conn = op.get_bind()
    gpus_of = {pid: json.loads(gpus or "[]") for pid, gpus in conn.execute(
        sa.text("SELECT id, gpus_json FROM provider"))}
    rows = conn.execute(sa.text(
        "SELECT id, provider_id, gpu_indices_json FROM lease "
        "WHERE gpus > 0 AND provider_id IS NOT NULL")).all()
    for lease_id, provider_id, indices in rows:
        models = {g.get("index"): g.get("model") for g in gpus_of.get(provider_id, [])}
        placed = [models.get(i) for i in json.loads(indices or "[]")]
        if placed and placed[0]:
            conn.execute(sa.text("UPDATE lease SET placed_gpu_model = :m WHERE id = :i"),
                         {"m": placed[0], "i": lease_id})


def downgrade() -> None:
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.drop_column('placed_gpu_model')
