"""Agents' three frequent requests (heartbeats, lease reports, lease-list long polls) served
without FastAPI's per-request machinery.

A thousand agents make ~350 of these a second, and through FastAPI each took 0.63–0.75 ms
of its replica's event loop, of which the route's own work was 0.14–0.18 ms: the rest was
routing (a scan of every route), dependency solving, validation and serialising
(benchmarks/agent_requests.py; 0.36–0.40 ms here). On two saturated cores that interpreter
time is what the tail waits for. This middleware
matches the three paths with one regular expression, authenticates with the same function
the routes' dependency uses, validates the body with the same models, calls the same route
functions, and answers with the same JSON, byte for byte, serialised by orjson: a lease list
of ten leases, each with its cluster's CA certificate, took 0.2 ms of the loop through the
standard library's encoder, against 0.01 ms.

It only takes the happy path. A request it cannot take whole (a malformed id or query, a
body that is not valid JSON of the model, another content type, a large body) goes on to
FastAPI with its body replayed, having changed nothing, so every refusal is FastAPI's own,
word for word. Errors the route raises are answered as the app's exception handlers answer
them (error_responses.py: a broker error, a value or a database the database refused or could
not answer); any other exception reaches the app's 500 handler as before.
The OpenAPI schema still describes these routes: they stay declared in routes_agent.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ..ids import LEASE_ID, OBJECT_ID
from . import routes_agent
from .auth import authenticate, require_provider
from .error_responses import known_error_response
from .metrics import BrokerMetrics
from .models import LeaseStateReport, ProviderHeartbeat

#: Bodies larger than this go to FastAPI (a heartbeat naming thousands of leases): the fast
#: path buffers a body whole before deciding.
MAX_FAST_BODY = 64 * 1024

_OBJECT_ID = re.compile(OBJECT_ID)
_LEASE_ID = re.compile(LEASE_ID)
#: What the route's ``wait`` query takes here: plain decimals (anything else goes to FastAPI).
_DECIMAL = re.compile(r"[0-9]{1,6}(\.[0-9]{1,9})?")


@dataclass(frozen=True)
class FastRoute:
    """One of the routes this path serves; ``path_format`` is its template as FastAPI's
    route has it, so the HTTP metrics label it the same (``HttpTimer`` reads it)."""

    method: str
    path_format: str


_HEARTBEAT = FastRoute("POST", "/agent/{provider_id}/heartbeat")
_REPORT = FastRoute("POST", "/agent/{provider_id}/leases/{lease_id}/state")
_LEASES = FastRoute("GET", "/agent/{provider_id}/leases")


class AgentFastPath:
    """ASGI middleware serving agents' heartbeats, lease reports and lease-list polls."""

    def __init__(self, app, prefix: str, metrics: BrokerMetrics):
        self.app = app
        self._answered = metrics.agent_fast_path.labels("answered")
        self._handed_on = metrics.agent_fast_path.labels("handed on")
        self._path = re.compile(re.escape(prefix)
                                + r"/agent/([^/]+)/(heartbeat|leases|leases/([^/]+)/state)")
        self._routes = {route: FastRoute(route.method, prefix + route.path_format)
                        for route in (_HEARTBEAT, _REPORT, _LEASES)}

    async def __call__(self, scope, receive, send):
        route, params = self._match(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        # Timed under the route's template however it is answered, as FastAPI's route is.
        scope["route"] = self._routes[route]
        body, partial, receive = await _buffered(receive)
        request = Request(scope, receive)
        try:
            call = await self._prepare(route, params, request, body, partial)
        except Exception as exc:  # authentication refused, or its read found no database
            refusal = known_error_response(scope["method"], scope["path"], exc)
            if refusal is None:
                raise
            self._answered.inc()
            await refusal(scope, receive, send)
            return
        if call is None:
            self._handed_on.inc()
            await self.app(scope, receive, send)
            return
        self._answered.inc()
        try:
            response = Response(orjson.dumps(await call()), media_type="application/json")
        except Exception as exc:
            response = known_error_response(scope["method"], scope["path"], exc)
            if response is None:
                raise
        await response(scope, receive, send)

    def _match(self, scope) -> tuple[FastRoute | None, tuple]:
        if scope["type"] != "http":
            return None, ()
        found = self._path.fullmatch(scope["path"])
        if found is None:
            return None, ()
        provider_id, tail, lease_id = found.groups()
        if not _OBJECT_ID.fullmatch(provider_id):
            return None, ()
        method = scope["method"]
        if tail == "heartbeat":
            route = _HEARTBEAT
        elif tail == "leases":
            route = _LEASES
        elif _LEASE_ID.fullmatch(lease_id):
            route = _REPORT
        else:
            return None, ()
        if method != route.method:
            return None, ()
        return route, (provider_id, lease_id)

    async def _prepare(self, route: FastRoute, params: tuple, request: Request, body: bytes,
                       partial: bool) -> Callable[[], Awaitable[dict]] | None:
        """The route's call, once everything it needs is known to be valid; None where
        FastAPI must answer (nothing was changed). Raises BrokerError when authentication
        refuses the caller. The checks come in FastAPI's order, so a request wrong in two
        ways gets the answer FastAPI gives: the body is decoded first (400 if it is not
        JSON), then the caller authenticated (401, 403), then ids, query and body validated
        (422)."""
        provider_id, lease_id = params
        data = None
        if route is _LEASES:
            query = _leases_query(request.scope["query_string"])
        elif partial or not _json_content(request):
            return None
        else:
            try:
                data = json.loads(body)
            except ValueError:
                return None
        principal = await require_provider(await authenticate(request))
        if route is _LEASES:
            if query is None:
                return None
            since, wait = query
            return lambda: routes_agent.leases(provider_id, request, since, wait, principal)
        model = ProviderHeartbeat if route is _HEARTBEAT else LeaseStateReport
        try:
            parsed = model.model_validate(data)
        except ValidationError:
            return None
        if route is _HEARTBEAT:
            return lambda: routes_agent.heartbeat(provider_id, parsed, request, principal)
        return lambda: routes_agent.report(provider_id, lease_id, parsed, request, principal)


def _leases_query(raw: bytes) -> tuple[str | None, float] | None:
    """``since`` and ``wait`` as the route's Query parameters take them, or None for
    anything unusual (FastAPI answers those)."""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    seen = dict(pairs)
    if len(seen) != len(pairs) or not set(seen) <= {"since", "wait"}:
        return None
    since = seen.get("since")
    if since is not None and len(since) > routes_agent.SINCE_MAX_LENGTH:
        return None
    wait = 0.0
    if "wait" in seen:
        if not _DECIMAL.fullmatch(seen["wait"]):  # so never negative, infinite or NaN
            return None
        wait = float(seen["wait"])
        if wait > routes_agent.WAIT_MAX:
            return None
    return since, wait


def _json_content(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == "application/json"


async def _buffered(receive):
    """The request body as far as it was read (up to ``MAX_FAST_BODY``), whether it is
    not all there or too large for the fast path, and a ``receive`` that gives what was read
    again, then the rest."""
    chunks: list[bytes] = []
    size = 0
    more = True
    last: dict | None = None
    while more and size <= MAX_FAST_BODY:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: pass it on
            last = message
            break
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            if last is not None:
                return last
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return body, more or last is not None or size > MAX_FAST_BODY, replay
