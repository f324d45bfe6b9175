"""load_probe: one agent in a process of its own, heartbeating through a load run.

The load generator runs 1,100 clients on one event loop; its latencies include how late that
loop is. This probe's do not: it is a lone client with its own interpreter, so what it sees
is the broker's latency as one more agent would see it. It offers nothing (no lease is
placed on it). Prints a JSON list of (seconds since
start, latency) on stdout when done.

Run by benchmarks/load.py: python -m benchmarks.load_probe URL PROVIDER_TOKEN SECONDS
"""

from __future__ import annotations

import json
import sys
import time

import httpx

#: Seconds between heartbeats (well above the broker's least interval, 1 s: a heartbeat
#: the broker reads late and the next read promptly may still come closer than that).
EVERY = 2.5


def main() -> None:
    url, token, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    samples = []
    with httpx.Client(base_url=f"{url}/api/v1", timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        pid = client.post("/agent/register", json={
            "name": "load-probe", "cpus": 1, "memory": 2**30, "gpus": []}
        ).raise_for_status().json()["provider_id"]
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            sent = time.monotonic()
            answer = client.post(f"/agent/{pid}/heartbeat", json={
                "running": [], "offering": False, "offer_note": "a probe"})
            if answer.status_code != 429:  # too soon after the last, as the broker read them
                answer.raise_for_status()
                samples.append((sent - start, time.monotonic() - sent))
            time.sleep(max(0.0, EVERY + 0.01 - (time.monotonic() - sent)))
    print(json.dumps(samples))


if __name__ == "__main__":
    main()
