"""flood: how much one token's flood slows everyone else, against the same broker unflooded.

A broker on SQLite; a lab's provider token floods it from 50 connections with lease-list polls
as fast as it is answered (almost all answered 429 by the rate limiter), while another lab's
user calls ``/whoami`` one request at a time. The same user's calls on the quiet broker, just
before, are the peer. Prints both medians and p90s and the ratio flooded/quiet.

With ``--reports`` the flood is a lab-a user's usage report (``GET /usage?by=user``, which
holds a request thread and a database connection while it sums) and the other user reads
their own usage report the same way.

The rate limiter's test (tests/federation/test_rate_limits.py) checks what a flood gets and
that others are still served; how fast they are served is measured here.

Run: python -m benchmarks.flood [--requests 1000] [--flooders 50] [--reports]
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


REPORT = ("/usage", {"by": "user"})


def latencies(url: str, token: str, requests: int, path: str = "/whoami",
              params: dict | None = None) -> list[float]:
    """Seconds per GET ``path`` of one client making them one after another."""
    out = []
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        client.get(path, params=params).raise_for_status()  # the connection, the token cache
        for _ in range(requests):
            start = time.perf_counter()
            client.get(path, params=params).raise_for_status()
            out.append(time.perf_counter() - start)
    return out


def tokens(url: str, admin: str) -> tuple[str, str, str, str]:
    """The flooding lab's provider token and machine, a user token of it, and the other
    lab's user token."""
    with httpx.Client(base_url=f"{url}/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {admin}"}) as client:
        for lab in ("lab-a", "lab-b"):
            client.post("/labs", json={"name": lab}).raise_for_status()
        client.put("/labs/lab-b/members/bob", json={"role": "member"}).raise_for_status()
        provider = client.post("/tokens", json={"kind": "provider", "lab": "lab-a"})
        alice = client.post("/tokens", json={"kind": "user", "lab": "lab-a", "user": "alice"})
        user = client.post("/tokens", json={"kind": "user", "lab": "lab-b", "user": "bob"})
        provider_token = provider.raise_for_status().json()["token"]
        alice_token = alice.raise_for_status().json()["token"]
        user_token = user.raise_for_status().json()["token"]
    machine = httpx.post(f"{url}/api/v1/agent/register", timeout=30,
                         headers={"Authorization": f"Bearer {provider_token}"},
                         json={"name": "flooder", "cpus": 1, "memory": "1 GiB"})
    return (provider_token, machine.raise_for_status().json()["provider_id"], alice_token,
            user_token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000,
                        help="/whoami calls measured each way (default 1000)")
    parser.add_argument("--flooders", type=int, default=50,
                        help="connections the flooding token uses at once (default 50)")
    parser.add_argument("--reports", action="store_true",
                        help="flood with a user's usage reports and measure another user's "
                             "(default: agent lease polls, and /whoami)")
    args = parser.parse_args()
    path, params = REPORT if args.reports else ("/whoami", None)
    admin = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        broker, url = start_broker(Path(tmp), admin)
        try:
            provider_token, provider_id, alice_token, user_token = tokens(url, admin)
            quiet = latencies(url, user_token, args.requests, path, params)
            flood = (Flood(url, alice_token, None, args.flooders, path=path, params=params)
                     if args.reports else
                     Flood(url, provider_token, provider_id, args.flooders))
            with flood:
                statuses = flood.statuses
                # Past the token bucket's burst (100), so the flood is at its full rate.
                wait_until(lambda: sum(statuses.values()) >= 200, 30, "the flood to be under way")
                flooded = latencies(url, user_token, args.requests, path, params)
        finally:
            broker.stop()

    def row(label: str, samples: list[float]) -> tuple[str, ...]:
        ms = sorted(s * 1000 for s in samples)
        return (label, f"{statistics.median(ms):.2f}", f"{ms[int(0.9 * len(ms))]:.2f}",
                f"{ms[-1]:.2f}")

    print(table([(f"{path} of another lab's user", "median ms", "p90 ms", "max ms"),
                 row("quiet broker", quiet), row("during the flood", flooded)]))
    ratio = statistics.median(flooded) / statistics.median(quiet)
    print(f"flood answered: {dict(sorted(statuses.items()))}")
    print(f"ratio flooded/quiet (median): {ratio:.2f} (target ≤ {TARGET:g})")
    written = write("flood-reports" if args.reports else "flood", {
        "args": vars(args), "quiet_ms": [s * 1000 for s in quiet],
        "flooded_ms": [s * 1000 for s in flooded], "flood_statuses": statuses,
        "ratio": ratio, "target": f"<= {TARGET:g}"})
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
