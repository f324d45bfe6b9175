"""Agents' frequent requests, many to a transaction: heartbeats recorded, lease lists read.

A thousand agents heartbeating every 5 s are 200 requests a second that each changed one
provider row and read its held leases: as units of their own they were ~10 database round
trips each (authentication, the provider's row, the update, the held leases, the commit),
each on a thread of the request pool, and a wave of long polls returning together queued
heartbeats behind it for seconds (issue 14's load benchmark: heartbeat p99 1.3 s at 200
agents). Now a heartbeat request waits on the event loop while the heartbeat batcher (a
``Coalescer``) records every heartbeat that arrived during the previous batch in one
transaction: one read of the providers, one of their held leases, one commit.

The answer still means "recorded": the request is answered once its batch committed, so an
agent's later lease report never overtakes the heartbeat before it.

Long polls that end together (a wake-up for many machines, agents started together) read
their lease lists the same way: one query for every list asked while the previous batch ran.
A batch starts as soon as the one before it ends, so a lone request waits for nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from .models import HELD_STATES, Lease, LeaseState, Provider
from .settings import BrokerSettings
from .timeouts import end_overdue, overdue
from .views import agent_leases_of


@dataclass(eq=False)  # compared by identity: two equal heartbeats are still two requests
class Heartbeat:
    """One agent's heartbeat, waiting for its batch."""

    provider_id: str
    running: list[str]
    offering: bool = True
    offer_note: str = ""
    environments: list[str] | None = None
    #: When it arrived (monotonic): of one provider's heartbeats in a batch, the last wins.
    arrived: float = field(default_factory=time.monotonic)
    #: Set by the batch that recorded it; False after a failed batch or a timeout.
    recorded: bool = False
    #: Set by the batch when the provider has no row (it never registered, or was removed).
    unknown: bool = False


@dataclass(eq=False)
class LeaseListRead:
    """One long poll's read of its provider's lease list, waiting for its batch."""

    provider_id: str
    #: Set by the batch (``views.agent_leases``); None after a failed batch or a timeout.
    leases: list[dict] | None = None


def read_lease_lists(s: Session, reads: list[LeaseListRead], gateway: str | None) -> None:
    """Fill in each read's lease list, one query for all of them."""
    lists = agent_leases_of(s, sorted({r.provider_id for r in reads}), gateway)
    for read in reads:
        read.leases = lists.get(read.provider_id, [])


@dataclass
class Recorded:
    """What a batch changed beyond the providers' rows."""

    #: Providers whose lease lists changed (their agents' polls must wake).
    woken: set[str] = field(default_factory=set)
    #: Whether capacity came back (a provider returned or offers again, a lease ended):
    #: a placement pass should follow.
    capacity_changed: bool = False


def record_heartbeats(s: Session, beats: list[Heartbeat], now: dt.datetime,
                      settings: BrokerSettings) -> Recorded:
    """Record ``beats`` in the caller's unit of work (the caller commits, then marks them
    recorded): each provider lives and offers (or not) as its latest heartbeat says, and its
    leases that are overdue end (``timeouts.end_overdue``)."""
    latest: dict[str, Heartbeat] = {}
    environments: dict[str, list[str]] = {}
    for beat in sorted(beats, key=lambda b: b.arrived):
        latest[beat.provider_id] = beat
        if beat.environments is not None:  # None keeps the list an earlier one sent
            environments[beat.provider_id] = beat.environments
    ids = sorted(latest)
    out = Recorded()
    if not ids:
        return out
    # Rows in id order, as every unit of work that locks several providers takes them.
    rows = {p.id: p for p in s.exec(select(Provider).where(col(Provider.id).in_(ids))
                                    .order_by(Provider.id)).all()}
    for pid in ids:
        row, beat = rows.get(pid), latest[pid]
        if row is None:
            continue
        if not row.online or (beat.offering and not row.offering):
            out.woken.add(pid)
            out.capacity_changed = True
        row.last_seen = now
        row.online = True
        row.offering = beat.offering
        row.offer_note = beat.offer_note
        if pid in environments:
            row.environments_json = json.dumps(environments[pid])
        s.add(row)
    # The held leases as columns, then as rows only the few that are overdue: a Lease built
    # for each of the batch's ~100 held leases was half the batch's time (issue 14).
    alive = {pid: set(beat.running) for pid, beat in latest.items()}
    held = s.exec(select(Lease.id, Lease.provider_id, Lease.state, Lease.releasing_at,
                         Lease.assigned_at)
                  .where(col(Lease.provider_id).in_(list(rows)),
                         col(Lease.state).in_(HELD_STATES))).all()
    late = sorted(lease_id for lease_id, pid, state, releasing_at, assigned_at in held
                  if overdue(LeaseState(state), lease_id, releasing_at, assigned_at,
                             alive[pid], now, settings))
    if late:
        # Read again under a row lock: a report may have ended one meanwhile.
        for lease in s.exec(select(Lease).where(col(Lease.id).in_(late))
                            .order_by(Lease.id).with_for_update()).all():
            if end_overdue(s, lease, alive[lease.provider_id], now, settings):
                out.woken.add(lease.provider_id)
                out.capacity_changed = True
    for beat in beats:
        beat.unknown = beat.provider_id not in rows
    return out
