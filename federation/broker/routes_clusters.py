"""User endpoints: register a cluster, ask for and release leases, heartbeat, close."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from accounting.models import utcnow

from . import API_PREFIX
from .auth import Principal, require_user
from .costs import cluster_cost
from .id_params import ClusterIdPath
from .models import (
    ClusterCreate,
    ClusterEnvironment,
    ClusterHeartbeat,
    ClusterPublic,
    LeaseCreate,
    LeasePublic,
    LeaseRelease,
    WorkerCertificates,
)
from .service import CLUSTERS_LISTED, PLACEMENT_WAIT

router = APIRouter(prefix="/clusters")


@router.post("", status_code=201, response_model=ClusterPublic)
def create(body: ClusterCreate, request: Request,
           principal: Principal = Depends(require_user)) -> ClusterPublic:
    broker = request.app.state.broker
    cluster, key = broker.create_cluster(principal, body)
    public = broker.cluster_public(cluster.id)
    if key:
        public.dashboard_path = f"{API_PREFIX}/clusters/{cluster.id}/dashboard/{key}/"
    return public


@router.get("", response_model=list[ClusterPublic])
def list_clusters(request: Request,
                  all: bool = Query(False, description="Closed clusters too."),
                  limit: int = Query(CLUSTERS_LISTED, ge=1, le=1000,
                                     description="At most this many, the newest (listed "
                                                 "oldest first)."),
                  principal: Principal = Depends(require_user)) -> list[ClusterPublic]:
    """Your clusters (every cluster for an administrator), open ones unless ``all``. Each
    with its leases not ended and those that ended in the last 10 minutes; every ended
    lease has a job record (``GET /usage/records``)."""
    return request.app.state.broker.list_clusters(principal, active_only=not all, limit=limit)


@router.get("/{cluster_id}", response_model=ClusterPublic)
def read(cluster_id: ClusterIdPath, request: Request,
         principal: Principal = Depends(require_user)) -> ClusterPublic:
    """One cluster, with its leases not ended and those that ended in the last 10 minutes."""
    broker = request.app.state.broker
    return broker.cluster_public(broker.cluster_for(principal, cluster_id).id)


@router.get("/{cluster_id}/cost")
def cost(cluster_id: ClusterIdPath, request: Request,
         principal: Principal = Depends(require_user)) -> dict:
    """PCU the cluster has cost its lab so far and costs per hour now (own-lab machines are
    free; ``list_pcu_per_hour`` is the rate before that)."""
    broker = request.app.state.broker
    cluster = broker.cluster_for(principal, cluster_id)
    with broker.session() as s:
        return cluster_cost(s, cluster, now=utcnow(), cloud=broker.settings.cloud_prices)


@router.post("/{cluster_id}/heartbeat", response_model=ClusterPublic)
def heartbeat(cluster_id: ClusterIdPath, request: Request,
              body: ClusterHeartbeat | None = None,
              principal: Principal = Depends(require_user)) -> Response:
    """The cluster lives; ``connected`` lists the leases whose workers joined its scheduler,
    which makes them running (metered) from now."""
    broker = request.app.state.broker
    # Its JSON as the broker wrote it from the rows, not through response_model: FastAPI
    # dumps the view, validates the dump and dumps it again, 1.4 against 0.16 ms for a
    # cluster of 100 leases, every 5 s for every cluster (issue 14). The schema still says
    # ClusterPublic.
    view = broker.cluster_heartbeat(principal, cluster_id, body.connected if body else None)
    return Response(view, media_type="application/json")


@router.post("/{cluster_id}/leases", status_code=201, response_model=list[LeasePublic])
async def request_leases(cluster_id: ClusterIdPath, body: LeaseCreate, request: Request,
                         wait: float = Query(PLACEMENT_WAIT, ge=0, le=PLACEMENT_WAIT,
                                             description="Seconds (at most 5, the default) "
                                                         "to wait for the placement pass "
                                                         "after the request, so the answer "
                                                         "says where the leases went or why "
                                                         "they wait. 0 answers once they "
                                                         "are admitted, pending; the pass "
                                                         "still comes, and the cluster's "
                                                         "heartbeat answers say where they "
                                                         "went."),
                         principal: Principal = Depends(require_user)) -> list[LeasePublic]:
    """Ask for leases: refused at once (4xx) when no machine could ever host one, the
    cluster's environment cannot be served, or the lab lacks the credit or quota; else
    created pending and placed by the next pass."""
    broker = request.app.state.broker

    def admit() -> list[LeasePublic]:
        return broker.request_leases(broker.cluster_for(principal, cluster_id), body)

    # Few trips to a pool thread: under load each waits its turn for a thread and for the
    # interpreter (issue 14).
    admitted = await run_in_threadpool(admit)
    if not wait:
        # The lease keeper's: under issue 14's load the wait for the pass was most of a
        # scale request's time. The leases as admitted, pending.
        return admitted
    # The placement pass after the insert, waited for on the event loop (no pool thread).
    with broker.metrics.scale_placement_wait.time():
        await broker.placer.wait_async(broker.placer.last_ticket, wait)
    # Only the new leases are read back (the cluster's others, ended ones included, may be
    # thousands).
    return await run_in_threadpool(broker.new_leases_public, [le.id for le in admitted])


@router.post("/{cluster_id}/leases/release")
def release(cluster_id: ClusterIdPath, body: LeaseRelease, request: Request,
            principal: Principal = Depends(require_user)) -> dict:
    broker = request.app.state.broker
    cluster = broker.cluster_for(principal, cluster_id)
    broker.release_leases(cluster, body.lease_ids)
    return {"released": body.lease_ids}


@router.delete("/{cluster_id}", response_model=ClusterPublic)
def close(cluster_id: ClusterIdPath, request: Request,
          principal: Principal = Depends(require_user)) -> ClusterPublic:
    broker = request.app.state.broker
    cluster = broker.cluster_for(principal, cluster_id)
    broker.close_cluster(cluster.id, reason="closed")
    return broker.cluster_public(cluster.id)


@router.get("/{cluster_id}/signing-requests")
async def signing_requests(cluster_id: ClusterIdPath, request: Request,
                           since: str | None = Query(None, max_length=64,
                                                     description="Version last seen; wait "
                                                                 "for a change."),
                           wait: float = Query(0, ge=0, le=60,
                                               description="Seconds to wait for a change."),
                           principal: Principal = Depends(require_user)) -> dict:
    """Agents' signing requests for this cluster's starting leases; long-polls up to
    ``wait`` seconds for new ones."""
    broker = request.app.state.broker
    cluster = await run_in_threadpool(broker.cluster_for, principal, cluster_id)
    key = f"cluster:{cluster.id}"
    if wait:
        await broker.wakeups.wait_for_change(key, since, wait)
    version = broker.wakeups.version(key)
    found = await run_in_threadpool(broker.signing_requests, cluster)
    return {"version": version, "requests": found}


@router.post("/{cluster_id}/certificates")
def certificates(cluster_id: ClusterIdPath, body: WorkerCertificates, request: Request,
                 principal: Principal = Depends(require_user)) -> dict:
    """Worker certificates the cluster signed for its leases' signing requests."""
    broker = request.app.state.broker
    cluster = broker.cluster_for(principal, cluster_id)
    return {"accepted": broker.submit_certificates(cluster, body.certificates)}


@router.post("/{cluster_id}/environment")
def set_environment(cluster_id: ClusterIdPath, body: ClusterEnvironment, request: Request,
                    principal: Principal = Depends(require_user)) -> dict:
    """The cluster's software environment changed (POST /environments first): leases placed
    from now on get the new one."""
    broker = request.app.state.broker
    cluster = broker.cluster_for(principal, cluster_id)
    broker.set_cluster_environment(cluster, body.environment)
    return {"id": cluster.id, "environment": body.environment}
