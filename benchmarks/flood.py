"""flood: how much one token's flood slows everyone else, against the same broker unflooded.

A broker on SQLite; a lab's provider token floods it from 50 connections with lease-list polls
as fast as it is answered (almost all answered 429 by the rate limiter), while another lab's
user calls ``/whoami`` one request at a time. The same user's calls on the quiet broker, just
before, are the peer. Prints both medians and p90s and the ratio flooded/quiet.

The rate limiter's test (tests/federation/test_rate_limits.py) checks what a flood gets and
that others are still served; how fast they are served is measured here.

Run: python -m benchmarks.flood [--requests 1000] [--flooders 50]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import table, write
from tests.utils.flood import Flood
from tests.utils.procs import start_broker, wait_until

TARGET = 2.0


def whoami_latencies(url: str, token: str, requests: int) -> list[float]:
    """Seconds per ``/whoami`` of one client making them one after another."""
    latencies = []
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        client.get("/whoami").raise_for_status()  # the connection and the token's cache
        for _ in range(requests):
            start = time.perf_counter()
            client.get("/whoami").raise_for_status()
            latencies.append(time.perf_counter() - start)
    return latencies


def tokens(url: str, admin: str) -> tuple[str, str, str]:
    """The flooding lab's provider token and machine, and the other lab's user token."""
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {admin}"}) as client:
        for lab in ("lab-a", "lab-b"):
            client.post("/labs", json={"name": lab}).raise_for_status()
        client.put("/labs/lab-b/members/bob", json={"role": "member"}).raise_for_status()
        provider = client.post("/tokens", json={"kind": "provider", "lab": "lab-a"})
        user = client.post("/tokens", json={"kind": "user", "lab": "lab-b", "user": "bob"})
        provider_token = provider.raise_for_status().json()["token"]
        user_token = user.raise_for_status().json()["token"]
    machine = httpx.post(f"{url}/api/v1/agent/register", timeout=30,
                         headers={"Authorization": f"Bearer {provider_token}"},
                         json={"name": "flooder", "cpus": 1, "memory": "1 GiB"})
    return provider_token, machine.raise_for_status().json()["provider_id"], user_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000,
                        help="/whoami calls measured each way (default 1000)")
    parser.add_argument("--flooders", type=int, default=50,
                        help="connections the flooding token uses at once (default 50)")
    args = parser.parse_args()
    admin = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        broker, url = start_broker(Path(tmp), admin)
        try:
            flooder_token, provider_id, user_token = tokens(url, admin)
            quiet = whoami_latencies(url, user_token, args.requests)
            with Flood(url, flooder_token, provider_id, args.flooders) as flood:
                statuses = flood.statuses
                wait_until(lambda: statuses.get(429, 0) >= 100, 30, "the flood to be refused")
                flooded = whoami_latencies(url, user_token, args.requests)
        finally:
            broker.stop()

    def row(label: str, samples: list[float]) -> tuple[str, ...]:
        ms = sorted(s * 1000 for s in samples)
        return (label, f"{statistics.median(ms):.2f}", f"{ms[int(0.9 * len(ms))]:.2f}",
                f"{ms[-1]:.2f}")

    print(table([("/whoami of another lab's user", "median ms", "p90 ms", "max ms"),
                 row("quiet broker", quiet), row("during the flood", flooded)]))
    ratio = statistics.median(flooded) / statistics.median(quiet)
    print(f"flood answered: {dict(sorted(statuses.items()))}")
    print(f"ratio flooded/quiet (median): {ratio:.2f} (target ≤ {TARGET:g})")
    path = write("flood", {"args": vars(args), "quiet_ms": [s * 1000 for s in quiet],
                           "flooded_ms": [s * 1000 for s in flooded],
                           "flood_statuses": statuses, "ratio": ratio,
                           "target": f"<= {TARGET:g}"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
