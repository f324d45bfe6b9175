"""A PI's view of their lab: its members and its machines (with their reliability).

PIs see their own lab only; administrators any lab; members are told to ask their PI.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import case, func
from sqlmodel import col, select

from accounting.metering import UsageRecord
from accounting.models import Membership, User, as_utc
from accounting.reliability import factor, standings
from accounting.units import to_pcu

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
        charged = case((UsageRecord.self_use == False, UsageRecord.charge),  # noqa: E712
                       else_=0)
        q = (select(UsageRecord.user_id, func.sum(charged), func.sum(UsageRecord.charge),
                    func.sum(UsageRecord.cpus * UsageRecord.seconds),
                    func.sum(UsageRecord.gpus * UsageRecord.seconds),
                    func.max(UsageRecord.period_end))
             .where(UsageRecord.consumer_lab_id == row.id).group_by(UsageRecord.user_id))
        if since is not None:
            q = q.where(UsageRecord.period_end >= as_utc(since))
        used = {u: rest for u, *rest in s.exec(q).all()}
        out = []
        for m, u in sorted(members, key=lambda mu: mu[1].name):
            pcu, total, cpu_s, gpu_s, last = used.get(u.id, (0, 0, 0, 0, None))
            out.append({"user": u.name, "role": m.role.value, "max_cpus": m.max_cpus,
                        "max_gpus": m.max_gpus, "held_cpus": held[u.id][0],
                        "held_gpus": held[u.id][1], "pcu": str(to_pcu(int(pcu or 0))),
                        "pcu_including_self_use": str(to_pcu(int(total or 0))),
                        "core_hours": round((cpu_s or 0) / 3600, 6),
                        "gpu_hours": round((gpu_s or 0) / 3600, 6),
                        "last_used": as_utc(last) if last else None})
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
        earned = dict(s.exec(select(UsageRecord.provider_id, func.sum(UsageRecord.earned))
                             .where(UsageRecord.provider_lab_id == row.id)
                             .group_by(UsageRecord.provider_id)).all())
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
             "earned_pcu": str(to_pcu(int(earned.get(p.id) or 0)))} for p in providers]}
