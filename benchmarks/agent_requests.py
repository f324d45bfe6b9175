"""agent_requests: a replica's interpreter time per agent request, on the agents' fast path
against FastAPI's full path (the peer), in the same app and run.

The broker app runs in this process on SQLite (a lab, a provider with two leases running);
requests are handed to the ASGI app directly, one at a time, so only the app's own work is
counted (no HTTP parsing, no network). Three ways for each request:

- ``fast path``: the request as agents send it (``agent_fast_path.py`` answers it);
- ``FastAPI``: the same request in a form the fast path hands on unchanged (a heartbeat's
  body typed ``application/vnd.parallex+json``, which FastAPI reads as JSON; a poll with an
  extra query parameter), so FastAPI's routing, dependencies and serialising answer it;
- ``route only``: the same route function called directly with its arguments ready, the
  floor both share (the heartbeat's batch, the lease list's read).

Reports the CPU per request of the event loop's thread (where the framework runs and what
delays every other request; the batches' database work runs on threads of their own) and of
the whole process, medians of --rounds alternations of --requests each, and the ratios fast
path / FastAPI. Checks that the fast path answered and handed on what it should (the
broker's counter).

Run: python -m benchmarks.agent_requests [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from starlette.requests import Request

from benchmarks.common import table, write
from federation.broker import routes_agent
from federation.broker.auth import hash_token
from federation.broker.models import ProviderHeartbeat
from tests.utils.in_process import in_process_broker


class AsgiCall:
    """One request handed to the ASGI app as uvicorn would hand it."""

    def __init__(self, app, method: str, path: str, token: str, body: bytes = b"",
                 content_type: str = "application/json", query: str = ""):
        self.app = app
        headers = [(b"host", b"broker"), (b"authorization", f"Bearer {token}".encode())]
        if body:
            headers += [(b"content-type", content_type.encode()),
                        (b"content-length", str(len(body)).encode())]
        self.scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                      "method": method, "scheme": "http", "path": path,
                      "raw_path": path.encode(), "query_string": query.encode(),
                      "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
                      "server": ("127.0.0.1", 2)}
        self.body = body

    async def __call__(self) -> None:
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            await asyncio.Event().wait()  # the client never goes away

        statuses = []

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await self.app(dict(self.scope, state={}), receive, send)
        if statuses != [200]:
            raise RuntimeError(f"{self.scope['method']} {self.scope['path']}: {statuses}")


async def cpu_per_request(call, n: int) -> tuple[float, float]:
    """CPU seconds per ``await call()`` over ``n`` calls one after another: of the event
    loop's thread (where the framework runs; the batches' database work runs on their own
    threads), and of the whole process."""
    for _ in range(20):  # caches, pools and batches warm
        await call()
    loop, whole = time.thread_time(), time.process_time()
    for _ in range(n):
        await call()
    return (time.thread_time() - loop) / n, (time.process_time() - whole) / n


def counted(app) -> dict[str, float]:
    """The broker's count of agents' requests by how it took them."""
    registry = app.state.broker.metrics.registry
    return {outcome: registry.get_sample_value("parallex_agent_fast_path_total",
                                               {"outcome": outcome}) or 0.0
            for outcome in ("answered", "handed on")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per way and round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternations of the three ways (default 5)")
    args = parser.parse_args()

    db = f"sqlite:///{Path(tempfile.mkdtemp(prefix='parallex-bench-')) / 'broker.db'}"
    with in_process_broker(db, 2, rate_limit=1e9, rate_burst=1e9) as b:
        app, portal = b.app, b.client.portal
        principal = app.state.principals.get(hash_token(b.agent))
        assert principal is not None  # the setup's requests cached it
        beat = {"running": b.ids, "offering": True}
        body = json.dumps(beat).encode()
        heartbeat_path = f"/api/v1/agent/{b.box}/heartbeat"
        leases_path = f"/api/v1/agent/{b.box}/leases"

        request = Request({"type": "http", "app": app, "headers": [], "method": "POST",
                           "path": heartbeat_path})

        parsed = ProviderHeartbeat.model_validate(beat)

        async def heartbeat_route():
            await routes_agent.heartbeat(b.box, parsed, request, principal)

        async def leases_route():
            await routes_agent.leases(b.box, request, None, 0.0, principal)

        ways = {
            "heartbeat": {
                "fast path": AsgiCall(app, "POST", heartbeat_path, b.agent, body),
                "FastAPI": AsgiCall(app, "POST", heartbeat_path, b.agent, body,
                                    content_type="application/vnd.parallex+json"),
                "route only": heartbeat_route,
            },
            "lease-list poll": {
                "fast path": AsgiCall(app, "GET", leases_path, b.agent, query="wait=0"),
                "FastAPI": AsgiCall(app, "GET", leases_path, b.agent,
                                    query="wait=0&via=fastapi"),
                "route only": leases_route,
            },
        }
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        before = counted(app)
        for _ in range(args.rounds):
            for kind, calls in ways.items():
                for way, call in calls.items():
                    samples.setdefault((kind, way), []).append(
                        portal.call(cpu_per_request, call, args.requests))
        after = counted(app)

    per_way = 2 * (args.requests + 20) * args.rounds  # two kinds of request each
    answered = after["answered"] - before["answered"]
    handed_on = after["handed on"] - before["handed on"]
    assert answered == per_way and handed_on == per_way, (answered, handed_on)

    rows = [("request", "way", "event loop ms", "whole process ms")]
    result: dict = {"args": vars(args), "ms_per_request": {}, "ratios": {}}
    for kind in ways:
        for way in ways[kind]:
            loop_ms = statistics.median(v[0] for v in samples[(kind, way)]) * 1e3
            whole_ms = statistics.median(v[1] for v in samples[(kind, way)]) * 1e3
            rows.append((kind, way, f"{loop_ms:.3f}", f"{whole_ms:.3f}"))
            result["ms_per_request"].setdefault(kind, {})[way] = {
                "event_loop": loop_ms, "whole_process": whole_ms,
                "rounds": [[a * 1e3, c * 1e3] for a, c in samples[(kind, way)]]}
        fast = result["ms_per_request"][kind]["fast path"]
        full = result["ms_per_request"][kind]["FastAPI"]
        result["ratios"][kind] = {part: fast[part] / full[part]
                                  for part in ("event_loop", "whole_process")}
    print(table(rows))
    for kind, ratio in result["ratios"].items():
        print(f"{kind}: fast path / FastAPI {ratio['event_loop']:.2f} of the event loop's "
              f"CPU, {ratio['whole_process']:.2f} of the process's")
    print(f"wrote {write('agent_requests', result)}")


if __name__ == "__main__":
    main()
