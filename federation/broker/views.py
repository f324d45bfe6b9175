"""What the broker shows of its records: clusters with their leases, an agent's lease list.
Reads only, a fixed number of queries whatever the number of rows."""

from __future__ import annotations

import json

from sqlmodel import Session, col, select

from accounting.models import Lab, User, names_by_id

from ..gateway import gateway_address
from .models import (
    HELD_STATES,
    ClusterPublic,
    ClusterRecord,
    Lease,
    LeasePublic,
    Provider,
)


def clusters_public(s: Session, clusters: list[ClusterRecord]) -> list[ClusterPublic]:
    """The public view of ``clusters``: their owners, labs, leases and the labs of the
    leases' providers, one query each (the heartbeat reads one cluster every few seconds)."""
    if not clusters:
        return []
    ids = [c.id for c in clusters]
    users = names_by_id(s, User, {c.user_id for c in clusters})
    labs = names_by_id(s, Lab, {c.lab_id for c in clusters})
    leases: dict[str, list[Lease]] = {cid: [] for cid in ids}
    for lease in s.exec(select(Lease).where(col(Lease.cluster_id).in_(ids))
                        .order_by(Lease.created_at, Lease.id)):
        leases[lease.cluster_id].append(lease)
    provider_labs = dict(s.exec(
        select(Provider.id, Lab.name).join(Lab, Lab.id == Provider.lab_id)
        .where(col(Provider.id).in_({le.provider_id for group in leases.values()
                                     for le in group if le.provider_id}))).all())
    return [ClusterPublic(
        id=c.id, name=c.name, user=users[c.user_id], lab=labs[c.lab_id],
        scheduler_address=c.scheduler_address, labs=json.loads(c.allowed_labs_json),
        sites=json.loads(c.allowed_sites_json), active=c.active, end_reason=c.end_reason,
        created_at=c.created_at,
        leases=[LeasePublic(**lease.model_dump(), lab=provider_labs.get(lease.provider_id))
                for lease in leases[c.id]])
        for c in clusters]


def agent_leases(s: Session, provider_id: str, gateway: str | None = None) -> list[dict]:
    """What the agent should run (starting, running) and stop (releasing); with a
    ``gateway``, workers dial their scheduler through it (parallex:// addresses)."""
    rows = s.exec(
        select(Lease, ClusterRecord)
        .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
        .where(Lease.provider_id == provider_id, col(Lease.state).in_(HELD_STATES))
    ).all()
    return [
        {
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
        }
        for lease, cluster in rows
    ]
