"""Ending and releasing leases: the broker's uses of the state machine's ``move``, with the
reliability incident a provider's fault records."""

from __future__ import annotations

from sqlmodel import Session

from accounting import reliability
from accounting.models import utcnow

from ..lease_states import EndReason, LeaseState, move
from .models import Lease


def end(lease: Lease, reason: EndReason, message: str = "") -> None:
    """End ``lease`` now. A reason chosen when its release was asked for (released, lost
    cluster) wins over ``reason``."""
    move(lease, LeaseState.ended, at=utcnow(), reason=reason, message=message)


def end_by_provider(s: Session, lease: Lease, reason: EndReason, message: str) -> None:
    """End ``lease`` on news from (or about) its provider; a lost or failed end counts
    against the provider's reliability unless the lease was already being released."""
    releasing = lease.state == LeaseState.releasing
    end(lease, reason, message)
    if (not releasing and lease.provider_id
            and lease.end_reason in (EndReason.lost, EndReason.failed)):
        reliability.record_incident(s, lease.provider_id, lease.end_reason.value,
                                    at=lease.ended_at)


def release(lease: Lease, reason: EndReason, message: str) -> bool:
    """Move a live lease towards ended (a pending one ends at once); True when it changed."""
    if lease.state == LeaseState.pending:
        end(lease, reason, message)
        return True
    if lease.state in (LeaseState.starting, LeaseState.running, LeaseState.suspended):
        # A suspended one too (its span closes here): its agent thaws the worker to stop it.
        move(lease, LeaseState.releasing, at=utcnow(), reason=reason, message=message)
        return True
    return False


def release_all(s: Session, leases: list[Lease], reason: EndReason,
                message: str) -> set[str | None]:
    """Release each lease; returns the providers whose agents must hear of it."""
    touched: set[str | None] = set()
    for lease in leases:
        if release(lease, reason, message):
            s.add(lease)
            touched.add(lease.provider_id)
    return touched
