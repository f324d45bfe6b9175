"""Metering: turning lease time into usage records and ledger transfers.

A lease is metered in periods of a fixed length from the moment it started running; each
period is recorded once, keyed by (lease, period start) under a unique constraint, so retries,
broker restarts and concurrent meterers never charge a period twice or skip one. The last,
shorter period is metered when the lease ends.
"""

from __future__ import annotations

import bisect
import datetime as dt
from dataclasses import dataclass

from sqlalchemy import BigInteger, Index, UniqueConstraint, func, insert, text
from sqlmodel import Field, Session, SQLModel, col, select

from .bulk import insert_rows
from .cloud import CloudPrices
from .fairshare import DEFAULT_HALF_LIFE, add_usage
from .ledger import AccountKind, Transfer, TransferKind, apply_entries, lab_account, system_account
from .models import Lab, as_utc
from .pricing import PriceVersion, Resources, ensure_default_price, gpu_class, pcu_per_hour
from .reliability import DEFAULT_RELIABILITY_HALF_LIFE, record_clean_time
from .rollups import add_to_rollups
from .sql_lists import one_of
from .units import NANO, to_nano


class UsageRecord(SQLModel, table=True):
    """One metered period of one lease.

    Its lab, user, price version and transfer ids are not foreign keys: metering writes
    thousands of these a pass, in bulk, and PostgreSQL's row-by-row key checks were over a
    quarter of a pass's server CPU (migration 0013; nothing deletes the rows they name)."""

    # Every index is written with every record (one a running lease and period): none by
    # lease (this key's serves), none by machine (no read looks records up by it), since
    # migration 0015; by user with the period's end (a member's last use, a day of their
    # records at most, ``usage_totals.last_used``), since migration 0017; none by lab, since
    # 0019 (the reports read the rollups, and a partial day's records by ``period_end``).
    __table_args__ = (UniqueConstraint("lease_id", "period_start", name="uq_usage_period"),
                      Index("ix_usagerecord_user_id_period_end", "user_id", "period_end"))
    id: int | None = Field(default=None, primary_key=True)
    lease_id: str
    period_start: dt.datetime
    period_end: dt.datetime = Field(index=True)
    seconds: float
    cpus: float
    memory: int = Field(sa_type=BigInteger)
    gpus: int = 0
    gpu_model: str | None = None
    gpu_class: str | None = None
    pcu_per_hour: float
    charge: int = Field(sa_type=BigInteger, description="nano-PCU the period cost.")
    earned: int = Field(default=0, sa_type=BigInteger,
                        description="nano-PCU the provider's lab earned (0 for self-use).")
    cloud_cost: float = Field(default=0.0, description="The same resources' on-demand cloud "
                              "cost, in the reference table's currency.")
    consumer_lab_id: int
    provider_lab_id: int
    provider_id: str
    user_id: int
    self_use: bool = False
    reliability: float = 1.0
    price_version_id: int
    transfer_id: int | None = Field(default=None, index=True)


@dataclass(frozen=True)
class MeteredPeriod:
    """A period that a metering pass recorded."""

    lease_id: str
    period_start: dt.datetime
    period_end: dt.datetime
    charge: int


@dataclass(frozen=True)
class LeaseUsage:
    """What metering needs to know about one lease (the broker fills it in)."""

    lease_id: str
    user_id: int
    consumer_lab_id: int
    provider_lab_id: int
    provider_id: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    resources: Resources
    reliability: float = 1.0
    #: Spans the lease was suspended for its machine's owner (end None: still is); not
    #: charged, not earned.
    paused: tuple[tuple[dt.datetime, dt.datetime | None], ...] = ()


def _paused_seconds(paused, start: dt.datetime, end: dt.datetime) -> float:
    """Seconds of [start, end) inside the suspended spans."""
    total = 0.0
    for a, b in paused:
        a, b = as_utc(a), as_utc(b) if b is not None else end
        overlap = (min(b, end) - max(a, start)).total_seconds()
        total += max(0.0, overlap)
    return min(total, (end - start).total_seconds())


def _last_ends(session: Session, lease_ids: list[str]) -> dict[str, dt.datetime]:
    out: dict[str, dt.datetime] = {}
    for i in range(0, len(lease_ids), 500):
        chunk = lease_ids[i:i + 500]
        out.update(session.exec(
            select(UsageRecord.lease_id, func.max(UsageRecord.period_end))
            .where(one_of(session, col(UsageRecord.lease_id), chunk))
            .group_by(UsageRecord.lease_id)).all())
    return {k: as_utc(v) for k, v in out.items()}


#: ``n`` new ids of the transfer table's sequence, as inserts without an id would get them.
_DRAW_TRANSFER_IDS = text(
    "SELECT nextval(pg_get_serial_sequence('transfer', 'id')) FROM generate_series(1, :n)")


def _insert_transfers(session: Session, rows: list[dict]) -> list[int]:
    """Insert transfers in bulk; their ids, in the order of ``rows``."""
    conn = session.connection()
    table = Transfer.__table__
    if conn.dialect.name == "sqlite":
        # SQLite numbers a new row max(rowid) + 1 and admits one writer at a time, so the rows
        # of one statement in our write transaction get consecutive ids ending at max(id).
        # RETURNING in parameter order would cost one statement per row here.
        conn.execute(insert(table), rows)
        last = conn.execute(select(func.max(table.c.id))).scalar_one()
        return list(range(last - len(rows) + 1, last + 1))
    # The ids are drawn from the table's sequence first, then the rows go in by COPY: an
    # INSERT … RETURNING of thousands of rows was a query text of thousands of placeholders
    # for the driver to build and the server to parse, a quarter of a pass's CPU.
    ids = list(conn.execute(_DRAW_TRANSFER_IDS, {"n": len(rows)}).scalars())
    insert_rows(session, table, [row | {"id": i} for row, i in zip(rows, ids, strict=True)])
    return ids


def periods(start: dt.datetime, end: dt.datetime | None, now: dt.datetime,
            interval: float) -> list[tuple[dt.datetime, dt.datetime]]:
    """The periods to meter from ``start``: whole ones up to ``now``, and the rest at the end."""
    step = dt.timedelta(seconds=interval)
    stop = min(end, now) if end else now
    out = []
    while start + step <= stop:
        out.append((start, start + step))
        start += step
    if end is not None and end <= now and start < end:
        out.append((start, end))
    return out


def meter(session: Session, leases: list[LeaseUsage], *, now: dt.datetime,
          interval: float, half_life: float = DEFAULT_HALF_LIFE,
          cloud: CloudPrices | None = None,
          reliability_half_life: float = DEFAULT_RELIABILITY_HALF_LIFE) -> list[MeteredPeriod]:
    """Record and charge every period of ``leases`` not yet metered, up to ``now``.

    ``half_life`` (seconds) decays fair-share usage; ``cloud`` prices each record's cloud
    equivalent; ``reliability_half_life`` (seconds of lease time) is how fast metered, clean
    time pays back a provider's reliability penalty.

    The caller commits; a concurrent meterer that recorded the same period first makes the
    commit fail on the unique constraint, and the next pass finds that period done.
    """
    if not leases:
        return []
    ensure_default_price(session)
    versions = list(session.exec(select(PriceVersion).order_by(PriceVersion.effective_from)))
    starts = [as_utc(v.effective_from) for v in versions]
    last = _last_ends(session, [u.lease_id for u in leases])
    labs = {lab.id: lab for lab in session.exec(select(Lab))}
    accounts: dict[int, int] = {}

    def account_of(lab_id: int) -> int:
        if lab_id not in accounts:
            accounts[lab_id] = lab_account(session, labs[lab_id]).id
        return accounts[lab_id]

    federation = system_account(session, AccountKind.federation).id
    fees = {v.id: v.fee_fraction for v in versions}
    cloud = cloud or CloudPrices()
    # Leases come in few sizes: price each (version, size) once per pass, not per lease.
    shapes: dict[tuple[int, Resources], tuple[float, str | None, float]] = {}

    def shape(price: PriceVersion, res: Resources) -> tuple[float, str | None, float]:
        key = (price.id, res)
        if key not in shapes:
            cls = gpu_class(price, res.gpu_model)[0] if res.gpus else None
            shapes[key] = (pcu_per_hour(price, res), cls,
                           cloud.cost(cpus=res.cpus, memory=res.memory, gpus=res.gpus,
                                      gpu_class=cls, seconds=3600))
        return shapes[key]

    records: list[dict] = []
    for usage in leases:
        start = last.get(usage.lease_id, as_utc(usage.started_at))
        ended = as_utc(usage.ended_at) if usage.ended_at else None
        res = usage.resources
        for p_start, p_end in periods(start, ended, now, interval):
            price = versions[max(0, bisect.bisect_right(starts, p_start) - 1)]
            rate, cls, cloud_hourly = shape(price, res)
            seconds = (p_end - p_start).total_seconds()
            if usage.paused:
                seconds -= _paused_seconds(usage.paused, p_start, p_end)
            charge = to_nano(rate * seconds / 3600)
            self_use = usage.consumer_lab_id == usage.provider_lab_id
            records.append({
                "lease_id": usage.lease_id, "period_start": p_start, "period_end": p_end,
                "seconds": seconds, "cpus": res.cpus, "memory": res.memory, "gpus": res.gpus,
                "gpu_model": res.gpu_model,
                "gpu_class": cls, "pcu_per_hour": rate, "charge": charge,
                "earned": 0 if self_use else int(
                    charge * (1 - fees[price.id]) * usage.reliability),
                "cloud_cost": cloud_hourly * seconds / 3600,
                "consumer_lab_id": usage.consumer_lab_id,
                "provider_lab_id": usage.provider_lab_id, "provider_id": usage.provider_id,
                "user_id": usage.user_id,
                "self_use": self_use,
                "reliability": usage.reliability, "price_version_id": price.id,
                "transfer_id": None})
    if not records:
        return []
    charged = [r for r in records if not r["self_use"] and r["charge"] > 0]
    if charged:
        # Core inserts: a pass over thousands of leases must not build thousands of ORM objects.
        ids = _insert_transfers(session, [
            {"kind": TransferKind.usage, "created_at": r["period_end"],
             "memo": f"lease {r['lease_id']} {r['period_start']:%Y-%m-%d %H:%M:%S}"
                     f"–{r['period_end']:%H:%M:%S}"} for r in charged])
        entries = []
        for record, transfer_id in zip(charged, ids, strict=True):
            record["transfer_id"] = transfer_id
            charge, earned, at = record["charge"], record["earned"], record["period_end"]
            entries += [(transfer_id, account_of(record["consumer_lab_id"]), -charge, at),
                        (transfer_id, account_of(record["provider_lab_id"]), earned, at),
                        (transfer_id, federation, charge - earned, at)]
        apply_entries(session, [e for e in entries if e[2] != 0])
    insert_rows(session, UsageRecord.__table__, records)
    # Fair share counts all use, own machines included: it orders who is served next.
    add_usage(session, [item for r in records for item in (
        ("lab", r["consumer_lab_id"], r["charge"] / NANO, r["period_end"]),
        ("user", r["user_id"], r["charge"] / NANO, r["period_end"]))], half_life)
    served: dict[str, float] = {}
    for r in records:
        served[r["provider_id"]] = served.get(r["provider_id"], 0.0) + r["seconds"]
    record_clean_time(session, served, half_life=reliability_half_life)
    add_to_rollups(session, records)
    session.flush()
    return [MeteredPeriod(r["lease_id"], r["period_start"], r["period_end"], r["charge"])
            for r in records]
