"""What the broker shows of its records: clusters with their leases, an agent's lease list.
Reads only, a fixed number of queries whatever the number of rows."""

from __future__ import annotations

import datetime as dt
import json

import orjson
from sqlalchemy import Row, bindparam, or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from accounting.models import Lab, User

from ..gateway import gateway_address
from .models import (
    HELD_STATES,
    NOT_ENDED,
    ClusterPublic,
    ClusterRecord,
    Lease,
    LeasePublic,
    LeaseState,
    Provider,
)

#: The lab of a lease's provider (the Lab table a second time, beside the cluster's own).
PROVIDER_LAB = aliased(Lab)


#: The lease columns its public view shows (every field of LeasePublic but its provider's lab).
PUBLIC_LEASE_COLUMNS = tuple(getattr(Lease, name) for name in LeasePublic.model_fields
                             if name != "lab")

#: What a cluster's public view shows of its own row, with its owner's and lab's names, and
#: what checking its caller's access needs (``user_id``).
CLUSTER_HEAD = (ClusterRecord.id, ClusterRecord.name, ClusterRecord.user_id,
                ClusterRecord.scheduler_address, ClusterRecord.allowed_labs_json,
                ClusterRecord.allowed_sites_json, ClusterRecord.active,
                ClusterRecord.end_reason, ClusterRecord.created_at,
                User.name.label("user"), Lab.name.label("lab"))

# The statements a cluster heartbeat runs, built once: building a statement and its cache key
# anew at each execution was a fifth of the heartbeat's interpreter time (issue 14).
_HEADS = (select(*CLUSTER_HEAD)
          .join(User, User.id == ClusterRecord.user_id)
          .join(Lab, Lab.id == ClusterRecord.lab_id))
_HEAD_OF = _HEADS.where(ClusterRecord.id == bindparam("cluster_id"))
_LEASES_OF = (select(*PUBLIC_LEASE_COLUMNS, PROVIDER_LAB.name.label("lab"))
              .outerjoin(Provider, Provider.id == Lease.provider_id)
              .outerjoin(PROVIDER_LAB, PROVIDER_LAB.id == Provider.lab_id)
              .where(col(Lease.cluster_id).in_(bindparam("cluster_ids", expanding=True)))
              .order_by(Lease.created_at, Lease.id))
# Not ended, or ended since: the end time's two ranges in the (cluster, end) index.
_LIVE_LEASES_OF = _LEASES_OF.where(or_(NOT_ENDED, Lease.ended_at >= bindparam("ended_after")))


def cluster_heads(s: Session, *where, newest: int) -> list[Row]:
    """The rows (``CLUSTER_HEAD``) of the ``newest`` most recent clusters matching
    ``where``, oldest first, in one query (the (created_at, id) index's order): columns, not
    ClusterRecord objects (the heartbeat reads one every few seconds per cluster, and
    loading the record, certificate and all, was a sixth of its time; issue 14)."""
    rows = s.execute(_HEADS.where(*where).order_by(col(ClusterRecord.created_at).desc(),
                                                   col(ClusterRecord.id).desc())
                     .limit(newest)).all()
    return list(reversed(rows))


def cluster_head(s: Session, cluster_id: str) -> Row | None:
    """The row (``CLUSTER_HEAD``) of one cluster, or None. Read on the session's connection,
    so its pending changes are not flushed first: flush them before, if any."""
    return s.connection().execute(_HEAD_OF, {"cluster_id": cluster_id}).first()


def _lease_rows(s: Session, ids: list[str],
                ended_after: dt.datetime | None) -> dict[str, list[dict]]:
    """The public columns of the leases of the clusters ``ids`` (with their providers'
    labs), as dicts by cluster id, in one query."""
    # Only the columns shown, not Lease objects: a cluster heartbeat (every 5 s per cluster)
    # reads every live lease of the cluster, and building each as a Lease, then dumping it
    # whole (certificates included) into its view, was most of the request (issue 14). On
    # the connection, not through the ORM session: its result machinery for plain columns
    # cost as much again as the rows' own types. Pending changes of the session are not
    # flushed first.
    conn = s.connection()
    if ended_after is None:
        rows = conn.execute(_LEASES_OF, {"cluster_ids": ids})
    else:
        rows = conn.execute(_LIVE_LEASES_OF, {"cluster_ids": ids, "ended_after": ended_after})
    keys = list(rows.keys())
    leases: dict[str, list[dict]] = {cid: [] for cid in ids}
    for row in rows.all():  # iterating the result fetched row by row, 3 times the time
        lease = dict(zip(keys, row, strict=True))
        leases[lease["cluster_id"]].append(lease)
    return leases


def clusters_public(s: Session, heads: list[Row],
                    ended_after: dt.datetime | None = None) -> list[ClusterPublic]:
    """The public view of the clusters whose ``heads`` are given: their leases with the labs
    of the leases' providers, in one more query (under load each round trip waits for a
    core). With ``ended_after``, of the ended leases only those that ended since then."""
    if not heads:
        return []
    leases = _lease_rows(s, [c.id for c in heads], ended_after)
    return [ClusterPublic(**_head_fields(c),
                          leases=[LeasePublic(**lease) for lease in leases[c.id]])
            for c in heads]


def cluster_public_json(s: Session, head: Row, ended_after: dt.datetime | None = None
                        ) -> tuple[bytes, set[str]]:
    """``clusters_public`` of one cluster as its JSON, byte for byte what pydantic writes
    for it, and the ids of its starting leases. For the cluster heartbeat: every 5 s per
    cluster with all its leases, the heaviest of the frequent requests; the view's models
    built and dumped took twice the CPU of this dump of the rows (2.0-2.4 against 4.8 ms for
    100 leases; issue 14). ``test_cluster_heartbeat_answer_is_the_cluster_view`` holds the
    two equal."""
    leases = _lease_rows(s, [head.id], ended_after)[head.id]
    view = {**_head_fields(head),
            "leases": [{name: lease[name] for name in LEASE_FIELDS} for lease in leases],
            "gateway_internal": None, "dashboard_path": None}
    starting = {lease["id"] for lease in leases if lease["state"] == LeaseState.starting}
    # OPT_UTC_Z: aware UTC times end in "Z", as pydantic writes them.
    return orjson.dumps(view, option=orjson.OPT_UTC_Z), starting


#: The fields of a lease's public view, in its JSON's order.
LEASE_FIELDS = tuple(LeasePublic.model_fields)


def _head_fields(c: Row) -> dict:
    """The fields of a cluster's public view taken from its head row, in the view's order."""
    return {"id": c.id, "name": c.name, "user": c.user, "lab": c.lab,
            "scheduler_address": c.scheduler_address,
            "labs": json.loads(c.allowed_labs_json), "sites": json.loads(c.allowed_sites_json),
            "active": c.active, "end_reason": c.end_reason, "created_at": c.created_at}


def leases_public(s: Session, leases: list[Lease]) -> dict[str, LeasePublic]:
    """The public view of ``leases`` (with their providers' labs, one query), by id."""
    return _published(s, [{c.key: getattr(lease, c.key) for c in PUBLIC_LEASE_COLUMNS}
                          for lease in leases])


def _published(s: Session, rows: list[dict]) -> dict[str, LeasePublic]:
    """LeasePublic of each row of PUBLIC_LEASE_COLUMNS, with its provider's lab, by id."""
    placed = {r["provider_id"] for r in rows if r["provider_id"]}
    # None placed (a scale request's leases before their pass): no query to run.
    provider_labs = dict(s.exec(
        select(Provider.id, Lab.name).join(Lab, Lab.id == Provider.lab_id)
        .where(col(Provider.id).in_(placed))).all()) if placed else {}
    return {r["id"]: LeasePublic(**r, lab=provider_labs.get(r["provider_id"])) for r in rows}


_AGENT_LEASES_OF = (
    select(Lease.id, Lease.provider_id, Lease.state, Lease.worker_cert, Lease.worker_csr,
           Lease.cpus, Lease.memory, Lease.gpus, Lease.gpu_indices_json,
           ClusterRecord.id, ClusterRecord.scheduler_address, ClusterRecord.ca_cert,
           ClusterRecord.environment)
    .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
    .where(col(Lease.provider_id).in_(bindparam("provider_ids", expanding=True)),
           NOT_ENDED, col(Lease.state).in_(HELD_STATES)))


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
    # On the session's connection, as the cluster view's rows. Pending changes of the session
    # are not flushed first.
    rows = s.connection().execute(_AGENT_LEASES_OF, {"provider_ids": provider_ids}).all()
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
