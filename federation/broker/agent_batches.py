"""Agents' frequent requests, many to a transaction: heartbeats recorded, lease lists read.

A thousand agents heartbeating every 5 s are 200 requests a second that each changed one
provider row and read its held leases: as units of their own they were ~10 database round
trips each (authentication, the provider's row, the update, the held leases, the commit),
each on a thread of the request pool, and a wave of long polls returning together queued
heartbeats behind it for seconds (issue 14's load benchmark: heartbeat p99 1.3 s at 200
agents). Now a heartbeat request waits on the event loop while the heartbeat batcher (a
``Coalescer``) records every heartbeat that arrived during the previous batch at once: one
read of the providers and their held leases, one update of their rows, each statement a
transaction of its own (``db.autocommit``: on a loaded broker each round trip to PostgreSQL
costs ~5 ms, and a transaction's BEGIN and COMMIT are two more).

Most heartbeats repeat the one before ("still here, running the same workers, offering as
before") and are answered once queued, not once recorded (``Broker.provider_heartbeat``): on
two saturated cores the wait for a batch and its two statements was most of a slow heartbeat's
time (issue 14's load benchmark, all users churning in the same 5 s: probes' p99 240 → 90-130
ms). Two things keep that safe. A report the agent sends after such an answer may be recorded
before the heartbeat, so a running lease the heartbeat does not list counts as gone only if it
started before the heartbeat arrived, by the margin replicas' clocks may differ
(``QUEUED_ORDER_MARGIN``); and a heartbeat writes its provider's row only if no later one was
recorded (another replica may have recorded the agent's next one first). A heartbeat that
changes something (its workers, its offer, its environments), the first a replica sees of a
machine, and every heartbeat while the replica's batches fail or stall still wait for their
batch, so the agent's later report never overtakes them and a broken database is answered 503.

Long polls that end together (a wake-up for many machines, agents started together) read
their lease lists the same way: one query, in autocommit, for every list asked while the
previous batch ran.
Agents' reports of their leases' states (running, suspended, preempted, ended; ~2 a second
for each placement a second under churn) are recorded the same way too: their leases locked
in one statement, each report applied in turn, one commit. A report that cannot be applied
(another provider's lease, a move the lease cannot make) is refused on its own, having
written nothing; the others in its batch still count.
A batch starts as soon as the one before it ends, so a lone request waits for nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Select, String, and_, any_, bindparam, func, not_, or_, update
from sqlalchemy.exc import DataError
from sqlmodel import Session, col, select

from accounting.models import utcnow
from accounting.sql_lists import one_of_param

from ..lease_states import EndReason, IllegalTransition, move
from . import environments
from .errors import BrokerError, Conflict, NotFound
from .lease_ends import end_by_provider
from .models import HELD_STATES, NOT_ENDED, Lease, LeaseState, LeaseStateReport, Provider
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
    #: When it arrived, UTC: the provider's ``last_seen``, and what it could list.
    arrived_at: dt.datetime = field(default_factory=utcnow)
    #: Answered once queued, before its batch: a later report may be recorded first.
    answered_queued: bool = False
    #: Set by the batch that recorded it; False after a failed batch or a timeout.
    recorded: bool = False
    #: Set by the batch when the provider has no row (it never registered, or was removed).
    unknown: bool = False
    #: Set when the database refused a value this heartbeat carries (run alone, it failed).
    failure: Exception | None = None


@dataclass(eq=False)
class LeaseListRead:
    """One long poll's read of its provider's lease list, waiting for its batch."""

    provider_id: str
    #: Set by the batch (``views.agent_leases``); None after a failed batch or a timeout.
    leases: list[dict] | None = None


def each_alone_if_refused(batch: list, record: Callable[[list], None]) -> None:
    """``record(batch)`` as one unit of work; when the database refuses a value one item
    carries (``DataError``: a NUL character in a message, which PostgreSQL refuses and an
    agent may relay from a worker's output), each item alone instead, so only the item that
    carries it fails (``item.failure``, answered 422) and the rest of its batch still
    counts. Without this, one agent retrying such a report would fail every batch it joined.
    Other errors fail the whole batch (its requests are answered 503 and retried)."""
    try:
        record(batch)
    except DataError as exc:
        if len(batch) == 1:
            batch[0].failure = exc
            return
        for item in batch:
            try:
                record([item])
            except DataError as alone:
                item.failure = alone


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
    #: Held leases the heartbeats show overdue (``timeouts.overdue``), for ``end_late``;
    #: with each known provider's latest heartbeat, which they were judged by.
    late: list[str] = field(default_factory=list)
    latest: dict[str, Heartbeat] = field(default_factory=dict)


#: Seconds by which broker replicas' clocks may differ (NTP keeps them within milliseconds):
#: a heartbeat answered once queued counts a running lease it does not list as gone only if
#: the lease started at least this long before the heartbeat arrived. One that died sooner
#: is found by the next heartbeat.
QUEUED_ORDER_MARGIN = 2.0


#: A running or suspended lease its machine's heartbeat lists is never overdue (``overdue``):
#: those, nearly every held lease, stay in the database. A batch read every held lease of its
#: machines, ten a machine under issue 14's load, to find the few that are, and turning
#: their rows (three timestamps each) into Python was a third of the batch's CPU. Matched as
#: "machine lease" pairs: an agent that lists another machine's lease must not hide it.
_LISTED_STATES = (LeaseState.running, LeaseState.suspended)
_LISTED_KEY = Lease.provider_id + " " + Lease.id


def _providers_and_unlisted(postgresql: bool) -> Select:
    """The batch's providers (``ids``) with those of their held leases not ``listed``.

    The batch's ids restrict the lease side too, which the join alone implies: without it
    PostgreSQL hash-joined every held lease of the federation (a scan of the whole lease
    table, or of every held lease once ended ones outnumber them) for a batch of 20 machines,
    as the row estimates made per-machine lookups look dearer (issue 14; 2-3 ms against 6-9
    for 20 machines of 1,000 with 10,000 held leases, and 1.7 against 3.8 for 5 once 100,000
    had ended; ``test_a_heartbeat_batch_reads_only_its_machines_leases``). The lists go as
    one parameter each where they may be long, so the statement's text is the same whatever
    the batch's size."""
    on_lease = one_of_param(Lease.provider_id, "ids", postgresql)
    on_provider = one_of_param(Provider.id, "ids", postgresql)
    if postgresql:
        # One string, split by the server: psycopg escapes each element of an array it sends
        # with a regular expression, 0.6 ms for a batch's 400 leases. Ids are letters,
        # digits, '_' and '-' (federation/ids.py, checked on the way in): no ' ' or ','.
        listed = _LISTED_KEY == any_(func.string_to_array(bindparam("listed", type_=String),
                                                          ","))
    else:
        # One JSON array, not a placeholder a lease: a batch of machines that each run a
        # hundred workers would pass SQLite's limit of 32,766 placeholders a statement.
        pairs = func.json_each(bindparam("listed", type_=String)).table_valued("value")
        listed = _LISTED_KEY.in_(select(pairs.c.value))
    return (select(Provider.id, Provider.online, Provider.offering, Lease.id, Lease.state,
                   Lease.releasing_at, Lease.assigned_at, Lease.started_at)
            .outerjoin(Lease, and_(Lease.provider_id == Provider.id, on_lease, NOT_ENDED,
                                   col(Lease.state).in_(HELD_STATES),
                                   not_(and_(col(Lease.state).in_(_LISTED_STATES), listed))))
            .where(on_provider))


#: Built once each (building the statement each time was a third of a batch's CPU).
_PROVIDERS_AND_UNLISTED = {True: _providers_and_unlisted(True),
                           False: _providers_and_unlisted(False)}
#: A heartbeat's update of its provider's row, by primary key (an executemany over the batch),
#: unless a later heartbeat was recorded first (by another replica).
_SEEN = (update(Provider).where(Provider.id == bindparam("pid"),
                                or_(col(Provider.last_seen).is_(None),
                                    col(Provider.last_seen) < bindparam("last_seen")))
         .values(last_seen=bindparam("last_seen"), online=True,
                 offering=bindparam("offering"), offer_note=bindparam("offer_note")))
_SEEN_WITH_ENVIRONMENTS = _SEEN.values(environments_json=bindparam("environments_json"))


def record_heartbeats(s: Session, beats: list[Heartbeat], now: dt.datetime,
                      settings: BrokerSettings) -> Recorded:
    """Record ``beats``: each provider lives and offers (or not) as its latest heartbeat
    says. Two statements, neither needing the other's transaction, so the caller may run
    them in autocommit (``db.autocommit``): one read of the providers and those of their held
    leases that may be overdue (not the running ones their heartbeats list), one update of the
    providers' rows by primary key. Leases the heartbeats show overdue are
    returned in ``late``, for ``end_late`` in a unit of work of its own (they are rare)."""
    latest: dict[str, Heartbeat] = {}
    environments: dict[str, list[str]] = {}
    for beat in sorted(beats, key=lambda b: b.arrived):
        latest[beat.provider_id] = beat
        if beat.environments is not None:  # None keeps the list an earlier one sent
            environments[beat.provider_id] = beat.environments
    out = Recorded()
    if not latest:
        return out
    # The providers with the held leases that may be overdue, as columns: a Lease built for
    # each of a batch's ~100 held leases was half the batch's time (issue 14). On the
    # session's connection: the ORM's result machinery was a third of the batch's CPU.
    conn = s.connection()
    postgresql = conn.dialect.name == "postgresql"
    listed = [f"{pid} {lease_id}" for pid, beat in latest.items() for lease_id in beat.running]
    rows = conn.execute(_PROVIDERS_AND_UNLISTED[postgresql],
                        {"ids": sorted(latest),
                         "listed": ",".join(listed) if postgresql else json.dumps(listed)}
                        ).all()
    known: dict[str, tuple[bool, bool]] = {}
    held = []
    for pid, online, offering, lease_id, state, releasing_at, assigned_at, started_at in rows:
        known[pid] = (online, offering)
        if lease_id is not None:
            held.append((lease_id, pid, state, releasing_at, assigned_at, started_at))
    # Rows in id order, as every unit of work that locks several providers takes them.
    changes: dict[bool, list[dict]] = {True: [], False: []}  # with environments or not
    for pid in sorted(known):
        beat, (online, offering) = latest[pid], known[pid]
        if not online or (beat.offering and not offering):
            out.woken.add(pid)
            out.capacity_changed = True
        change = {"pid": pid, "last_seen": beat.arrived_at, "offering": beat.offering,
                  "offer_note": beat.offer_note}
        if pid in environments:
            change["environments_json"] = json.dumps(environments[pid])
        changes[pid in environments].append(change)
    for with_environments, group in changes.items():
        if group:
            conn.execute(_SEEN_WITH_ENVIRONMENTS if with_environments else _SEEN, group)
    out.latest = {pid: latest[pid] for pid in known}
    out.late = sorted(lease_id for lease_id, pid, state, releasing_at, assigned_at, started_at
                      in held
                      if overdue(LeaseState(state), lease_id, releasing_at, assigned_at,
                                 set(latest[pid].running), now, settings, started_at,
                                 listed_before(latest[pid])))
    for beat in beats:
        beat.unknown = beat.provider_id not in known
    return out


def listed_before(beat: Heartbeat) -> dt.datetime | None:
    """For a heartbeat answered once queued, leases that started before this could have
    been listed by it (its arrival, less the margin of replicas' clocks); None for one that
    waited for its batch: the agent sent no report between it and its answer."""
    if not beat.answered_queued:
        return None
    return beat.arrived_at - dt.timedelta(seconds=QUEUED_ORDER_MARGIN)


def end_late(s: Session, recorded: Recorded, now: dt.datetime,
             settings: BrokerSettings) -> None:
    """End ``recorded.late`` leases that are still overdue, read again under a row lock (a
    report may have ended one meanwhile), in the caller's unit of work (the caller commits);
    adds to ``recorded`` what changed.

    A lease another unit of work holds locked is left to the next heartbeat: a metering
    unit locks the leases it charges until it commits (a whole pass did, 10-20 s under
    issue 14's load, before passes were cut into units), and a heartbeat batch waiting for
    it held every agent's heartbeat past the 10 s they wait, answered 503, until machines
    were taken for lost."""
    for lease in s.exec(select(Lease).where(col(Lease.id).in_(recorded.late))
                        .order_by(Lease.id).with_for_update(skip_locked=True)).all():
        beat = recorded.latest[lease.provider_id]  # every late lease's provider has one
        if end_overdue(s, lease, set(beat.running), now, settings, listed_before(beat)):
            recorded.woken.add(lease.provider_id)
            recorded.capacity_changed = True


@dataclass(eq=False)
class Report:
    """One agent's report of one lease's state, waiting for its batch."""

    provider_id: str
    lease_id: str
    body: LeaseStateReport
    #: When it arrived (monotonic): reports of one lease apply in this order.
    arrived: float = field(default_factory=time.monotonic)
    #: Set by the batch: the lease's state and end reason after it (valid once recorded).
    state: LeaseState | None = None
    end_reason: EndReason | None = None
    #: Set once the batch that applied it committed.
    recorded: bool = False
    #: Set by the batch when the report was refused (it wrote nothing).
    refused: BrokerError | None = None
    #: Set when the database refused a value this report carries (run alone, it failed).
    failure: Exception | None = None


@dataclass
class Reported:
    """What a batch of reports changed. No agent's poll is woken for it: each change is
    what an agent reported of its own lease, which it knows (a wake-up only made it read
    its list again and poll again: a quarter of the polls a lease's placement, start,
    release and end cost, issue 14)."""

    #: Leases that ended (to be charged; capacity came back).
    ended: set[str] = field(default_factory=set)


def record_reports(s: Session, reports: list[Report]) -> Reported:
    """Apply ``reports`` in the caller's unit of work (the caller commits, then the reports
    not refused count as recorded). Their leases are locked first, in id order as every unit
    of work that locks several leases takes them; a pass never writes a lease that has a
    provider, and a cluster's release of the same lease waits on the row (or this on it)."""
    out = Reported()
    ids = sorted({r.lease_id for r in reports})
    leases = {lease.id: lease for lease in s.exec(
        select(Lease).where(col(Lease.id).in_(ids)).order_by(Lease.id).with_for_update())}
    # By provider, so the reliability rows that ends count against are taken in one order.
    for report in sorted(reports, key=lambda r: (r.provider_id, r.lease_id, r.arrived)):
        lease = leases.get(report.lease_id)
        if lease is None or lease.provider_id != report.provider_id:
            report.refused = NotFound("unknown-lease", f"no lease {report.lease_id!r} "
                                      f"assigned to provider {report.provider_id}")
            continue
        try:
            changed = apply_report(s, lease, report.body)
        except IllegalTransition as exc:  # checked before anything is written
            report.refused = Conflict("illegal-move", str(exc))
            continue
        except BrokerError as exc:
            report.refused = exc
            continue
        report.state, report.end_reason = lease.state, lease.end_reason
        if changed and lease.state == LeaseState.ended:
            out.ended.add(lease.id)
    return out


def apply_report(s: Session, lease: Lease, body: LeaseStateReport) -> bool:
    """One report on its (locked) lease; True when the lease changed. Raises before writing
    anything when the move makes no sense."""
    if lease.state == LeaseState.ended:
        return False  # idempotent: a repeated or late report changes nothing
    if body.state != LeaseState.ended:
        changed = owner_move(lease, body)
    else:
        reason = body.reason
        if reason is None:
            reason = (EndReason.released if lease.state == LeaseState.releasing
                      else EndReason.failed)
        end_by_provider(s, lease, reason, body.message)
        if body.environment_error:
            environments.record_failure(s, lease, lease.provider_id, body.message)
        changed = True
    if changed:
        s.add(lease)
    return changed


def owner_move(lease: Lease, body: LeaseStateReport) -> bool:
    """Suspend, resume or preempt ``lease`` as its agent reports; True when it moved."""
    now = utcnow()
    if body.state == LeaseState.running:
        # From starting it means only that the process started: the lease runs (and is
        # metered) once the cluster confirms that its worker joined the scheduler.
        if lease.state != LeaseState.suspended:
            return False
        move(lease, LeaseState.running, at=now, message=body.message or "resumed")
        return True
    if body.state == LeaseState.suspended:
        if lease.state == LeaseState.suspended:
            return False
        if lease.state != LeaseState.running:
            raise Conflict("cannot-suspend", f"lease {lease.id} is {lease.state.value}; "
                           "only a running lease can be suspended")
        move(lease, LeaseState.suspended, at=now,
             message=body.message or "suspended for the machine's owner")
        return True
    # Preempted: the cluster retires the worker (its data moves) and asks for another.
    if lease.state == LeaseState.releasing:
        return False
    move(lease, LeaseState.releasing, at=now, reason=EndReason.preempted,
         message=body.message or "preempted for the machine's owner")
    return True
