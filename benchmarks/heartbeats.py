"""heartbeats: one broker replica on PostgreSQL answering only agents' heartbeats, with or
without their long polls outstanding — the broker's floor under issue 14's load benchmark.

Simulated agents (--agents, default 200, in 20 labs) register, then heartbeat every 5 s for
--seconds (default 25); with --polls each also keeps a long poll open (20 s), as real agents
do. Reports heartbeat p50/p99 as the clients saw them and inside the broker (its histogram).

Run: python -m benchmarks.heartbeats [--agents 200] [--polls] [--seconds 25]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import ssl
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import write
from benchmarks.load import LABS, scrape, server_quantiles, setup
from tests.utils.postgres import fresh_database, postgres_server
from tests.utils.procs import start_broker

HEARTBEAT = 5.0
POLL = 20
#: One TLS context for every client: httpx builds one per client otherwise (loading the CA
#: store each time), which a few hundred clients pay at start-up.
SHARED_TLS = ssl.create_default_context()


async def run(url: str, admin: str, agents: int, polls: bool, seconds: float) -> list[float]:
    tokens, _users = await setup(url, admin, users=0)
    clients = [httpx.AsyncClient(base_url=f"{url}/api/v1", timeout=60, verify=SHARED_TLS,
                                 headers={"Authorization": f"Bearer {tokens[i % LABS]}"})
               for i in range(agents)]
    ids = []
    for i, client in enumerate(clients):
        answer = await client.post("/agent/register", json={
            "name": f"m{i}", "cpus": 16, "memory": 2**36, "gpus": []})
        ids.append(answer.raise_for_status().json()["provider_id"])
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def heartbeat(i: int) -> None:
        await asyncio.sleep(random.random() * HEARTBEAT)
        while time.monotonic() < end:
            start = time.perf_counter()
            (await clients[i].post(f"/agent/{ids[i]}/heartbeat",
                                   json={"running": []})).raise_for_status()
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(HEARTBEAT)

    async def poll(i: int) -> None:
        version = ""
        while time.monotonic() < end:
            answer = await clients[i].get(f"/agent/{ids[i]}/leases",
                                          params={"since": version, "wait": POLL})
            version = answer.raise_for_status().json()["version"]

    work = [heartbeat(i) for i in range(agents)]
    if polls:
        work += [poll(i) for i in range(agents)]
    await asyncio.gather(*work)
    for client in clients:
        await client.aclose()
    return sorted(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=200, help="Simulated agents (200).")
    parser.add_argument("--polls", action="store_true", help="Keep long polls open too.")
    parser.add_argument("--seconds", type=float, default=25, help="Run time (25).")
    args = parser.parse_args()
    admin = secrets.token_hex(24)
    with tempfile.TemporaryDirectory() as tmp, postgres_server() as server:
        proc, url = start_broker(Path(tmp), admin, db_url=fresh_database(server, "beats"),
                                 extra=("--rate-burst", "1000"))
        try:
            seen = asyncio.run(run(url, admin, args.agents, args.polls, args.seconds))
            inside = server_quantiles(scrape([url], admin))["POST /agent/{provider_id}/heartbeat"]
        finally:
            proc.stop()
    p50, p99 = seen[len(seen) // 2], seen[int(len(seen) * 0.99)]
    print(f"{len(seen)} heartbeats from {args.agents} agents"
          f"{' with long polls' if args.polls else ''}: p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms (inside the broker p50 ≤ {inside[1] * 1000:g} ms, "
          f"p99 ≤ {inside[2] * 1000:g} ms)")
    name = "heartbeats_polls" if args.polls else "heartbeats"
    result = {"args": vars(args), "p50_ms": p50 * 1000, "p99_ms": p99 * 1000,
              "inside_p50_ms_at_most": inside[1] * 1000,
              "inside_p99_ms_at_most": inside[2] * 1000}
    print(f"wrote {write(name, result)}")


if __name__ == "__main__":
    main()
