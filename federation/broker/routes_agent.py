"""Provider-agent endpoints. Agents only open outbound connections: they long-poll for work."""

from __future__ import annotations

import random

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from .agent_batches import Heartbeat
from .auth import Principal, require_provider
from .id_params import EnvironmentHashPath, LeaseIdPath, ProviderIdPath, Sha256Path
from .models import (
    LeaseStateReport,
    ProviderHeartbeat,
    ProviderRegister,
    SigningRequest,
)

router = APIRouter(prefix="/agent")

#: Fraction by which a long poll may end early, at random (spreads agents' polls apart).
POLL_JITTER = 0.25
#: Longest ``since`` (a lease-list version) a poll may send, in characters.
SINCE_MAX_LENGTH = 64
#: Longest a poll may ask to wait for a change, in seconds.
WAIT_MAX = 60


@router.post("/register", status_code=201)
def register(body: ProviderRegister, request: Request,
             principal: Principal = Depends(require_provider)) -> dict:
    broker = request.app.state.broker
    provider = broker.register_provider(principal, body)
    s = broker.settings
    return {"provider_id": provider.id, "lab": principal.lab_name,
            "heartbeat_interval": broker.agent_heartbeat_interval,
            "poll_timeout": s.poll_timeout}


@router.post("/{provider_id}/heartbeat")
async def heartbeat(provider_id: ProviderIdPath, body: ProviderHeartbeat, request: Request,
                    principal: Principal = Depends(require_provider)) -> dict:
    """The machine lives, runs ``running`` and offers (or keeps for its owner); answered
    once recorded (in a batch with other agents' heartbeats, see heartbeats.py)."""
    broker = request.app.state.broker
    pid = await _provider(broker, principal, provider_id)
    broker.check_heartbeat_rate(pid)
    await broker.provider_heartbeat(Heartbeat(pid, body.running, body.offering,
                                              body.offer_note, body.environments))
    return {"ok": True}


async def _provider(broker, principal: Principal, provider_id: str) -> str:
    """The provider's id once it is known to be the caller's lab's; from memory when seen
    before, else read in the thread pool (never on the event loop)."""
    known = broker.known_provider(principal, provider_id)
    if known is not None:
        return known
    return (await run_in_threadpool(broker.provider_for, principal, provider_id)).id


@router.post("/{provider_id}/offline")
def offline(provider_id: ProviderIdPath, request: Request,
            principal: Principal = Depends(require_provider)) -> dict:
    """The agent is shutting down: place nothing more here; end what this machine held."""
    broker = request.app.state.broker
    provider = broker.provider_for(principal, provider_id)
    return {"ended": broker.provider_offline(provider)}


@router.get("/{provider_id}/leases")
async def leases(provider_id: ProviderIdPath, request: Request,
                 since: str | None = Query(None, max_length=SINCE_MAX_LENGTH,
                                           description="Version last seen; wait for a change."),
                 wait: float = Query(0, ge=0, le=WAIT_MAX,
                                     description="Seconds to wait for a change."),
                 principal: Principal = Depends(require_provider)) -> dict:
    """The leases this provider must run or stop; long-polls up to ``wait`` seconds for a
    change the agent did not make itself (its own reports do not end the wait)."""
    broker = request.app.state.broker
    # The database calls in the thread pool: on the event loop every agent's poll held up
    # every other request (issue 14's load benchmark: registrations took seconds).
    pid = await _provider(broker, principal, provider_id)
    if wait:
        # Up to a quarter shorter at random: agents that started together (a rack after a
        # power cut, a broker restart) would otherwise all come back at the same instant
        # every poll, and each wave queued heartbeats for seconds (issue 14's load test).
        wait *= 1 - POLL_JITTER * random.random()
        await broker.wakeups.wait_for_change(pid, since, wait)
    version = broker.wakeups.version(pid)
    return {"version": version, "leases": await broker.read_provider_leases(pid)}


@router.post("/{provider_id}/leases/{lease_id}/state")
async def report(provider_id: ProviderIdPath, lease_id: LeaseIdPath, body: LeaseStateReport,
                 request: Request, principal: Principal = Depends(require_provider)) -> dict:
    broker = request.app.state.broker
    pid = await _provider(broker, principal, provider_id)
    # Recorded in a batch with the other reports that arrive meanwhile (agent_batches.py),
    # answered once committed, not after the lease's charge: that is booked in a batch with
    # other ends (or by the leader's next metering pass). Waiting for it made agents'
    # reports wait for the periodic pass's hold on the labs' balances (seconds under issue
    # 14's load), and an agent has no use for it.
    done = await broker.report_lease_state(pid, lease_id, body)
    return {"id": done.lease_id, "state": done.state.value,
            "end_reason": done.end_reason.value if done.end_reason else None}


@router.post("/{provider_id}/leases/{lease_id}/csr", status_code=202)
def signing_request(provider_id: ProviderIdPath, lease_id: LeaseIdPath, body: SigningRequest,
                    request: Request,
                    principal: Principal = Depends(require_provider)) -> dict:
    """The agent's certificate signing request for a starting lease's worker key; the lease's
    cluster signs it and the certificate appears in the agent's lease list."""
    broker = request.app.state.broker
    provider = broker.provider_for(principal, provider_id)
    broker.submit_signing_request(provider, lease_id, body.csr)
    return {"id": lease_id, "waiting_for": "the cluster's signature"}


@router.get("/{provider_id}/environments/{digest}")
def environment(provider_id: ProviderIdPath, digest: EnvironmentHashPath, request: Request,
                principal: Principal = Depends(require_provider)) -> dict:
    """The software environment a lease of this provider needs (what its agent builds)."""
    broker = request.app.state.broker
    provider = broker.provider_for(principal, provider_id)
    return broker.environment_for_agent(provider, digest)


@router.get("/{provider_id}/environments/{digest}/wheels/{sha256}",
            response_class=Response, responses={200: {"content": {
                "application/octet-stream": {}}}})
def wheel(provider_id: ProviderIdPath, digest: EnvironmentHashPath, sha256: Sha256Path,
          request: Request, principal: Principal = Depends(require_provider)) -> Response:
    """A wheel the environment ships (a user's local or editable package)."""
    broker = request.app.state.broker
    provider = broker.provider_for(principal, provider_id)
    row = broker.wheel_for_agent(provider, digest, sha256)
    return Response(row.data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{row.filename}"'})
