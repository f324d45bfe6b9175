"""How often each machine's owner takes it back: the share of a provider's recent leases that
ended preempted. Placement prefers machines that preempt less; PIs see the rate beside each
machine's reliability (a preemption is no fault of the provider and costs it nothing)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import func
from sqlmodel import Session, select

from accounting.models import utcnow
from accounting.sql_lists import one_of

from ..lease_states import EndReason, LeaseState
from .memo import ExpiringMap
from .models import Lease

#: How far back the rate looks, in seconds (7 days).
PREEMPTION_WINDOW = 7 * 24 * 3600.0


def preemption_rates(s: Session, provider_ids: Iterable[str], *,
                     now: dt.datetime | None = None,
                     window: float = PREEMPTION_WINDOW) -> dict[str, float]:
    """Per provider: preempted leases / leases ended in the last ``window`` seconds (0.0
    when none ended). The ids as one array on PostgreSQL (``one_of``): a placement pass
    asks for every online provider's once its remembered rates expire, and a list of 1,000
    placeholders was converted anew each time, half of that pass's CPU."""
    ids = list(set(provider_ids))
    if not ids:
        return {}
    since = (now or utcnow()) - dt.timedelta(seconds=window)
    ended: dict[str, int] = {}
    preempted: dict[str, int] = {}
    for provider_id, reason, n in s.exec(
            select(Lease.provider_id, Lease.end_reason, func.count())
            .where(one_of(s, Lease.provider_id, ids), Lease.state == LeaseState.ended,
                   Lease.ended_at >= since)
            .group_by(Lease.provider_id, Lease.end_reason)):
        ended[provider_id] = ended.get(provider_id, 0) + n
        if reason == EndReason.preempted:
            preempted[provider_id] = n
    return {p: (preempted.get(p, 0) / ended[p] if ended.get(p) else 0.0) for p in ids}


#: Seconds a replica's placement passes reuse a provider's preemption rate (1 minute). The
#: rate covers 7 days and only orders providers that can all take a lease, so a minute-old
#: rate places as well as a fresh one; reading it took ~14 % of a placing pass under issue
#: 14's load (a count over every lease ended in 7 days on 1,000 providers).
PREEMPTION_RATES_TTL = 60.0

#: Most providers whose rates a replica remembers.
PREEMPTION_RATES_KEPT = 100_000


class RecentPreemptionRates:
    """Preemption rates as placement passes read them: each provider's read at most once a
    ``ttl`` seconds per replica (``preemption_rates`` for the rest)."""

    def __init__(self, ttl: float = PREEMPTION_RATES_TTL, size: int = PREEMPTION_RATES_KEPT):
        self._rates: ExpiringMap[str, float] = ExpiringMap(ttl, size)

    def rates(self, s: Session, provider_ids: Iterable[str]) -> dict[str, float]:
        """Per provider: its preemption rate, at most ``ttl`` seconds old."""
        out: dict[str, float] = {}
        missing = []
        for provider_id in set(provider_ids):
            rate = self._rates.get(provider_id)
            if rate is None:
                missing.append(provider_id)
            else:
                out[provider_id] = rate
        for provider_id, rate in preemption_rates(s, missing).items():
            self._rates.put(provider_id, rate)
            out[provider_id] = rate
        return out
