"""A cluster's Dask dashboard, served by the broker at the cluster's dashboard link.

For users whose notebook server cannot proxy the dashboard (no jupyter-server-proxy, a kernel
outside JupyterHub's servers): the scheduler runs in the hub's network, which the broker's
host reaches and the user's browser does not. The link is a capability, like a Jupyter
server's token: ``/api/v1/clusters/<id>/dashboard/<secret>/``, told only to the cluster's
owner when the cluster is made, kept only as a hash, dead once the cluster ends. The path
holds the secret, not a query or a header, because the dashboard's pages link to each other
relatively and open their websockets relative to the page.

Only GET and HEAD (the dashboard reads) and websockets (Bokeh's live plots) pass; the target
is always the cluster's own scheduler host (inside --scheduler-networks) and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

import httpx
from fastapi import APIRouter, Path, Request, WebSocket
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from .errors import NotFound, Unavailable
from .id_params import ClusterIdPath

logger = logging.getLogger("parallex.broker.dashboards")
router = APIRouter(prefix="/clusters")

#: Headers that belong to one hop, not to the page (RFC 9110 §7.6.1), plus those the proxy
#: recomputes.
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "transfer-encoding", "upgrade", "host", "content-length",
               "content-encoding", "authorization", "cookie"}
#: The secret in a dashboard link: secrets.token_urlsafe(32) makes 43 of these characters.
DashboardKey = Annotated[str, Path(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
#: Seconds the dashboard may take to answer one request.
UPSTREAM_TIMEOUT = 30.0


def _prefix(request: Request | WebSocket, cluster_id: str, key: str) -> str:
    """The link's path as the browser sees it (under the hub's service prefix too)."""
    path = request.url.path
    marker = f"/clusters/{cluster_id}/dashboard/{key}/"
    return path[:path.index(marker) + len(marker)]


@router.api_route("/{cluster_id}/dashboard/{key}/{path:path}", methods=["GET", "HEAD"],
                  include_in_schema=False)
async def dashboard_page(cluster_id: ClusterIdPath, key: DashboardKey, path: str,
                         request: Request) -> Response:
    broker = request.app.state.broker
    target = await run_in_threadpool(broker.dashboard_target, cluster_id, key)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    try:
        async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT) as client:
            upstream = await client.request(request.method, f"http://{target}/{path}",
                                            params=request.query_params, headers=headers)
    except httpx.HTTPError as exc:
        raise Unavailable("dashboard-unreachable",
                          f"the cluster's dashboard does not answer ({type(exc).__name__}); "
                          "its scheduler may be stopping") from None
    out = Response(upstream.content, status_code=upstream.status_code)
    prefix = _prefix(request, cluster_id, key)
    for name, value in upstream.headers.multi_items():
        if name.lower() in HOP_HEADERS:
            continue
        if name.lower() == "location" and value.startswith("/"):
            # The dashboard redirects to its own absolute paths ("/status"); keep the browser
            # under the link.
            value = prefix + value.lstrip("/")
        out.headers.append(name, value)
    return out


@router.websocket("/{cluster_id}/dashboard/{key}/{path:path}")
async def dashboard_socket(websocket: WebSocket, cluster_id: ClusterIdPath, key: DashboardKey,
                           path: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    broker = websocket.app.state.broker
    try:
        target = await run_in_threadpool(broker.dashboard_target, cluster_id, key)
    except NotFound:
        await websocket.close(code=4404, reason="no dashboard at this link")
        return
    query = websocket.url.query
    url = f"ws://{target}/{path}" + (f"?{query}" if query else "")
    offered = websocket.scope.get("subprotocols") or []
    try:
        upstream = await connect(url, subprotocols=offered or None, max_size=None,
                                 open_timeout=UPSTREAM_TIMEOUT)
    except (OSError, TimeoutError, ConnectionClosed) as exc:
        logger.info("dashboard websocket of %s not opened: %s", cluster_id, exc)
        await websocket.close(code=1011, reason="the cluster's dashboard does not answer")
        return
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(upstream.close)
        await websocket.accept(subprotocol=upstream.subprotocol)

        async def to_browser() -> None:
            async for message in upstream:
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_text(message)

        async def to_dashboard() -> None:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await upstream.send(message["bytes"])
                elif message.get("text") is not None:
                    await upstream.send(message["text"])

        tasks = {asyncio.create_task(to_browser()), asyncio.create_task(to_dashboard())}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            with contextlib.suppress(ConnectionClosed, WebSocketDisconnect, RuntimeError):
                task.result()
        with contextlib.suppress(RuntimeError):
            await websocket.close()
