"""Metering orchestration: which leases a metering pass charges, with which prices and
reliability factors; ``accounting.metering`` does the charging itself."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from sqlalchemy import ColumnElement, and_, bindparam, or_, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from accounting import metering, reliability
from accounting.metering import LeaseUsage
from accounting.pricing import Resources
from accounting.sql_lists import one_of

from ..lease_states import LeaseState, suspensions
from .db import session
from .models import END_NOT_CHARGED, ClusterRecord, Lease, Provider
from .settings import BrokerSettings


def due_for_metering() -> ColumnElement[bool]:
    """Leases a metering pass charges: running (or suspended, or releasing) ones that
    started, and ended ones whose remainder is not charged."""
    return or_(and_(Lease.started_at != None,  # noqa: E711
                    col(Lease.state).in_([LeaseState.running, LeaseState.suspended,
                                          LeaseState.releasing])),
               END_NOT_CHARGED)


def meter_leases(s: Session, settings: BrokerSettings, now: dt.datetime,
                 lease_ids: set[str] | None = None) -> int:
    """Charge running leases' whole periods and ended leases' remainders: all of them, or
    only ``lease_ids``; returns the periods recorded (the caller commits). Raises
    IntegrityError when another meterer recorded a period first."""
    # Plain rows, not ORM objects: building a lease, a cluster and a machine object for each
    # of 10,000 leases was a fifth of a pass's CPU, and a pass only reads them.
    query = (
        select(Lease.id, Lease.state, Lease.started_at, Lease.ended_at, Lease.cpus,
               Lease.memory, Lease.gpus, Lease.placed_gpu_model, Lease.gpu_model,
               Lease.suspensions_json,
               ClusterRecord.user_id, ClusterRecord.lab_id, Provider.id.label("provider_id"),
               Provider.lab_id.label("provider_lab_id"))
        .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
        .join(Provider, Provider.id == Lease.provider_id)
        .where(due_for_metering()))
    if lease_ids is not None:
        query = query.where(one_of(s, col(Lease.id), lease_ids))
    rows = s.connection().execute(query).all()
    if not rows:
        return 0
    factors = reliability.reliabilities(s, sorted({r.provider_id for r in rows}))
    usages = [LeaseUsage(
        r.id, r.user_id, r.lab_id, r.provider_lab_id, r.provider_id,
        r.started_at, r.ended_at if r.state == LeaseState.ended else None,
        # As ``Lease.priced_gpu_model``: the model it runs on, once placed.
        Resources(r.cpus, r.memory, r.gpus, r.placed_gpu_model or r.gpu_model),
        reliability=factors[r.provider_id], paused=tuple(suspensions(r)))
        for r in rows]
    records = metering.meter(
        s, usages, now=now, interval=settings.metering_interval,
        half_life=settings.fair_share_half_life, cloud=settings.cloud_prices,
        reliability_half_life=settings.reliability_half_life)
    last: dict[str, dt.datetime] = {}
    for rec in records:
        last[rec.lease_id] = max(last.get(rec.lease_id, rec.period_end), rec.period_end)
    untils: dict[str, dt.datetime] = {}
    for r in rows:
        until = r.ended_at if r.state == LeaseState.ended else last.get(r.id)
        if until is not None:
            untils[r.id] = until
    set_metered_until(s, untils)
    return len(records)


def set_metered_until(s: Session, untils: dict[str, dt.datetime]) -> None:
    """Write leases' ``metered_until`` (lease id to time) in ``s``'s transaction.

    On PostgreSQL the rows are locked first in id order, as every writer of many leases
    locks them (``test_lock_order``), then written by one statement: as an ORM flush it was
    an UPDATE per lease, 45 µs of PostgreSQL's time each (0.45 s of a pass over 10,000)."""
    if not untils:
        return
    # Leases this session holds as objects see the value as written (no second write, no
    # stale read); a metering unit's own session holds none.
    for key, lease in s.identity_map.items():
        if key[0] is Lease and key[1][0] in untils:
            set_committed_value(lease, "metered_until", untils[key[1][0]])
    if s.get_bind().dialect.name != "postgresql":
        table = Lease.__table__
        s.connection().execute(
            update(table).where(table.c.id == bindparam("lease_id"))
            .values(metered_until=bindparam("until")),
            [{"lease_id": k, "until": v} for k, v in sorted(untils.items())])
        return
    ids = sorted(untils)
    s.connection().execute(text(
        "SELECT 1 FROM lease WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"), {"ids": ids})
    s.connection().execute(text(
        "UPDATE lease SET metered_until = v.until FROM unnest(CAST(:ids AS varchar[]), "
        "CAST(:untils AS timestamptz[])) AS v(id, until) WHERE lease.id = v.id"),
        {"ids": ids, "untils": [untils[i].astimezone(dt.UTC) for i in ids]})


#: Key of the PostgreSQL advisory lock that serialises metering units across processes.
METERING_LOCK = 0x706D6574  # "pmet"


def lock_metering(s: Session) -> None:
    """On PostgreSQL, hold the metering lock for the rest of ``s``'s transaction, before it
    reads what is charged (SQLite has one writer at a time anyway).

    The leader's periodic pass (seconds over 10,000 leases) and the replicas' lease-end
    batches charge the same ended leases. Run at once, the one that committed second waited
    for the other's insert and then failed on the period's unique key: under issue 14's load
    a replica's batch failed at nearly every pass, and now and then a whole periodic pass did,
    its thousands of periods left to the next. Taken first, the lock makes the second read
    what the first charged."""
    if s.get_bind().dialect.name == "postgresql":
        s.exec(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=METERING_LOCK))


#: Why the periodic pass goes in units (``BrokerSettings.metering_unit`` leases each): a pass
#: over 10,000 leases in one transaction held every running lease's row (its
#: ``metered_until``) and the labs' balances until it committed, 5-20 s under issue 14's load,
#: and lease reports and releases waited that long; in units each waits for one unit at most.
#: The pause after each unit (``metering_pause``) is for the machine rather than the rows: a
#: unit's database work runs in a PostgreSQL backend at the server's priority, not niced with
#: the periodic process, and back to back the units kept a 2-core machine saturated for the
#: whole pass (issue 14's load: heartbeats' p99 210 ms during passes, 105 ms outside them).
MAX_UNIT_PAUSE = 1.0


def due_lease_ids(s: Session) -> list[str]:
    """The ids of the leases a periodic pass charges now (``due_for_metering``), in id order."""
    return list(s.exec(select(Lease.id).where(due_for_metering()).order_by(Lease.id)).all())


def unit_pause(settings: BrokerSettings, unit_took: float) -> float:
    """Seconds to pause after a unit of the periodic pass that took ``unit_took`` seconds."""
    return min(settings.metering_pause * max(unit_took, 0.0), MAX_UNIT_PAUSE)


def meter_pass(engine: Engine, settings: BrokerSettings, now: dt.datetime,
               chunk: int | None = None,
               pause: Callable[[float], None] = time.sleep) -> int | None:
    """The periodic metering pass: every due lease, ``chunk`` leases to a unit of work
    (``meter_unit``; default ``settings.metering_unit``), each committed by itself, with
    ``pause`` called between units for ``unit_pause`` seconds; the periods recorded, None
    when a unit collided with a meterer that does not take the lock (its leases wait for the
    next pass, the other units' charges stand).

    The due leases are read first, outside the lock: a lease that starts meanwhile has no
    whole period yet, and one that ends meanwhile is charged by its end batch or, since each
    unit reads its leases again under the lock, by this pass, exactly once."""
    chunk = chunk or settings.metering_unit
    with session(engine) as s:
        ids = due_lease_ids(s)
    recorded, collided, took = 0, False, 0.0
    for start in range(0, len(ids), chunk):
        if start:
            pause(unit_pause(settings, took))
        began = time.monotonic()
        done = meter_unit(engine, settings, now, set(ids[start:start + chunk]))
        took = time.monotonic() - began
        if done is None:
            collided = True
        else:
            recorded += done
    return None if collided else recorded


def meter_unit(engine: Engine, settings: BrokerSettings, now: dt.datetime,
               lease_ids: set[str]) -> int | None:
    """``meter_leases`` of ``lease_ids`` as a unit of work of its own on ``engine`` (a
    lease-end batch, or one unit of ``meter_pass``), the metering lock held; None when a
    meterer that does not take the lock recorded a period first (rolled back: the next pass
    finds it done)."""
    with session(engine) as s:
        lock_metering(s)
        try:
            recorded = meter_leases(s, settings, now, lease_ids)
            s.commit()
        except IntegrityError:
            s.rollback()
            return None
    return recorded
