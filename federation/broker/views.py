"""What the broker shows of its records: clusters with their leases, an agent's lease list.
Reads only, a fixed number of queries whatever the number of rows."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from accounting.models import Lab, User

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

#: The lab of a lease's provider (the Lab table a second time, beside the cluster's own).
PROVIDER_LAB = aliased(Lab)


def clusters_public(s: Session, clusters: list[ClusterRecord],
                    ended_after: dt.datetime | None = None) -> list[ClusterPublic]:
    """The public view of ``clusters``: their owners, labs, leases and the labs of the
    leases' providers, in two queries (the heartbeat reads one cluster every few seconds,
    and under load each round trip waits for a core). With ``ended_after``, of the ended
    leases only those that ended since then."""
    if not clusters:
        return []
    ids = [c.id for c in clusters]
    names = {cid: (user, lab) for cid, user, lab in s.exec(
        select(ClusterRecord.id, User.name, Lab.name)
        .join(User, User.id == ClusterRecord.user_id)
        .join(Lab, Lab.id == ClusterRecord.lab_id)
        .where(col(ClusterRecord.id).in_(ids))).all()}
    # Only the columns shown, not Lease objects: a cluster heartbeat (every 5 s per cluster)
    # reads every live lease of the cluster, and building each as a Lease, then dumping it
    # whole (certificates included) into its view, was most of the request (issue 14).
    query = (select(*PUBLIC_LEASE_COLUMNS, PROVIDER_LAB.name.label("lab"))
             .outerjoin(Provider, Provider.id == Lease.provider_id)
             .outerjoin(PROVIDER_LAB, PROVIDER_LAB.id == Provider.lab_id)
             .where(col(Lease.cluster_id).in_(ids)))
    if ended_after is not None:
        query = query.where(or_(Lease.state != LeaseState.ended, Lease.ended_at >= ended_after))
    leases: dict[str, list[LeasePublic]] = {cid: [] for cid in ids}
    for row in s.exec(query.order_by(Lease.created_at, Lease.id)):
        leases[row.cluster_id].append(LeasePublic(**row._mapping))
    return [ClusterPublic(
        id=c.id, name=c.name, user=names[c.id][0], lab=names[c.id][1],
        scheduler_address=c.scheduler_address, labs=json.loads(c.allowed_labs_json),
        sites=json.loads(c.allowed_sites_json), active=c.active, end_reason=c.end_reason,
        created_at=c.created_at,
        leases=leases[c.id])
        for c in clusters]

#: The lease columns its public view shows (every field of LeasePublic but its provider's lab).
PUBLIC_LEASE_COLUMNS = tuple(getattr(Lease, name) for name in LeasePublic.model_fields
                             if name != "lab")


def leases_public(s: Session, leases: list[Lease]) -> dict[str, LeasePublic]:
    """The public view of ``leases`` (with their providers' labs, one query), by id."""
    return _published(s, [{c.key: getattr(lease, c.key) for c in PUBLIC_LEASE_COLUMNS}
                          for lease in leases])


def _published(s: Session, rows: list[dict]) -> dict[str, LeasePublic]:
    """LeasePublic of each row of PUBLIC_LEASE_COLUMNS, with its provider's lab, by id."""
    provider_labs = dict(s.exec(
        select(Provider.id, Lab.name).join(Lab, Lab.id == Provider.lab_id)
        .where(col(Provider.id).in_({r["provider_id"] for r in rows if r["provider_id"]}))
    ).all())
    return {r["id"]: LeasePublic(**r, lab=provider_labs.get(r["provider_id"])) for r in rows}


def agent_leases(s: Session, provider_id: str, gateway: str | None = None) -> list[dict]:
    """What the agent should run (starting, running) and stop (releasing); with a
    ``gateway``, workers dial their scheduler through it (parallex:// addresses)."""
    return agent_leases_of(s, [provider_id], gateway).get(provider_id, [])


def agent_leases_of(s: Session, provider_ids: list[str],
                    gateway: str | None = None) -> dict[str, list[dict]]:
    """``agent_leases`` of several providers in one query, by provider id (a provider that
    holds nothing is absent)."""
    # Columns, not ORM objects: long polls read these for many agents at once, and building
    # a Lease and a ClusterRecord per row was most of the batch's time (issue 14's profile).
    rows = s.exec(
        select(Lease.id, Lease.provider_id, Lease.state, Lease.worker_cert, Lease.worker_csr,
               Lease.cpus, Lease.memory, Lease.gpus, Lease.gpu_indices_json,
               ClusterRecord.id, ClusterRecord.scheduler_address, ClusterRecord.ca_cert,
               ClusterRecord.environment)
        .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
        .where(col(Lease.provider_id).in_(provider_ids), col(Lease.state).in_(HELD_STATES))
    ).all()
    out: dict[str, list[dict]] = {}
    for (lease_id, provider_id, state, cert, csr, cpus, memory, gpus, gpu_indices,
         cluster_id, scheduler, ca_cert, environment) in rows:
        out.setdefault(provider_id, []).append({
            "id": lease_id,
            "state": LeaseState(state).value,
            "scheduler_address": (gateway_address(gateway, cluster_id) if gateway
                                  else scheduler),
            "ca_cert": ca_cert,
            "cert": cert,
            "csr_sent": bool(csr),
            "cpus": cpus,
            "memory": memory,
            "gpus": gpus,
            "gpu_indices": json.loads(gpu_indices),
            "environment": environment or "",
        })
    return out
