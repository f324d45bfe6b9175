"""load_probe: probe agents in a process of their own, heartbeating through a load run.

The load generator runs 1,100 clients on a few event loops; its latencies include how late
those loops are. These probes' do not: they are a handful of agents with an interpreter of
their own, one thread each, so what they see is the broker's latency as one more agent
would see it. Each offers nothing (no lease is placed on it) and heartbeats every
``EVERY`` seconds, its own start staggered; probe i talks to replica i modulo the replicas.
One probe gave ~50 heartbeats in a run, whose "p99" was its slowest one; eight give ~450.

Prints JSON on stdout when done: ``start``, the monotonic clock's reading at the probes'
start (to set the samples against other records of the run), ``samples``, a list of
[seconds since start, latency, replica index], and ``errors``, a list of [seconds since
start, replica index, what came back] (a probe whose heartbeat failed goes on; before
2026-12-03 its thread ended there, and its slow sample was lost).

Run by benchmarks/load.py: python -m benchmarks.load_probe PROVIDER_TOKEN SECONDS PROBES URL...
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx

#: Seconds between one probe's heartbeats (well above the broker's least interval, 1 s: a
#: heartbeat the broker reads late and the next read promptly may still come closer).
EVERY = 2.5


def probe(i: int, url: str, replica: int, token: str, seconds: float, start: float,
          stagger: float, samples: list, errors: list) -> None:
    """One probe agent: registers, then heartbeats until ``seconds`` after ``start``;
    a heartbeat answered with an error (other than 429) or not answered is a sample and an
    error."""
    with httpx.Client(base_url=f"{url}/api/v1", timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        pid = client.post("/agent/register", json={
            "name": f"load-probe-{i}", "cpus": 1, "memory": 2**30, "gpus": []}
        ).raise_for_status().json()["provider_id"]
        time.sleep(max(0.0, start + stagger - time.monotonic()))
        while time.monotonic() - start < seconds:
            sent = time.monotonic()
            try:
                answer = client.post(f"/agent/{pid}/heartbeat", json={
                    "running": [], "offering": False, "offer_note": "a probe"})
                failure = (None if answer.is_success or answer.status_code == 429
                           else f"{answer.status_code} {answer.text[:200]}")
            except httpx.HTTPError as exc:
                answer, failure = None, f"{type(exc).__name__}: {exc}"
            # 429: too soon after the last, as the broker read them; not a sample.
            if answer is None or answer.status_code != 429:
                # A failed heartbeat's wait counts too; the probe goes on, as an agent does.
                samples.append((sent - start, time.monotonic() - sent, replica))
            if failure is not None:
                errors.append((sent - start, replica, failure))
            time.sleep(max(0.0, EVERY + 0.01 - (time.monotonic() - sent)))


def main() -> None:
    token, seconds, probes, urls = (sys.argv[1], float(sys.argv[2]), int(sys.argv[3]),
                                    sys.argv[4:])
    samples: list[tuple[float, float, int]] = []  # list.append is atomic: shared by threads
    errors: list[tuple[float, int, str]] = []
    start = time.monotonic()
    threads = [threading.Thread(target=probe, args=(
        i, urls[i % len(urls)], i % len(urls), token, seconds, start, EVERY * i / probes,
        samples, errors)) for i in range(probes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"start": start, "samples": sorted(samples), "errors": sorted(errors)}))


if __name__ == "__main__":
    main()
