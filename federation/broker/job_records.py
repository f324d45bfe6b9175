"""Job records: one per ended lease, the unit a site's accounting collector (XDMoD's job
ingestion, a GRACC-style feed) reads. docs/job-records.md documents each field.

A lease is a job here: it held a size (CPUs, memory, GPUs) on one machine from its start to its
end, for one user of one lab, and was charged what its usage records say. Records come in the
order leases ended (then by id), so a collector reads everything once by passing back the
cursor it was given. A record appears once its lease's charge is booked (a moment after the
lease ended), and never before a record of a lease that ended earlier.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

from sqlalchemy import func
from sqlmodel import Session, col, select

from accounting.models import Lab, User, as_utc, names_by_id
from accounting.retention import LeaseSums, lease_sums
from accounting.units import to_pcu

from .errors import Invalid
from .models import END_NOT_CHARGED, ClusterRecord, Lease, LeaseState, Provider, ended_after

#: The fields of a record, in CSV column order.
FIELDS = ("record_id", "cluster_id", "user", "lab", "provider", "provider_lab", "site",
          "cpus", "memory_bytes", "gpus", "gpu_model", "submit_time", "start_time",
          "end_time", "wall_seconds", "suspended_seconds", "charged_seconds", "core_hours",
          "gpu_hours", "pcu", "self_use", "end_reason")


def parse_cursor(cursor: str | None) -> tuple[dt.datetime, str] | None:
    """'<end time ISO>,<lease id>' → its parts; Invalid for anything else."""
    if not cursor:
        return None
    when, sep, lease_id = cursor.partition(",")
    try:
        if not sep or not lease_id:
            raise ValueError
        return as_utc(dt.datetime.fromisoformat(when)), lease_id
    except ValueError:
        raise Invalid("bad-cursor", "after must be the 'next' cursor of a previous page "
                      "('<end time>,<lease id>')") from None


def _suspended_seconds(lease: Lease) -> float:
    total = 0.0
    for start, end in json.loads(lease.suspensions_json or "[]"):
        if start and end:
            total += (dt.datetime.fromisoformat(end)
                      - dt.datetime.fromisoformat(start)).total_seconds()
    return round(total, 3)


def job_records(s: Session, *, lab_id: int | None, user_id: int | None,
                since: dt.datetime | None, until: dt.datetime | None,
                after: tuple[dt.datetime, str] | None, limit: int) -> tuple[list[dict], str | None]:
    """Records of leases that ended in [since, until), after the cursor, at most ``limit``;
    and the cursor of the next page (None at the end)."""
    whose = []
    if lab_id is not None:
        whose.append(ClusterRecord.lab_id == lab_id)
    if user_id is not None:
        whose.append(ClusterRecord.user_id == user_id)
    q = (select(Lease, ClusterRecord.user_id, ClusterRecord.lab_id)
         .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
         .where(Lease.state == LeaseState.ended, col(Lease.ended_at).is_not(None), *whose))
    # A lease whose end is not charged yet (a moment after it ended: its charge is booked
    # in a batch, or by the next metering pass) holds back itself and every later record:
    # a collector's cursor must not pass it, or the collector would keep its record
    # without its charge for good.
    first_uncharged = s.exec(
        select(func.min(Lease.ended_at)).join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
        .where(END_NOT_CHARGED, *whose)).one()
    if first_uncharged is not None:
        q = q.where(Lease.ended_at < first_uncharged)
    if since is not None:
        q = q.where(Lease.ended_at >= as_utc(since))
    if until is not None:
        q = q.where(Lease.ended_at < as_utc(until))
    if after is not None:
        q = q.where(ended_after(after))
    rows = s.exec(q.order_by(Lease.ended_at, Lease.id).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    ids = [lease.id for lease, _u, _l in rows]
    # From the usage records, and the sums kept of those pruned (accounting/retention.py).
    usage = lease_sums(s, ids)
    providers = {p.id: p for p in s.exec(select(Provider).where(col(Provider.id).in_(
        {lease.provider_id for lease, _u, _l in rows if lease.provider_id})))}
    labs = names_by_id(s, Lab, {lab for _le, _u, lab in rows}
                       | {p.lab_id for p in providers.values()})
    users = names_by_id(s, User, {u for _le, u, _l in rows})
    records = []
    for lease, user_id_, lab_id_ in rows:
        sums = usage.get(lease.id) or LeaseSums()
        provider = providers.get(lease.provider_id)
        start, end = lease.started_at, lease.ended_at
        records.append({
            "record_id": lease.id, "cluster_id": lease.cluster_id,
            "user": users.get(user_id_, ""), "lab": labs.get(lab_id_, ""),
            "provider": provider.name if provider else None,
            "provider_lab": labs.get(provider.lab_id) if provider else None,
            "site": provider.site if provider else None,
            "cpus": lease.cpus, "memory_bytes": lease.memory, "gpus": lease.gpus,
            "gpu_model": lease.priced_gpu_model,
            "submit_time": as_utc(lease.created_at).isoformat(),
            "start_time": as_utc(start).isoformat() if start else None,
            "end_time": as_utc(end).isoformat(),
            "wall_seconds": round((as_utc(end) - as_utc(start)).total_seconds(), 3)
            if start else 0.0,
            "suspended_seconds": _suspended_seconds(lease),
            "charged_seconds": round(sums.seconds, 3),
            "core_hours": round(sums.cpu_seconds / 3600, 6),
            "gpu_hours": round(sums.gpu_seconds / 3600, 6),
            "pcu": str(to_pcu(sums.charged)), "self_use": sums.any_self_use,
            "end_reason": str(getattr(lease.end_reason, "value", lease.end_reason) or ""),
        })
    last = rows[-1][0] if rows and more else None
    cursor = f"{as_utc(last.ended_at).isoformat()},{last.id}" if last else None
    return records, cursor


def as_csv(records: list[dict]) -> str:
    """The records as CSV with a header row, in FIELDS order."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()
