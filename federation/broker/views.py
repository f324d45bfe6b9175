"""What the broker shows of its records: clusters with their leases, an agent's lease list.
Reads only, a fixed number of queries whatever the number of rows."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import or_
from sqlmodel import Session, col, select

from accounting.models import Lab, User, names_by_id

from ..gateway import gateway_address
from .models import (
    HELD_STATES,
    ClusterPublic,
    ClusterRecord,
    Lease,
    LeasePublic,
    LeaseState,
    Provider,
)


def clusters_public(s: Session, clusters: list[ClusterRecord],
                    ended_after: dt.datetime | None = None) -> list[ClusterPublic]:
    """The public view of ``clusters``: their owners, labs, leases and the labs of the
    leases' providers, one query each (the heartbeat reads one cluster every few seconds).
    With ``ended_after``, of the ended leases only those that ended since then."""
    if not clusters:
        return []
    ids = [c.id for c in clusters]
    users = names_by_id(s, User, {c.user_id for c in clusters})
    labs = names_by_id(s, Lab, {c.lab_id for c in clusters})
    leases: dict[str, list[Lease]] = {cid: [] for cid in ids}
    query = select(Lease).where(col(Lease.cluster_id).in_(ids))
    if ended_after is not None:
        query = query.where(or_(Lease.state != LeaseState.ended, Lease.ended_at >= ended_after))
    for lease in s.exec(query.order_by(Lease.created_at, Lease.id)):
        leases[lease.cluster_id].append(lease)
    public = leases_public(s, [le for group in leases.values() for le in group])
    return [ClusterPublic(
        id=c.id, name=c.name, user=users[c.user_id], lab=labs[c.lab_id],
        scheduler_address=c.scheduler_address, labs=json.loads(c.allowed_labs_json),
        sites=json.loads(c.allowed_sites_json), active=c.active, end_reason=c.end_reason,
        created_at=c.created_at,
        leases=[public[lease.id] for lease in leases[c.id]])
        for c in clusters]


def leases_public(s: Session, leases: list[Lease]) -> dict[str, LeasePublic]:
    """The public view of ``leases`` (with their providers' labs, one query), by id."""
    provider_labs = dict(s.exec(
        select(Provider.id, Lab.name).join(Lab, Lab.id == Provider.lab_id)
        .where(col(Provider.id).in_({le.provider_id for le in leases if le.provider_id}))
    ).all())
    return {lease.id: LeasePublic(**lease.model_dump(), lab=provider_labs.get(lease.provider_id))
            for lease in leases}


def agent_leases(s: Session, provider_id: str, gateway: str | None = None) -> list[dict]:
    """What the agent should run (starting, running) and stop (releasing); with a
    ``gateway``, workers dial their scheduler through it (parallex:// addresses)."""
    return agent_leases_of(s, [provider_id], gateway).get(provider_id, [])


def agent_leases_of(s: Session, provider_ids: list[str],
                    gateway: str | None = None) -> dict[str, list[dict]]:
    """``agent_leases`` of several providers in one query, by provider id (a provider that
    holds nothing is absent)."""
    rows = s.exec(
        select(Lease, ClusterRecord)
        .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
        .where(col(Lease.provider_id).in_(provider_ids), col(Lease.state).in_(HELD_STATES))
    ).all()
    out: dict[str, list[dict]] = {}
    for lease, cluster in rows:
        out.setdefault(lease.provider_id, []).append({
            "id": lease.id,
            "state": lease.state.value,
            "scheduler_address": (gateway_address(gateway, cluster.id) if gateway
                                  else cluster.scheduler_address),
            "ca_cert": cluster.ca_cert,
            "cert": lease.worker_cert,
            "csr_sent": bool(lease.worker_csr),
            "cpus": lease.cpus,
            "memory": lease.memory,
            "gpus": lease.gpus,
            "gpu_indices": lease.gpu_indices,
            "environment": cluster.environment or "",
        })
    return out
