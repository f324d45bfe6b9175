"""Ending and releasing leases: the broker's uses of the state machine's ``move``, with the
reliability incident a provider's fault records."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Row, update
from sqlmodel import Session, col, select

from accounting import reliability
from accounting.models import utcnow
from accounting.sql_lists import one_of

from ..lease_states import SIMPLE_SOURCES, EndReason, LeaseState, move, move_columns
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


#: What ``release_rows`` needs of each lease, read (and locked) by the caller.
RELEASE_COLUMNS = (Lease.id, Lease.cluster_id, Lease.provider_id, Lease.state)


def release_rows(s: Session, rows: Sequence[Row], reason: EndReason,
                 message: str) -> set[str | None]:
    """``release_all`` for leases the caller read as ``RELEASE_COLUMNS`` rows, locked: the
    starting and running ones moved to releasing by one statement (``move_columns``), the
    pending ones (which end) and suspended ones (whose span closes) as objects through
    ``release``. A user's release of ten running leases was ten objects read whole
    (certificates and all) and ten updates (issue 14's load: the second costliest statement
    on PostgreSQL). Returns the providers whose agents must hear of it."""
    plain = [r for r in rows if r.state in SIMPLE_SOURCES]
    if plain:
        values = move_columns(SIMPLE_SOURCES, LeaseState.releasing, at=utcnow(), reason=reason)
        if message:  # as ``move``: an empty message keeps the lease's own
            values["message"] = message
        s.connection().execute(update(Lease).where(one_of(s, Lease.id, [r.id for r in plain]))
                               .values(values))
    touched = {r.provider_id for r in plain}
    others = [r.id for r in rows if r.state in (LeaseState.pending, LeaseState.suspended)]
    if others:
        leases = s.exec(select(Lease).where(col(Lease.id).in_(others)).order_by(Lease.id))
        touched |= release_all(s, list(leases), reason, message)
    return touched
