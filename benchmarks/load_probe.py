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

Beside them, probe users and machines time the other endpoints the same way (since
2026-12-04): each of ``len(USER_TOKENS)`` users, in lab-probe like the probe machines, holds
``LEASES`` leases on the lab's own machines (its cluster allows only that lab; the machines
accept no other lab's workers), heartbeats every ``EVERY`` seconds confirming its starting
leases, and every ``CHURN`` seconds releases one running lease and asks for another with
``wait=0``, as the lease keeper does; each machine long-polls its leases (untimed: it waits on
purpose), heartbeats every 5 s and reports the leases it is asked to stop. Their samples are
in ``endpoints``, [endpoint, seconds since start, latency, replica index], and their errors
in ``endpoint_errors``, [endpoint, seconds since start, replica index, what came back].

Run by benchmarks/load.py: python -m benchmarks.load_probe PROVIDER_TOKEN USER_TOKENS
SECONDS PROBES AGENT_URLS USER_URLS (USER_TOKENS and the URL lists comma-separated).
"""

from __future__ import annotations

import contextlib
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


#: Leases each probe user holds, and seconds between its churns (one released, one asked).
LEASES = 4
CHURN = 5.0
#: Seconds between a probe machine's heartbeats (as the simulated agents').
MACHINE_HEARTBEAT = 5.0


class Timed:
    """The probe users' and machines' samples and errors (list.append is atomic: shared by
    their threads)."""

    def __init__(self, start: float):
        self.start = start
        self.samples: list[tuple[str, float, float, int]] = []
        self.errors: list[tuple[str, float, int, str]] = []

    def call(self, name: str, client: httpx.Client, replica: int, method: str, path: str,
             **kwargs) -> httpx.Response | None:
        """One timed request; its answer when 2xx, else None (an error, timed too)."""
        sent = time.monotonic()
        try:
            answer = client.request(method, path, **kwargs)
            failure = None if answer.is_success else f"{answer.status_code} {answer.text[:200]}"
        except httpx.HTTPError as exc:
            answer, failure = None, f"{type(exc).__name__}: {exc}"
        self.samples.append((name, sent - self.start, time.monotonic() - sent, replica))
        if failure is not None:
            self.errors.append((name, sent - self.start, replica, failure))
            return None
        return answer


def probe_machine(i: int, url: str, replica: int, token: str, seconds: float,
                  timed: Timed) -> None:
    """A machine of lab-probe that hosts only its own lab's workers: heartbeats listing its
    leases, long-polls them, and reports (timed) each lease it is asked to stop as ended."""
    with httpx.Client(base_url=f"{url}/api/v1", timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        told = client.post("/agent/register", json={
            "name": f"load-probe-machine-{i}", "cpus": 8, "memory": 2**34, "gpus": [],
            "accepts_peers": False}).raise_for_status().json()
        pid, poll = told["provider_id"], told["poll_timeout"]
        leases: dict[str, str] = {}
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(MACHINE_HEARTBEAT):
                running = [lid for lid, st in leases.items() if st in ("starting", "running")]
                with contextlib.suppress(httpx.HTTPError):
                    client.post(f"/agent/{pid}/heartbeat", json={"running": running})

        beating = threading.Thread(target=heartbeat)
        beating.start()
        version, reported = "", set()
        try:
            while time.monotonic() - timed.start < seconds:
                try:
                    answer = client.get(f"/agent/{pid}/leases", params={
                        "since": version, "wait": min(poll, 5)}).raise_for_status().json()
                except httpx.HTTPError:
                    stop.wait(1)
                    continue
                version = answer["version"]
                leases = {le["id"]: le["state"] for le in answer["leases"]}
                reported &= leases.keys()
                for lid, state in leases.items():
                    if state == "releasing" and lid not in reported:
                        reported.add(lid)
                        if timed.call("agent report", client, replica, "POST",
                                      f"/agent/{pid}/leases/{lid}/state",
                                      json={"state": "ended", "reason": "released"}) is None:
                            reported.discard(lid)
        finally:
            stop.set()
            beating.join()


def probe_user(i: int, url: str, replica: int, token: str, seconds: float, stagger: float,
               timed: Timed) -> None:
    """A user of lab-probe whose cluster may use only the lab's machines: asks for LEASES
    leases, heartbeats every EVERY seconds confirming its starting ones, and every CHURN
    seconds releases a running lease and asks for another, each request timed."""
    from federation.tls import ClusterAuthority

    with httpx.Client(base_url=f"{url}/api/v1", timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        cid = client.post("/clusters", json={
            "scheduler_address": f"tls://127.0.0.1:{40000 + i}",
            "ca_cert": ClusterAuthority().ca_pem, "labs": ["lab-probe"]}
        ).raise_for_status().json()["id"]
        n = 0

        def ask(count: int) -> None:
            nonlocal n
            ids = [f"ls-probe{i}x{n + k}" for k in range(count)]
            n += count
            timed.call("cluster request leases", client, replica, "POST",
                       f"/clusters/{cid}/leases", params={"wait": 0},
                       json={"spec": {"cpus": 1, "memory": 2**30},
                             "workers": [{"lease_id": lid} for lid in ids]})

        time.sleep(max(0.0, timed.start + stagger - time.monotonic()))
        ask(LEASES)
        connected: list[str] = []
        last_churn = time.monotonic()
        while time.monotonic() - timed.start < seconds:
            sent = time.monotonic()
            answer = timed.call("cluster heartbeat", client, replica, "POST",
                                f"/clusters/{cid}/heartbeat", json={"connected": connected})
            if answer is not None:
                leases = answer.json()["leases"]
                connected = [le["id"] for le in leases if le["state"] == "starting"]
                running = [le["id"] for le in leases if le["state"] == "running"]
                if time.monotonic() - last_churn > CHURN and running:
                    last_churn = time.monotonic()
                    timed.call("cluster release", client, replica, "POST",
                               f"/clusters/{cid}/leases/release",
                               json={"lease_ids": running[:1]})
                    ask(1)
            time.sleep(max(0.0, EVERY - (time.monotonic() - sent)))
        with contextlib.suppress(httpx.HTTPError):
            client.delete(f"/clusters/{cid}")


def main() -> None:
    token, user_tokens, seconds, probes = (sys.argv[1], [t for t in sys.argv[2].split(",")
                                                         if t],
                                           float(sys.argv[3]), int(sys.argv[4]))
    urls, user_urls = sys.argv[5].split(","), sys.argv[6].split(",")
    samples: list[tuple[float, float, int]] = []  # list.append is atomic: shared by threads
    errors: list[tuple[float, int, str]] = []
    start = time.monotonic()
    timed = Timed(start)
    threads = [threading.Thread(target=probe, args=(
        i, urls[i % len(urls)], i % len(urls), token, seconds, start, EVERY * i / probes,
        samples, errors)) for i in range(probes)]
    users = len(user_tokens)
    threads += [threading.Thread(target=probe_machine, args=(
        i, urls[i % len(urls)], i % len(urls), token, seconds, timed)) for i in range(users)]
    threads += [threading.Thread(target=probe_user, args=(
        i, user_urls[i % len(user_urls)], i % len(user_urls), user_tokens[i], seconds,
        EVERY * i / users, timed)) for i, _ in enumerate(user_tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"start": start, "samples": sorted(samples), "errors": sorted(errors),
                      "endpoints": sorted(timed.samples),
                      "endpoint_errors": sorted(timed.errors)}))


if __name__ == "__main__":
    main()
