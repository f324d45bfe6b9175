"""Usage sums over any period, read from the daily rollups for its whole days and from the
usage records only for the partial days at its edges.

A usage record is one running lease's metered period (a minute at the default interval), so a
federation writes millions a day and keeps them all; a report that summed the records of its
whole period ("everything so far", a lab's members, a lab's machines) read more of them every
day the federation ran. The daily rollups hold the same sums per UTC day of ``period_end``
(written in the same transaction as the records), so whole days cost one rollup row each per
key, and only a period that starts or ends inside a day reads that day's records for its
edge, by the ``period_end`` index.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields

from sqlalchemy import case, func
from sqlmodel import Session, col, select

from .metering import UsageRecord
from .models import as_utc
from .retention import check_edges, pruned_before
from .rollups import UsageDaily

#: What a total may be grouped by or filtered on: columns both tables have, by these names.
KEYS = ("consumer_lab_id", "provider_lab_id", "provider_id", "user_id")


@dataclass
class UsageTotal:
    """Sums over a period: nano-PCU charged to other labs' machines, nano-PCU of use of the
    lab's own machines (free), nano-PCU the providers' labs earned, and seconds."""

    charged: int = 0
    self_use: int = 0
    earned: int = 0
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    seconds: float = 0.0
    cloud_cost: float = 0.0

    def add(self, other: UsageTotal) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _utc(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC (the rollups' days are UTC days); naive values are UTC. Times within
    a day of year 1 or 9999 that UTC cannot hold become its first or last instant."""
    value = as_utc(value)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        return (dt.datetime.min if value.year == 1 else dt.datetime.max).replace(tzinfo=dt.UTC)


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


def split_period(since: dt.datetime | None, until: dt.datetime | None
                 ) -> tuple[tuple[dt.date | None, dt.date | None] | None,
                            list[tuple[dt.datetime | None, dt.datetime | None]]]:
    """[since, until) of ``period_end`` as whole UTC days [first, end) for the rollups (None:
    no whole day; an end None: unbounded) and the ranges of records left at its edges."""
    since = _utc(since) if since is not None else None
    until = _utc(until) if until is not None else None
    if since is not None and since.date() == dt.date.max and since != _midnight(dt.date.max):
        return None, [(since, until)]  # inside the last day there is: no whole day after
    first = None if since is None else (
        since.date() if since == _midnight(since.date()) else since.date() + dt.timedelta(1))
    end = None if until is None else until.date()
    if first is not None and end is not None and first >= end:
        return None, [(since, until)]  # no whole day inside: the records alone
    edges = []
    if first is not None and since != _midnight(first):
        edges.append((since, _midnight(first)))
    if until is not None and until != _midnight(end):
        edges.append((_midnight(end), until))
    return (first, end), edges


def _summed(table, by: str, where: dict, cpu_seconds, gpu_seconds):
    """A query of ``UsageTotal``'s sums, in its fields' order, over rollups or records,
    grouped by column ``by`` of rows whose ``where`` columns have the given values."""
    key = getattr(table, by)
    return (select(key, func.sum(case((table.self_use == False, table.charge),  # noqa: E712
                                      else_=0)),
                   func.sum(case((table.self_use == True, table.charge), else_=0)),  # noqa: E712
                   func.sum(table.earned), func.sum(cpu_seconds), func.sum(gpu_seconds),
                   func.sum(table.seconds), func.sum(table.cloud_cost))
            .where(*(getattr(table, k) == v for k, v in where.items())).group_by(key))


def usage_totals(session: Session, *, by: str, since: dt.datetime | None = None,
                 until: dt.datetime | None = None, **where: int | str
                 ) -> dict[int | str, UsageTotal]:
    """Usage of periods ending in [since, until) (None: unbounded), summed per value of the
    column ``by`` (one of ``KEYS``) over the rows whose ``where`` columns (``KEYS`` too) have
    the given values."""
    if by not in KEYS or not set(where) <= set(KEYS):
        raise ValueError(f"usage is grouped and filtered by {', '.join(KEYS)}")
    days, edges = split_period(since, until)
    check_edges(session, edges)  # a partial day before the pruning horizon: refused
    out: dict[int | str, UsageTotal] = {}

    def fold(rows) -> None:
        for key, *sums in rows:
            out.setdefault(key, UsageTotal()).add(UsageTotal(
                int(sums[0] or 0), int(sums[1] or 0), int(sums[2] or 0),
                *(float(v or 0) for v in sums[3:])))

    if days is not None:
        d, (first, end) = UsageDaily, days
        q = _summed(d, by, where, d.cpu_seconds, d.gpu_seconds)
        if first is not None:
            q = q.where(d.day >= first)
        if end is not None:
            q = q.where(d.day < end)
        fold(session.exec(q).all())
    r = UsageRecord
    for lo, hi in edges:
        q = _summed(r, by, where, r.cpus * r.seconds, r.gpus * r.seconds)
        if lo is not None:
            q = q.where(r.period_end >= lo)
        if hi is not None:
            q = q.where(r.period_end < hi)
        fold(session.exec(q).all())
    return out


def last_used(session: Session, lab_id: int, since: dt.datetime | None = None
              ) -> dict[int, dt.datetime]:
    """When each member's last period charged to lab ``lab_id`` (since ``since``) ended.

    The rollups give the day; the member's records of that day give the time, by the
    (user, period end) index, so a member's whole history is never read. A day whose
    records may have been pruned (retention.py) gives its end, the latest the use can
    have ended (to the day, then)."""
    d = UsageDaily
    q = select(d.user_id, func.max(d.day)).where(d.consumer_lab_id == lab_id)
    if since is not None:
        q = q.where(d.day >= _utc(since).date())
    out = {}
    horizon = pruned_before(session)
    for user_id, day in session.exec(q.group_by(d.user_id)).all():
        lo = _midnight(day)
        if horizon is not None and lo < horizon:
            out[user_id] = _midnight(day + dt.timedelta(days=1))
            continue
        if since is not None:
            lo = max(lo, _utc(since))
        at = session.exec(select(func.max(UsageRecord.period_end)).where(
            UsageRecord.user_id == user_id, UsageRecord.consumer_lab_id == lab_id,
            col(UsageRecord.period_end) >= lo,
            col(UsageRecord.period_end) < _midnight(day + dt.timedelta(days=1)))).one()
        if at is not None:
            out[user_id] = as_utc(at)
    return out
