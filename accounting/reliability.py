"""Provider reliability: a factor from 0.5 to 1.0 that scales what a provider's lab earns.

Each lease a provider loses (it stopped heart-beating) adds 1 to its penalty and each lease
that fails on it (the worker died or never started) adds 0.5. Clean serving time pays the
penalty back: it halves for every half-life of metered lease time. The factor is
0.5 + 0.5 * 2^(-penalty/2): one lost lease gives 0.85, four give 0.625, and it never drops
below 0.5, so an unlucky machine keeps earning something.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from sqlalchemy import update
from sqlmodel import Field, Session, SQLModel, col, select

from .half_lives import DEFAULT_RELIABILITY_HALF_LIFE
from .models import utcnow
from .sql_lists import one_of

INCIDENT_WEIGHTS = {"lost": 1.0, "failed": 0.5}
FLOOR = 0.5


class ProviderReliability(SQLModel, table=True):
    """A provider's standing; a provider without a row has a clean record (factor 1.0)."""

    provider_id: str = Field(primary_key=True)
    penalty: float = Field(default=0.0, ge=0,
                           description="Decayed weight of lost (1) and failed (0.5) leases.")
    lost_leases: int = Field(default=0, description="Leases lost on it, ever.")
    failed_leases: int = Field(default=0, description="Leases failed on it, ever.")
    updated_at: dt.datetime = Field(default_factory=utcnow)


def factor(penalty: float) -> float:
    """The reliability factor for ``penalty`` (0.5 to 1.0)."""
    return FLOOR + (1 - FLOOR) * 2 ** (-max(0.0, penalty) / 2)


def _ensure_rows(session: Session, provider_ids: list[str]) -> None:
    have = set(session.exec(select(ProviderReliability.provider_id)
                            .where(col(ProviderReliability.provider_id).in_(provider_ids))))
    for pid in sorted(set(provider_ids) - have):
        session.add(ProviderReliability(provider_id=pid))
    session.flush()


def record_incident(session: Session, provider_id: str,
                    kind: Literal["lost", "failed"], *, at: dt.datetime | None = None) -> None:
    """Count one lost or failed lease against ``provider_id``; the caller commits."""
    _ensure_rows(session, [provider_id])
    counter = (ProviderReliability.lost_leases if kind == "lost"
               else ProviderReliability.failed_leases)
    # Increments in SQL, so concurrent writers add up instead of overwriting each other.
    session.exec(update(ProviderReliability)
                 .where(ProviderReliability.provider_id == provider_id)
                 .values({ProviderReliability.penalty:
                          ProviderReliability.penalty + INCIDENT_WEIGHTS[kind],
                          counter: counter + 1, ProviderReliability.updated_at: at or utcnow()}))


def record_clean_time(session: Session, seconds_by_provider: dict[str, float], *,
                      half_life: float = DEFAULT_RELIABILITY_HALF_LIFE) -> None:
    """Decay the penalties of providers that served ``seconds`` of lease time."""
    if not seconds_by_provider:
        return
    rows = session.exec(select(ProviderReliability).where(
        one_of(session, col(ProviderReliability.provider_id), list(seconds_by_provider)),
        ProviderReliability.penalty > 0).order_by(ProviderReliability.provider_id)).all()
    for row in rows:
        decay = 0.5 ** (seconds_by_provider[row.provider_id] / half_life)
        session.exec(update(ProviderReliability)
                     .where(ProviderReliability.provider_id == row.provider_id)
                     .values({ProviderReliability.penalty: ProviderReliability.penalty * decay}))


def standings(session: Session, provider_ids: list[str]) -> dict[str, ProviderReliability]:
    """Each provider's row; providers never penalised get a clean one (not stored)."""
    rows = {r.provider_id: r for r in session.exec(select(ProviderReliability).where(
        col(ProviderReliability.provider_id).in_(provider_ids)))} if provider_ids else {}
    return {pid: rows.get(pid) or ProviderReliability(provider_id=pid) for pid in provider_ids}


def reliabilities(session: Session, provider_ids: list[str]) -> dict[str, float]:
    """The factor of each provider in ``provider_ids``."""
    # Penalties alone, not rows as objects: a metering pass asks for every serving machine.
    penalties = dict(session.exec(select(
        ProviderReliability.provider_id, ProviderReliability.penalty).where(
        one_of(session, col(ProviderReliability.provider_id), provider_ids))).all()) \
        if provider_ids else {}
    return {pid: factor(penalties.get(pid, 0.0)) for pid in provider_ids}
