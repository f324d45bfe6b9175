"""Daily usage rollups: what the dashboards read instead of the usage records.

Metering adds each pass's records into one row per (day, consumer lab, provider lab, provider,
user, GPU class, self-use) with an upsert that increments, so a month's report over a million
records reads a few thousand rows, and concurrent meterers add up instead of overwriting.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import BigInteger, Index
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel

SUMMED = ("charge", "earned", "cpu_seconds", "gpu_seconds", "seconds", "cloud_cost")
KEY = ("day", "consumer_lab_id", "provider_lab_id", "provider_id", "user_id", "gpu_class",
       "self_use")


class UsageDaily(SQLModel, table=True):
    """Usage of one day, summed per consumer lab, provider lab, provider, user and GPU class."""

    __table_args__ = (Index("ix_usagedaily_day_consumer", "day", "consumer_lab_id"),
                      Index("ix_usagedaily_day_provider", "day", "provider_lab_id"))
    day: dt.date = Field(primary_key=True)
    consumer_lab_id: int = Field(primary_key=True)
    provider_lab_id: int = Field(primary_key=True)
    provider_id: str = Field(primary_key=True)
    user_id: int = Field(primary_key=True)
    gpu_class: str = Field(primary_key=True, description="'' for CPU-only use.")
    self_use: bool = Field(primary_key=True)
    charge: int = Field(default=0, sa_type=BigInteger, description="nano-PCU.")
    earned: int = Field(default=0, sa_type=BigInteger, description="nano-PCU.")
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    seconds: float = 0.0
    cloud_cost: float = 0.0


def add_to_rollups(session: Session, records: Iterable[dict]) -> None:
    """Fold metered records (as metering builds them) into the daily rows; the caller commits."""
    folded: dict[tuple, dict] = {}
    for r in records:
        key = (r["period_end"].date(), r["consumer_lab_id"], r["provider_lab_id"],
               r["provider_id"], r["user_id"], r["gpu_class"] or "", r["self_use"])
        row = folded.get(key)
        if row is None:
            row = folded[key] = dict(zip(KEY, key, strict=True)) | dict.fromkeys(SUMMED, 0)
        row["charge"] += r["charge"]
        row["earned"] += r["earned"]
        row["cpu_seconds"] += r["cpus"] * r["seconds"]
        row["gpu_seconds"] += r["gpus"] * r["seconds"]
        row["seconds"] += r["seconds"]
        row["cloud_cost"] += r["cloud_cost"]
    if not folded:
        return
    conn = session.connection()
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    table = UsageDaily.__table__
    stmt = dialect.insert(table)
    # In key order, so concurrent meterers lock rows in the same order.
    rows = [folded[k] for k in sorted(folded, key=repr)]
    conn.execute(stmt.on_conflict_do_update(
        index_elements=list(KEY),
        set_={name: table.c[name] + stmt.excluded[name] for name in SUMMED}), rows)
