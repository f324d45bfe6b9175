"""``parallex db prune``: delete usage records and capacity samples older than a site keeps.

Which records go is decided by their lease, not their date: a lease that ended before the
horizon (a UTC midnight, ``keep_days`` before today) and whose every period is charged has
its records folded into one row of sums and deleted (accounting/retention.py), in the order
leases ended, a batch of leases to a transaction. A lease still running keeps all its
records, however old, so metering, which reads a lease's latest record, never misses one; a
lease whose end is not charged yet stops the prune there until it is (the next run goes on).

The horizon is recorded before anything is deleted, so a report that starts while a prune
runs refuses a partial day before it instead of summing what is half gone. Each batch first
updates the pruning row, which serialises prunes run at once (PostgreSQL: its row lock;
SQLite: the write lock, taken before the batch reads) and lets a prune cut short go on where
it stopped. Ledger entries, transfers, balances and daily rollups are never deleted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, func, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from accounting.metering import UsageRecord
from accounting.models import as_utc, utcnow
from accounting.retention import USAGE_RECORDS, UsagePruning, fold_and_delete, pruning

from . import db
from .capacity import CapacitySample
from .models import END_NOT_CHARGED, Lease, ended_after

#: The fewest days a prune keeps: statements and disputes are settled monthly, and a typo
#: (``--keep-days 3`` for 30) must not erase a month's detail.
MIN_KEEP_DAYS = 31
#: The most days a prune may keep (a century; further back than any date it can count).
MAX_KEEP_DAYS = 36_500
#: The most leases (or capacity samples) a transaction may take.
MAX_BATCH = 100_000
#: Leases (or capacity samples) to a transaction by default: ~2,000 leases of an hour at the
#: one-minute interval are ~120,000 records, a few seconds of PostgreSQL's time.
DEFAULT_BATCH = 2000


@dataclass
class PruneReport:
    """What a prune deleted (or, dry, would delete)."""

    before: dt.datetime
    leases: int = 0
    records: int = 0
    capacity_samples: int = 0
    #: The end of the earliest lease whose end is not charged yet, where it stopped (None:
    #: none held it back).
    held_back_at: dt.datetime | None = None
    dry_run: bool = False


def horizon(now: dt.datetime, keep_days: int) -> dt.datetime:
    """The UTC midnight ``keep_days`` days before ``now``'s day: what ended before it goes."""
    day = as_utc(now).date() - dt.timedelta(days=keep_days)
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def _first_uncharged_end(s: Session) -> dt.datetime | None:
    at = s.exec(select(func.min(Lease.ended_at)).where(END_NOT_CHARGED)).one()
    return as_utc(at) if at is not None else None


def _prunable(until: dt.datetime, after: tuple[dt.datetime, str] | None):
    """Leases that ended before ``until``, after the cursor, in the order they ended (the
    partial index of ended leases by end time answers it)."""
    q = select(Lease.id, Lease.ended_at).where(col(Lease.ended_at).is_not(None),
                                               col(Lease.ended_at) < until)
    if after is not None:
        q = q.where(ended_after(after))
    return q.order_by(col(Lease.ended_at), col(Lease.id))


def _cursor(row: UsagePruning | None) -> tuple[dt.datetime, str] | None:
    if row is None or row.through_ended_at is None or row.through_lease_id is None:
        return None
    return as_utc(row.through_ended_at), row.through_lease_id


def prune(engine: Engine, keep_days: int, *, now: dt.datetime | None = None,
          batch: int = DEFAULT_BATCH, dry_run: bool = False,
          progress: Callable[[PruneReport], None] | None = None) -> PruneReport:
    """Delete the usage records of leases that ended before the horizon (keeping each
    lease's sums) and capacity samples taken before it; ``progress`` is called after each
    batch. Raises ValueError for a ``keep_days`` outside ``MIN_KEEP_DAYS``..``MAX_KEEP_DAYS``
    or a ``batch`` outside 1..``MAX_BATCH``."""
    if keep_days > MAX_KEEP_DAYS:
        raise ValueError(f"--keep-days {keep_days} is over {MAX_KEEP_DAYS} (a century); "
                         "to keep everything, do not prune")
    if keep_days < MIN_KEEP_DAYS:
        raise ValueError(f"--keep-days {keep_days} is under the least a federation keeps, "
                         f"{MIN_KEEP_DAYS} days (a month's statements are read from them)")
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"--batch {batch}: give 1 to {MAX_BATCH:,} leases to a transaction")
    now = as_utc(now or utcnow())
    before = horizon(now, keep_days)
    report = PruneReport(before, dry_run=dry_run)
    with db.session(engine) as s:
        held = _first_uncharged_end(s)
        until = min(before, held) if held is not None else before
        report.held_back_at = held if held is not None and held < before else None
        if dry_run:
            prunable = _prunable(until, _cursor(pruning(s))).subquery()
            report.leases = s.exec(select(func.count()).select_from(prunable)).one()
            report.records = s.exec(select(func.count()).select_from(UsageRecord).where(
                col(UsageRecord.lease_id).in_(select(prunable.c.id)))).one()
            report.capacity_samples = s.exec(select(func.count()).select_from(
                CapacitySample).where(col(CapacitySample.at) < before)).one()
            return report
        _record_horizon(s, before, now)
    while True:
        with db.session(engine) as s:
            row = _lock_pruning(s, now)
            found = s.exec(_prunable(until, _cursor(row)).limit(batch)).all()
            if not found:
                s.rollback()
                break
            ids = [lease_id for lease_id, _end in found]
            records = fold_and_delete(s, ids, now)
            row.through_ended_at, row.through_lease_id = found[-1][1], found[-1][0]
            row.leases += len(ids)
            row.records += records
            s.add(row)
            s.commit()
        report.leases += len(ids)
        report.records += records
        if progress is not None:
            progress(report)
    while True:
        with db.session(engine) as s:
            ids = s.exec(select(CapacitySample.id).where(col(CapacitySample.at) < before)
                         .limit(batch)).all()
            if not ids:
                break
            s.connection().execute(delete(CapacitySample.__table__).where(
                CapacitySample.__table__.c.id.in_(ids)))
            s.commit()
        report.capacity_samples += len(ids)
        if progress is not None:
            progress(report)
    return report


def _record_horizon(s: Session, before: dt.datetime, now: dt.datetime) -> None:
    """Record the horizon (never moving it back: what an earlier prune deleted is gone)
    before anything is deleted, in a commit of its own."""
    row = pruning(s)
    if row is None:
        row = UsagePruning(name=USAGE_RECORDS, before=before, pruned_at=now)
    else:
        row.before = max(as_utc(row.before), before)
        row.pruned_at = now
    s.add(row)
    s.commit()


def _lock_pruning(s: Session, now: dt.datetime) -> UsagePruning:
    """The pruning row, written first in the batch's transaction: concurrent prunes take
    turns (each then reads the cursor the other left)."""
    s.connection().execute(update(UsagePruning.__table__)
                           .where(UsagePruning.__table__.c.name == USAGE_RECORDS)
                           .values(pruned_at=now))
    row = s.exec(select(UsagePruning).where(UsagePruning.name == USAGE_RECORDS)
                 .execution_options(populate_existing=True)).one()
    return row
