"""Capacity samples: what the pool offered and what was leased, per lab, at a fixed interval.

The dashboards draw capacity over time from these rows (one per lab per sample), never from
the lease table, so the history survives providers coming and going.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert
from sqlmodel import Field, Session, SQLModel, col, select

from accounting.models import utcnow

from .models import HELD_STATES, Lease, Provider


class CapacitySample(SQLModel, table=True):
    """One lab's capacity at one moment."""

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = Field(index=True)
    lab_id: int = Field(foreign_key="lab.id", index=True)
    providers_online: int = 0
    cpus_online: float = 0.0
    cpus_leased: float = 0.0
    gpus_online: int = 0
    gpus_leased: int = 0


def record_capacity(session: Session, at: dt.datetime | None = None) -> int:
    """Write one sample per lab with providers; returns how many rows. The caller commits."""
    at = at or utcnow()
    rows: dict[int, dict] = {}
    for p in session.exec(select(Provider).where(Provider.online == True)):  # noqa: E712
        row = rows.setdefault(p.lab_id, {"at": at, "lab_id": p.lab_id, "providers_online": 0,
                                         "cpus_online": 0.0, "cpus_leased": 0.0,
                                         "gpus_online": 0, "gpus_leased": 0})
        row["providers_online"] += 1
        row["cpus_online"] += p.cpus
        row["gpus_online"] += len(p.gpus)
    held = session.exec(select(Provider.lab_id, Lease.cpus, Lease.gpus)
                        .join(Provider, Provider.id == Lease.provider_id)
                        .where(col(Lease.state).in_(HELD_STATES),
                               Provider.online == True)).all()  # noqa: E712
    for lab_id, cpus, gpus in held:
        if lab_id in rows:
            rows[lab_id]["cpus_leased"] += cpus
            rows[lab_id]["gpus_leased"] += gpus
    if rows:
        session.connection().execute(insert(CapacitySample.__table__), list(rows.values()))
    return len(rows)
