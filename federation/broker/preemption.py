"""How often each machine's owner takes it back: the share of a provider's recent leases that
ended preempted. Placement prefers machines that preempt less; PIs see the rate beside each
machine's reliability (a preemption is no fault of the provider and costs it nothing)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import func
from sqlmodel import Session, col, select

from accounting.models import utcnow

from ..lease_states import EndReason, LeaseState
from .models import Lease

#: How far back the rate looks, in seconds (7 days).
PREEMPTION_WINDOW = 7 * 24 * 3600.0


def preemption_rates(s: Session, provider_ids: Iterable[str], *,
                     now: dt.datetime | None = None,
                     window: float = PREEMPTION_WINDOW) -> dict[str, float]:
    """Per provider: preempted leases / leases ended in the last ``window`` seconds (0.0
    when none ended)."""
    ids = list(set(provider_ids))
    if not ids:
        return {}
    since = (now or utcnow()) - dt.timedelta(seconds=window)
    ended: dict[str, int] = {}
    preempted: dict[str, int] = {}
    for provider_id, reason, n in s.exec(
            select(Lease.provider_id, Lease.end_reason, func.count())
            .where(col(Lease.provider_id).in_(ids), Lease.state == LeaseState.ended,
                   Lease.ended_at >= since)
            .group_by(Lease.provider_id, Lease.end_reason)):
        ended[provider_id] = ended.get(provider_id, 0) + n
        if reason == EndReason.preempted:
            preempted[provider_id] = n
    return {p: (preempted.get(p, 0) / ended[p] if ended.get(p) else 0.0) for p in ids}
