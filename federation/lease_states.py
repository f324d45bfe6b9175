"""The lease state machine: its states, end reasons, the moves between them, and the one
function that makes a move.

    pending ──placed──▶ starting ──worker joined──▶ running ◀──owner idle──┐
       │                   │  └────────release────────┐  │  └──owner back──▶ suspended
       │                   ▼                          ▼  ▼                     │
       └──────────────▶ ended ◀──worker stopped── releasing ◀──preempted──────┘

A *suspended* lease's worker is frozen because the machine's owner needs the CPU; its time is
not metered (``suspensions``) and it either resumes or is preempted (released with the target
``preempted``, its worker retired through its scheduler so its data moves elsewhere).

A lease's *status* is its state; its *target* while releasing is the reason it will end with
(``released`` when its cluster let it go, ``lost`` when the cluster vanished), kept apart in
``release_reason`` until the agent reports the worker gone; ``end_reason`` is written only when
the lease ends. A target chosen at release wins over what the agent reports later.

Pure: no database, no clock of its own; the broker, the cluster, the agent, the kernel and the
dashboards import these names instead of comparing strings.
"""

from __future__ import annotations

import datetime as dt
import json
from enum import StrEnum
from typing import Protocol


class LeaseState(StrEnum):
    pending = "pending"
    starting = "starting"
    running = "running"
    suspended = "suspended"
    releasing = "releasing"
    ended = "ended"


class EndReason(StrEnum):
    released = "released"
    lost = "lost"
    failed = "failed"
    preempted = "preempted"


#: States of a lease the user holds or waits for.
LIVE_STATES = (LeaseState.pending, LeaseState.starting, LeaseState.running,
               LeaseState.suspended)
#: States in which a lease occupies its provider's capacity.
HELD_STATES = (LeaseState.starting, LeaseState.running, LeaseState.suspended,
               LeaseState.releasing)
#: Every state but ended, named: a query's ``state <> 'ended'`` can only scan the lease
#: table, history and all; the state index answers a list.
NOT_ENDED_STATES = tuple(state for state in LeaseState if state != LeaseState.ended)

#: Every legal move; anything else is a bug the broker refuses to write.
TRANSITIONS: dict[LeaseState, frozenset[LeaseState]] = {
    LeaseState.pending: frozenset({LeaseState.starting, LeaseState.ended}),
    LeaseState.starting: frozenset({LeaseState.running, LeaseState.releasing, LeaseState.ended}),
    LeaseState.running: frozenset({LeaseState.suspended, LeaseState.releasing,
                                   LeaseState.ended}),
    LeaseState.suspended: frozenset({LeaseState.running, LeaseState.releasing,
                                     LeaseState.ended}),
    LeaseState.releasing: frozenset({LeaseState.ended}),
    LeaseState.ended: frozenset(),
}


class IllegalTransition(ValueError):
    """A move the state machine does not have (e.g. ended → running)."""


class LeaseLike(Protocol):
    """What ``move`` writes: the broker's Lease row has these fields."""

    id: str
    state: LeaseState
    release_reason: EndReason | None
    end_reason: EndReason | None
    message: str
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    releasing_at: dt.datetime | None
    suspensions_json: str


def suspensions(lease: LeaseLike) -> list[tuple[dt.datetime, dt.datetime | None]]:
    """The lease's suspended spans (the last one open while it is suspended), in UTC."""
    return [(_utc(dt.datetime.fromisoformat(a)), _utc(dt.datetime.fromisoformat(b)) if b
             else None) for a, b in json.loads(lease.suspensions_json or "[]")]


def _utc(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _set_suspensions(lease: LeaseLike,
                     spans: list[tuple[dt.datetime, dt.datetime | None]]) -> None:
    lease.suspensions_json = json.dumps([[a.isoformat(), b.isoformat() if b else None]
                                         for a, b in spans])


def can_move(current: LeaseState | str, to: LeaseState | str) -> bool:
    """True when ``current`` → ``to`` is a legal move."""
    return LeaseState(to) in TRANSITIONS[LeaseState(current)]


def move(lease: LeaseLike, to: LeaseState, *, at: dt.datetime,
         reason: EndReason | None = None, message: str | None = None) -> None:
    """Move ``lease`` to ``to`` at ``at``, writing the timestamps and the end reason that go
    with it; raises IllegalTransition for a move the machine does not have.

    - to running: ``started_at`` (metering starts here).
    - to releasing: ``releasing_at`` and the target ``release_reason``.
    - to ended: ``ended_at`` and ``end_reason``: the target chosen at release if any, else
      ``reason``.
    - to suspended: opens a suspended span; leaving suspended closes it.
    """
    if not can_move(lease.state, to):
        raise IllegalTransition(f"lease {lease.id} cannot go from {lease.state} to {to}")
    if to == LeaseState.ended and reason is None and lease.release_reason is None:
        raise IllegalTransition(f"lease {lease.id} cannot end without a reason")
    if lease.state == LeaseState.suspended:
        spans = suspensions(lease)
        spans[-1] = (spans[-1][0], at)
        _set_suspensions(lease, spans)
    if to == LeaseState.suspended:
        _set_suspensions(lease, [*suspensions(lease), (at, None)])
    elif to == LeaseState.running and lease.state == LeaseState.suspended:
        pass  # resumed: it started running long ago
    elif to in (LeaseState.running, LeaseState.releasing):
        for column, value in _stamps(to, at, reason).items():
            setattr(lease, column, value)
    elif to == LeaseState.ended:
        lease.end_reason = lease.release_reason or reason
        lease.ended_at = at
    if message is not None:
        lease.message = message or lease.message
    lease.state = to


def _stamps(to: LeaseState, at: dt.datetime, reason: EndReason | None) -> dict[str, object]:
    """What a move to running (not a resumption) or to releasing writes beside the state."""
    if to == LeaseState.running:
        return {"started_at": at}
    return {"releasing_at": at, "release_reason": reason}


#: The states a move may leave in one statement for many leases (``move_columns``).
SIMPLE_SOURCES = (LeaseState.starting, LeaseState.running)


def move_columns(sources: tuple[LeaseState, ...], to: LeaseState, *, at: dt.datetime,
                 reason: EndReason | None = None) -> dict[str, object]:
    """``move``'s writes for leases in ``sources`` moved to ``to``, as the column values of
    one UPDATE of many leases (a release's, a cluster heartbeat's confirmation). Only moves
    from starting or running to running or releasing, whose writes depend on nothing of the
    lease (a suspended lease's spans and an ending lease's release reason are its own). The
    message is the caller's: ``move`` keeps a lease's own for an empty one, which a
    statement for many cannot. Raises IllegalTransition for any other move."""
    for source in sources:
        if (source not in SIMPLE_SOURCES or to not in (LeaseState.running, LeaseState.releasing)
                or not can_move(source, to)):
            raise IllegalTransition(f"no move from {source} to {to} in one statement")
    return {"state": to, **_stamps(to, at, reason)}
