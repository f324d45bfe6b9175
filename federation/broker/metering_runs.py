"""Metering orchestration: which leases a metering pass charges, with which prices and
reliability factors; ``accounting.metering`` does the charging itself."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ColumnElement, and_, or_
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from accounting import metering, reliability
from accounting.metering import LeaseUsage
from accounting.pricing import Resources

from ..lease_states import LeaseState, suspensions
from .db import session
from .models import ClusterRecord, Lease, Provider
from .settings import BrokerSettings


def end_not_charged() -> ColumnElement[bool]:
    """Leases that ended after they started and whose last part is not charged yet (the
    end meterer's next batch, or the periodic pass, charges it)."""
    return and_(Lease.state == LeaseState.ended, Lease.started_at != None,  # noqa: E711
                or_(Lease.metered_until == None,  # noqa: E711
                    Lease.metered_until < Lease.ended_at))


def meter_leases(s: Session, settings: BrokerSettings, now: dt.datetime,
                 lease_ids: set[str] | None = None) -> int:
    """Charge running leases' whole periods and ended leases' remainders: all of them, or
    only ``lease_ids``; returns the periods recorded (the caller commits). Raises
    IntegrityError when another meterer recorded a period first."""
    query = (
        select(Lease, ClusterRecord, Provider)
        .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
        .join(Provider, Provider.id == Lease.provider_id)
        .where(or_(and_(Lease.started_at != None,  # noqa: E711
                        col(Lease.state).in_([LeaseState.running, LeaseState.suspended,
                                              LeaseState.releasing])),
                   end_not_charged())))
    if lease_ids is not None:
        query = query.where(col(Lease.id).in_(lease_ids))
    rows = s.exec(query).all()
    if not rows:
        return 0
    factors = reliability.reliabilities(s, sorted({p.id for _l, _c, p in rows}))
    usages = [LeaseUsage(
        lease.id, cluster.user_id, cluster.lab_id, provider.lab_id, provider.id,
        lease.started_at, lease.ended_at if lease.state == LeaseState.ended else None,
        Resources(lease.cpus, lease.memory, lease.gpus, lease.priced_gpu_model),
        reliability=factors[provider.id], paused=tuple(suspensions(lease)))
        for lease, cluster, provider in rows]
    records = metering.meter(
        s, usages, now=now, interval=settings.metering_interval,
        half_life=settings.fair_share_half_life, cloud=settings.cloud_prices,
        reliability_half_life=settings.reliability_half_life)
    last: dict[str, dt.datetime] = {}
    for r in records:
        last[r.lease_id] = max(last.get(r.lease_id, r.period_end), r.period_end)
    for lease, _c, _p in rows:
        until = lease.ended_at if lease.state == LeaseState.ended else last.get(lease.id)
        if until is not None:
            lease.metered_until = until
            s.add(lease)
    return len(records)


def meter_unit(engine: Engine, settings: BrokerSettings, now: dt.datetime,
               lease_ids: set[str] | None = None) -> int | None:
    """``meter_leases`` as a unit of work of its own on ``engine`` (the broker's thread or
    the periodic process); None when another meterer recorded a period first (rolled back:
    the next pass finds it done)."""
    with session(engine) as s:
        try:
            recorded = meter_leases(s, settings, now, lease_ids)
            s.commit()
        except IntegrityError:
            s.rollback()
            return None
    return recorded
