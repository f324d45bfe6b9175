"""A PI's view of their lab: its members and its machines (with their reliability).

PIs see their own lab only; administrators any lab; members are told to ask their PI.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import func
from sqlmodel import col, select

from accounting.models import Membership, User
from accounting.reliability import factor, standings
from accounting.units import to_pcu
from accounting.usage_totals import UsageTotal, last_used, usage_totals

from .access import managed_lab, scope_of
from .auth import Principal, require_user
from .id_params import LabPath
from .models import HELD_STATES, ClusterRecord, Lease, Provider
from .preemption import preemption_rates

router = APIRouter()


@router.get("/labs/{lab}/members")
def lab_members(lab: LabPath, request: Request,
                since: dt.datetime | None = Query(None, description="Usage from then on."),
                principal: Principal = Depends(require_user)) -> dict:
    """Each member's role, quotas, what they hold now and what they used."""
    with request.app.state.session() as s:
        row = managed_lab(s, scope_of(principal), lab)
        members = s.exec(select(Membership, User).join(User, User.id == Membership.user_id)
                         .where(Membership.lab_id == row.id)).all()
        held = dict.fromkeys([u.id for _m, u in members], (0.0, 0))
        for user_id, cpus, gpus in s.exec(
                select(ClusterRecord.user_id, func.sum(Lease.cpus), func.sum(Lease.gpus))
                .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
                .where(ClusterRecord.lab_id == row.id, col(Lease.state).in_(HELD_STATES))
                .group_by(ClusterRecord.user_id)):
            held[user_id] = (float(cpus or 0), int(gpus or 0))
        used = usage_totals(s, by="user_id", since=since, consumer_lab_id=row.id)
        last = last_used(s, row.id, since)
        out = []
        for m, u in sorted(members, key=lambda mu: mu[1].name):
            t = used.get(u.id, UsageTotal())
            out.append({"user": u.name, "role": m.role.value, "max_cpus": m.max_cpus,
                        "max_gpus": m.max_gpus, "held_cpus": held[u.id][0],
                        "held_gpus": held[u.id][1], "pcu": str(to_pcu(t.charged)),
                        "pcu_including_self_use": str(to_pcu(t.charged + t.self_use)),
                        "core_hours": round(t.cpu_seconds / 3600, 6),
                        "gpu_hours": round(t.gpu_seconds / 3600, 6),
                        "last_used": last.get(u.id)})
        return {"lab": row.name, "since": since, "members": out}


@router.get("/labs/{lab}/machines")
def lab_machines(lab: LabPath, request: Request,
                 principal: Principal = Depends(require_user)) -> dict:
    """The lab's provider machines: capacity, reliability and what they earned."""
    with request.app.state.session() as s:
        row = managed_lab(s, scope_of(principal), lab)
        providers = s.exec(select(Provider).where(Provider.lab_id == row.id)
                           .order_by(Provider.name)).all()
        standing = standings(s, [p.id for p in providers])
        rates = preemption_rates(s, [p.id for p in providers])
        earned = usage_totals(s, by="provider_id", provider_lab_id=row.id)
        return {"lab": row.name,
                "provider_limits": {"cpus": row.provider_max_cpus,
                                    "memory": row.provider_max_memory,
                                    "gpus": row.provider_max_gpus},
                "machines": [
            {"id": p.id, "name": p.name, "online": p.online, "cpus": p.cpus,
             "memory": p.memory, "gpus": p.gpus, "last_seen": p.last_seen,
             "reliability": round(factor(standing[p.id].penalty), 4),
             "lost_leases": standing[p.id].lost_leases,
             "failed_leases": standing[p.id].failed_leases,
             "offering": p.offering, "offer_note": p.offer_note,
             "site": p.site, "accepts_peers": p.accepts_peers,
             "preemption_rate": round(rates.get(p.id, 0.0), 4),
             "environment": p.environment, "environments_ready": len(p.environments),
             "earned_pcu": str(to_pcu(earned.get(p.id, UsageTotal()).earned))} for p in providers]}
