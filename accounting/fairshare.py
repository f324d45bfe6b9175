"""Fair share: usage decayed with a half-life, and the order in which competing requests are
served — lab by lab (share / decayed usage), then user by user within a lab, Fair-Tree style.

Decayed usage is kept per lab and per user as (value, as-of time) and brought forward when
read or added to, so ordering costs one row per lab, not a sum over history.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass

from sqlmodel import Field, Session, SQLModel, col, select

from .half_lives import DEFAULT_HALF_LIFE
from .models import as_utc


class DecayedUsage(SQLModel, table=True):
    """PCU used by a lab or user, decayed to ``as_of``."""

    kind: str = Field(primary_key=True, description="'lab' or 'user'.")
    key: int = Field(primary_key=True, description="Lab id or user id.")
    value: float = 0.0
    as_of: dt.datetime


def decayed(value: float, since: dt.datetime, now: dt.datetime, half_life: float) -> float:
    """``value`` recorded at ``since``, decayed to ``now``."""
    age = max(0.0, (now - since).total_seconds())
    return value * math.pow(0.5, age / half_life)


def add_usage(session: Session, items: Iterable[tuple[str, int, float, dt.datetime]],
              half_life: float = DEFAULT_HALF_LIFE) -> None:
    """Add (kind, key, PCU, at) usage; the caller commits.

    Items are first folded per (kind, key) — decayed to their latest time — so a metering pass
    over thousands of leases touches one row per lab and per user.
    """
    folded: dict[tuple[str, int], tuple[float, dt.datetime]] = {}
    for kind, key, pcu, at in items:
        value, as_of = folded.get((kind, key), (0.0, at))
        if at >= as_of:
            folded[(kind, key)] = (decayed(value, as_of, at, half_life) + pcu, at)
        else:
            folded[(kind, key)] = (value + decayed(pcu, at, as_of, half_life), as_of)
    for kind in sorted({k for k, _ in folded}):
        keys = [key for k, key in folded if k == kind]
        # Locked (PostgreSQL; SQLite has one writer anyway) and in key order: concurrent
        # meterers update a usage row one after the other instead of losing one update.
        rows = {r.key: r for r in session.exec(select(DecayedUsage).where(
            DecayedUsage.kind == kind, col(DecayedUsage.key).in_(keys))
            .order_by(DecayedUsage.key).with_for_update())}
        for key in keys:
            pcu, at = folded[(kind, key)]
            row = rows.get(key) or DecayedUsage(kind=kind, key=key, value=0.0, as_of=at)
            base = as_utc(row.as_of)
            if at >= base:
                row.value = decayed(row.value, base, at, half_life) + pcu
                row.as_of = at
            else:  # a late period: decay it to the row's time instead
                row.value += decayed(pcu, at, base, half_life)
            session.add(row)


def usage_now(session: Session, kind: str, keys: Iterable[int], now: dt.datetime,
              half_life: float = DEFAULT_HALF_LIFE) -> dict[int, float]:
    """Decayed usage of each key at ``now`` (0 for keys with none)."""
    keys = list(set(keys))
    rows = session.exec(select(DecayedUsage).where(DecayedUsage.kind == kind,
                                                   col(DecayedUsage.key).in_(keys))).all()
    out = {k: 0.0 for k in keys}
    for row in rows:
        out[row.key] = decayed(row.value, as_utc(row.as_of), now, half_life)
    return out


@dataclass(frozen=True)
class Claim:
    """One pending request as fair share sees it."""

    request_id: str
    lab: int
    user: int
    created: dt.datetime


EPSILON = 1e-6  # PCU: keeps a lab that used nothing finite (and first)


def lab_priority(share: float, usage: float, epsilon: float = EPSILON) -> float:
    """A lab's claim to be served next: its share over its decayed usage."""
    return share / (usage + epsilon)


def fair_order(claims: list[Claim], lab_share: dict[int, float], lab_usage: dict[int, float],
               user_usage: dict[int, float], epsilon: float = EPSILON) -> list[Claim]:
    """Claims in the order to serve them: labs with the highest share/usage first (a lab that
    used little for its share comes first), then within a lab the user who used least, then
    the oldest request. Pure, so placement stays a function of its inputs."""
    def key(c: Claim) -> tuple:
        priority = lab_priority(lab_share.get(c.lab, 1.0), lab_usage.get(c.lab, 0.0), epsilon)
        return (-priority, user_usage.get(c.user, 0.0), c.created, c.request_id)

    return sorted(claims, key=key)
