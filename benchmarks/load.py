"""load: the broker under a federation's load, on loopback, bounded in time and count.

Two broker replicas on one PostgreSQL. Simulated provider agents (lightweight coroutines, not
real workers: --agents, default 1,000, 16 CPUs each, in 20 labs, spread over both replicas)
register, long-poll, heartbeat every 5 s and report the leases they are asked to stop.
Simulated users (--users, default 100) each make a cluster, ask for --workers leases (default
100: 10,000 in all), confirm them as their workers "join" (cluster heartbeats every 5 s, as the
lease keeper does, whose answers are their view of the cluster; the heartbeat turns joined
leases running and metered), and churn: every 20 s they release a tenth and ask again.
Metering runs every 30 s over everything running.

Reports, per endpoint, p50 and p99 latency (long polls excluded: they wait on purpose),
errors (any non-2xx or transport failure), placements per second while leases were being
placed, and metering passes. Targets: 0 errors, p99 < 100 ms, including during metering.
The simulated clients run in --processes generator processes (default 4). Beside them
--probes probe agents (default 8) in a process of their own (benchmarks/load_probe.py)
heartbeat every 2.5 s, spread over the replicas: on a machine where the generator shares the
cores with the brokers and PostgreSQL, their latencies are the broker's as one more agent
sees them, the simulated clients' include their own queueing.
Beside the probe agents, --probe-users probe users (default 8), each with a probe machine of
their own lab, time the other endpoints the same way: scale requests (wait=0, as the lease
keeper asks), releases, cluster heartbeats and reports (their load is that of 8 more users and
machines: about 0.08 of a core in all, and the leader's metering passes over their leases).
Each endpoint is also given in steady state (sent 20 s after the first request and before the
users stop: without the thousand registrations at start-up and the hundred closes at the end),
as the simulated clients and as the probes saw it, during metering passes and outside them.
Latencies are also given per 20 s window (start-up, then steady state), with how late the
brokers' and the generator's event loops ran, and how busy the machine was while the probes'
slow heartbeats (over 100 ms) waited, against the others (benchmarks/busy_timeline.py).
It also counts the agents' long polls answered (per lease placed), and PostgreSQL's
transactions and statements during the run (its own statistics; statements where the server
ships pg_stat_statements): work done rather than time taken, so they compare across hosts
and hours where latencies do not; and the statements that spent most time executing (lock
waits included, so a reading of where statements waited as much as where they worked).
The cores each part used on average: the replicas, their child processes (placement,
periodic passes), the generator with the probes, PostgreSQL (its processes, the backends of
closed connections included) and the whole machine.

Users arrive over the first --user-spread seconds (default 5), each at a random moment, so
their heartbeats and churn do not all fall in the same instant (runs before 2026-12-01 started
all of them together: --user-spread 0). Each churns every 20 s from its arrival, so at 5 s all
100 churn within the same 5 s of every 20, which saturates a 2-core machine for seconds;
--user-spread 20 spreads the churn over its period, as independent notebooks' would be.

Run: python -m benchmarks.load [--agents 1000] [--users 100] [--workers 100] [--seconds 120]
     [--processes 4] [--user-spread 5] [--probes 8] [--probe-users 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiohttp
import httpx
import psutil
import psycopg
import uvloop

from benchmarks.busy_timeline import BusyTimeline
from benchmarks.common import (
    exited_children_cpu,
    postmaster_of,
    server_cpu,
    server_cpu_between,
    table,
    write,
)
from federation.broker.service import METERING_PASS_LOGGED
from federation.tls import ClusterAuthority
from tests.utils.postgres import fresh_database, pg_bin, postgres_server, server_log
from tests.utils.procs import start_broker

LABS = 20
HEARTBEAT = 5.0
#: As parallex.yaml's cluster heartbeat-interval.
CLUSTER_HEARTBEAT = 5.0
CHURN_EVERY = 20.0
#: The probe agents' heartbeats, as their errors are counted (their latencies are reported
#: apart from the endpoints').
PROBE_HEARTBEAT = "probe heartbeat"
#: Endpoints whose latencies are also given per 20 s window (start-up, then steady state).
WINDOWED = ("cluster request leases", "cluster heartbeat", "agent report")
METERING_INTERVAL = "30"


class Answer:
    """An HTTP answer as the simulated clients use it (read whole inside its request)."""

    def __init__(self, status_code: int, headers, body: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def client_session(url: str, token: str) -> aiohttp.ClientSession:
    """One simulated client's connection to a broker (its own keep-alive connections, as a
    separate machine has). aiohttp rather than httpx: the generator shares the cores with
    the brokers, and httpx spent about three times the CPU per request."""
    return aiohttp.ClientSession(f"{url}/api/v1/", headers={"Authorization": f"Bearer {token}"},
                                 timeout=aiohttp.ClientTimeout(total=60))


class Recorder:
    """Latencies and errors by endpoint (route template)."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.examples: dict[str, str] = {}
        self.placed: list[float] = []  # when each lease was first seen placed
        self.retried: dict[str, int] = defaultdict(int)  # 429s a real agent retries
        #: Successful answers by endpoint, untimed ones (long polls) included.
        self.answered: dict[str, int] = defaultdict(int)
        self.cpu: dict[str, float] = {}  # cores used on average, by process group
        self.loop_lag: list[float] = []  # how late the generator's event loop ran a timer
        self.timeline: list[tuple[float, float]] = []  # (sent at, latency), every endpoint
        #: The same, by endpoint.
        self.timelines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        #: The probe agents' heartbeats: (seconds since start, latency, replica index).
        self.probes: list[tuple[float, float, int]] = []
        #: The monotonic clock at the probes' start, and the machine's busy cores meanwhile.
        self.probe_start = 0.0
        #: The probe users' and machines' requests: (endpoint, seconds since the probes'
        #: start, latency, replica index).
        self.probe_endpoints: list[tuple[str, float, float, int]] = []
        self.busy: BusyTimeline | None = None
        #: The leader's periodic metering passes, (start, end) on the monotonic clock.
        self.metering: list[tuple[float, float]] = []
        #: Asks for placement passes sent to the leader replica, and scale requests placed
        #: by their own replica because the leader had not answered (all replicas).
        self.placement_asks: dict[str, float] = {}
        #: Agents' heartbeats the replicas answered once queued and after their batch.
        self.heartbeat_answers: dict[str, float] = {}
        #: Each replica's own figures (``replica_figures``), in the order of the URLs.
        self.by_replica: list[dict] = []
        #: PostgreSQL's transactions during the run, committed and rolled back.
        self.transactions: dict[str, int] = {}
        #: Statements PostgreSQL ran during the run (``database_statements``), up to the
        #: brokers' stop.
        self.statements: dict[str, int] = {}

    def merge(self, other: Recorder) -> None:
        """Add another generator process's recordings to these."""
        for name, samples in other.latency.items():
            self.latency[name].extend(samples)
        for name, n in other.errors.items():
            self.errors[name] += n
        for name, n in other.retried.items():
            self.retried[name] += n
        for name, n in other.answered.items():
            self.answered[name] += n
        for name, example in other.examples.items():
            self.examples.setdefault(name, example)
        self.placed.extend(other.placed)
        self.loop_lag.extend(other.loop_lag)
        self.timeline.extend(other.timeline)
        for name, samples in other.timelines.items():
            self.timelines[name].extend(samples)

    async def call(self, client: aiohttp.ClientSession, name: str, method: str, url: str,
                   timed: bool = True, retry_on_429: bool = False,
                   **kwargs) -> Answer | None:
        start = time.perf_counter()
        try:
            async with client.request(method, url, **kwargs) as response:
                answer = Answer(response.status, response.headers, await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[name] += 1
            self.examples.setdefault(name, f"{type(exc).__name__}: {exc}")
            return None
        if answer.status_code == 429 and retry_on_429:
            self.retried[name] += 1
            return answer
        if timed:
            self.latency[name].append(time.perf_counter() - start)
            self.timeline.append((start, time.perf_counter() - start))
            self.timelines[name].append(self.timeline[-1])
        if answer.status_code >= 300:
            self.errors[name] += 1
            self.examples.setdefault(name, f"{answer.status_code} {answer.text[:200]}")
            return None
        self.answered[name] += 1
        return answer


async def agent(rec: Recorder, url: str, token: str, name: str, stop: asyncio.Event) -> None:
    async with client_session(url, token) as client:
        body = {"name": name, "cpus": 16, "memory": 64 * 2**30, "gpus": []}
        for _attempt in range(30):
            # As a real agent does: a lab's machines share a token, whose rate limit answers
            # a burst of registrations 429 with Retry-After.
            answer = await rec.call(client, "agent register", "POST", "agent/register",
                                    json=body, retry_on_429=True)
            if answer is not None and answer.status_code != 429:
                break
            await asyncio.sleep(float(answer.headers.get("Retry-After", 1)) if answer else 1)
        if answer is None or answer.status_code == 429:
            rec.errors["agent register"] += 1
            return
        pid = answer.json()["provider_id"]
        poll = answer.json()["poll_timeout"]
        leases: dict[str, str] = {}

        async def heartbeat() -> None:
            await asyncio.sleep(random.random() * HEARTBEAT)
            while not stop.is_set():
                running = [lid for lid, st in leases.items() if st in ("starting", "running")]
                await rec.call(client, "agent heartbeat", "POST", f"agent/{pid}/heartbeat",
                               json={"running": running})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), HEARTBEAT)

        beating = asyncio.create_task(heartbeat())
        version = ""
        # As a real agent's stopping set: a list read while its report was on the way still
        # shows the lease releasing, and the agent does not report it again.
        reported: set[str] = set()
        while not stop.is_set():
            answer = await rec.call(client, "agent poll", "GET", f"agent/{pid}/leases",
                                    timed=False, params={"since": version, "wait": poll})
            if answer is None:
                await asyncio.sleep(1)
                continue
            version = answer.json()["version"]
            leases = {le["id"]: le["state"] for le in answer.json()["leases"]}
            reported &= leases.keys()
            for lid, state in leases.items():
                if state == "releasing" and lid not in reported:
                    reported.add(lid)
                    if await rec.call(client, "agent report", "POST",
                                      f"agent/{pid}/leases/{lid}/state",
                                      json={"state": "ended", "reason": "released"}) is None:
                        reported.discard(lid)  # failed (counted): a later list retries it
        await beating


async def user(rec: Recorder, url: str, token: str, ca_pem: str, workers: int,
               stop: asyncio.Event, spread: float = 0.0) -> None:
    # Notebooks are opened at different moments: each user's first request (and so the
    # phase of its heartbeats and churn) falls at random within ``spread`` seconds.
    await asyncio.sleep(random.random() * spread)
    async with client_session(url, token) as client:
        answer = await rec.call(client, "cluster create", "POST", "clusters", json={
            "scheduler_address": f"tls://127.0.0.1:{random.randrange(20000, 60000)}",
            "ca_cert": ca_pem})
        if answer is None:
            return
        cid = answer.json()["id"]
        seen_placed: set[str] = set()

        async def ask(n: int) -> None:
            slots = [{"lease_id": f"ls-{secrets.token_hex(8)}"} for _ in range(n)]
            for i in range(0, n, 100):
                # As the lease keeper asks: answered once admitted, not after the pass.
                await rec.call(client, "cluster request leases", "POST",
                               f"clusters/{cid}/leases?wait=0",
                               json={"spec": {"cpus": 1, "memory": 2**30},
                                     "workers": slots[i:i + 100]})

        await ask(workers)
        last_churn = time.monotonic()
        connected: list[str] = []
        while not stop.is_set():
            # As the lease keeper does: the heartbeat says which workers joined, and its
            # answer is the cluster's view (the keeper reads the cluster only at close).
            answer = await rec.call(client, "cluster heartbeat", "POST",
                                    f"clusters/{cid}/heartbeat", json={"connected": connected})
            if answer is not None:
                leases = answer.json()["leases"]
                connected = [le["id"] for le in leases if le["state"] == "starting"]
                now = time.monotonic()
                for le in leases:
                    if le["state"] != "pending" and le["id"] not in seen_placed:
                        seen_placed.add(le["id"])
                        rec.placed.append(now)
                running = [le["id"] for le in leases if le["state"] == "running"]
                if now - last_churn > CHURN_EVERY and len(running) >= 10:
                    last_churn = now
                    gone = random.sample(running, len(running) // 10)
                    await rec.call(client, "cluster release", "POST",
                                   f"clusters/{cid}/leases/release", json={"lease_ids": gone})
                    await ask(len(gone))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CLUSTER_HEARTBEAT)
        await rec.call(client, "cluster close", "DELETE", f"clusters/{cid}")


async def setup(url: str, admin_token: str, users: int) -> tuple[list[str], list[str]]:
    """Labs, one provider token per lab, one user token per user."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=f"{url}/api/v1", headers=headers,
                                 timeout=60) as admin:
        providers, tokens = [], []
        for i in range(LABS):
            (await admin.post("/labs", json={"name": f"lab-{i}"})).raise_for_status()
            answer = await admin.post("/tokens", json={"kind": "provider", "lab": f"lab-{i}"})
            providers.append(answer.raise_for_status().json()["token"])
        for u in range(users):
            lab = f"lab-{u % LABS}"
            (await admin.put(f"/labs/{lab}/members/user{u}",
                             json={"role": "member"})).raise_for_status()
            answer = await admin.post("/tokens", json={"kind": "user", "lab": lab,
                                                       "user": f"user{u}"})
            tokens.append(answer.raise_for_status().json()["token"])
    return providers, tokens


async def probe_tokens(url: str, admin_token: str, users: int) -> tuple[str, list[str]]:
    """A provider token of a lab of its own for the probe agents and machines (the simulated
    labs' tokens are busy with their own machines' registrations, rate-limited per token),
    and a user token for each probe user, members of that lab."""
    async with httpx.AsyncClient(base_url=f"{url}/api/v1", timeout=60, headers={
            "Authorization": f"Bearer {admin_token}"}) as admin:
        (await admin.post("/labs", json={"name": "lab-probe"})).raise_for_status()
        answer = await admin.post("/tokens", json={"kind": "provider", "lab": "lab-probe"})
        provider = answer.raise_for_status().json()["token"]
        tokens = []
        for u in range(users):
            (await admin.put(f"/labs/lab-probe/members/probe-user{u}",
                             json={"role": "member"})).raise_for_status()
            answer = await admin.post("/tokens", json={"kind": "user", "lab": "lab-probe",
                                                       "user": f"probe-user{u}"})
            tokens.append(answer.raise_for_status().json()["token"])
        return provider, tokens


def yield_cores(nice: int) -> None:
    """Give this generator process ``nice``: behind the brokers and PostgreSQL for the cores.

    Niceness alone orders threads within one scheduling group, and where the kernel groups
    by session (autogroup, Linux's default on desktops and this machine) each session's
    group gets an equal share whatever its members' niceness: the brokers and PostgreSQL
    run in sessions of their own, so a niced generator in the benchmark's session still took
    a whole group's share from them (2026-12-04: ``--generator-nice`` changed nothing). So
    the process also starts a session of its own and gives that group the niceness."""
    os.nice(nice)
    with contextlib.suppress(OSError):  # no autogroup here: niceness is all there is
        os.setsid()
        Path("/proc/self/autogroup").write_text(str(nice))


def shard(urls: tuple[list[str], list[str]], providers: list[str], tokens: list[str], ca: str,
          agents: list[int], users: list[int], workers: int, seconds: float,
          nice: int = 0, user_spread: float = 0.0) -> Recorder:
    """One generator process's share of the simulated agents and users (run in a process
    pool: on one event loop, 1,100 clients measured mostly that loop — a lone agent in a
    process of its own saw heartbeats 60 times faster than the simulated ones). ``urls``:
    the replicas agents use, and those users use."""
    if nice:
        yield_cores(nice)
    # uvloop: the generator's own CPU is CPU the brokers lack on this machine.
    return uvloop.run(run_shard(urls, providers, tokens, ca, agents, users, workers, seconds,
                                user_spread))


async def run_shard(urls: tuple[list[str], list[str]], providers: list[str], tokens: list[str],
                    ca: str, agents: list[int], users: list[int], workers: int,
                    seconds: float, user_spread: float = 0.0) -> Recorder:
    rec = Recorder()
    stop = asyncio.Event()
    agent_urls, user_urls = urls
    tasks = [asyncio.create_task(agent(rec, agent_urls[i % len(agent_urls)], providers[i % LABS],
                                       f"sim-{i}", stop)) for i in agents]
    await asyncio.sleep(5)  # registrations first, as agents are up before users come
    tasks += [asyncio.create_task(user(rec, user_urls[(u + 1) % len(user_urls)], tokens[u], ca,
                                       workers,
                                       stop, user_spread)) for u in users]
    probe = asyncio.create_task(lag_probe(rec, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await probe
    await asyncio.wait(tasks, timeout=90)
    return rec


def run(args: argparse.Namespace, urls: list[str], admin_token: str) -> Recorder:
    """Every shard's recordings in one Recorder, and the probes'."""
    providers, tokens = asyncio.run(setup(urls[0], admin_token, args.users))
    # Agents (and the probes) on the first --agent-replicas replicas, users on the others.
    k = args.agent_replicas
    agent_urls, user_urls = (urls[:k], urls[k:]) if k else (urls, urls)
    # A session of its own: the probes stand for agents on machines of their own, and this
    # kernel groups scheduling by session (autogroup), so in the generator's session they
    # waited for the share of the cores that the 1,100 simulated clients use.
    provider_token, user_tokens = asyncio.run(probe_tokens(urls[0], admin_token,
                                                           args.probe_users))
    probes = subprocess.Popen([sys.executable, "-m", "benchmarks.load_probe", provider_token,
                               ",".join(user_tokens), str(args.seconds + 5), str(args.probes),
                               ",".join(agent_urls), ",".join(user_urls)],
                              stdout=subprocess.PIPE, start_new_session=True)
    ca = ClusterAuthority().ca_pem
    n = max(1, args.processes)
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(shard, (agent_urls, user_urls), providers, tokens, ca,
                               list(range(k, args.agents, n)), list(range(k, args.users, n)),
                               args.workers, args.seconds, args.generator_nice,
                               args.user_spread)
                   for k in range(n)]
        parts = [f.result() for f in futures]
    out, _ = probes.communicate(timeout=120)
    rec = Recorder()
    for part in parts:
        rec.merge(part)
    if probes.returncode == 0 and out.strip():
        told = json.loads(out)
        rec.probes, rec.probe_start = [tuple(x) for x in told["samples"]], told["start"]
        for _t, _replica, what in told.get("errors", []):
            rec.errors[PROBE_HEARTBEAT] += 1
            rec.examples.setdefault(PROBE_HEARTBEAT, what)
        rec.probe_endpoints = [tuple(x) for x in told.get("endpoints", [])]
        for name, _t, _replica, what in told.get("endpoint_errors", []):
            rec.errors[f"probe {name}"] += 1
            rec.examples.setdefault(f"probe {name}", what)
    return rec


async def lag_probe(rec: Recorder, stop: asyncio.Event, every: float = 0.05) -> None:
    """How late the generator's own event loop wakes: a client-side latency includes this
    (the generator runs 1,100 clients on one loop), the broker's histograms do not."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(every)
        rec.loop_lag.append(time.perf_counter() - start - every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=1000, help="Simulated agents (1000).")
    parser.add_argument("--users", type=int, default=100, help="Simulated users (100).")
    parser.add_argument("--workers", type=int, default=100, help="Leases per user (100).")
    parser.add_argument("--seconds", type=float, default=120, help="Run time (120).")
    parser.add_argument("--replicas", type=int, default=2,
                        help="Broker replicas, each a process of its own (2). The agents and "
                             "users are spread over them.")
    parser.add_argument("--agent-replicas", type=int, default=0,
                        help="Replicas that serve the agents (and the probes), the first of "
                             "--replicas; the users use the others, as a site may route "
                             "/api/v1/agent/ to replicas of their own (0: everyone uses every "
                             "replica).")
    parser.add_argument("--user-spread", type=float, default=5.0,
                        help="Seconds over which the simulated users arrive, each at a "
                             "random moment (5, as the agents' first heartbeats spread over "
                             "5 s). Their heartbeats and churn keep that phase; 0 starts all "
                             "100 together, so they heartbeat and scale in the same instant "
                             "every time (the runs before this option).")
    parser.add_argument("--processes", type=int, default=4,
                        help="Generator processes the simulated clients are spread over (4).")
    parser.add_argument("--probe-users", type=int, default=8,
                        help="Probe users in the probes' process (8), each with a probe "
                             "machine of lab-probe: they time scale requests, releases, "
                             "cluster heartbeats and reports as one more user and machine "
                             "see them (benchmarks/load_probe.py).")
    parser.add_argument("--probes", type=int, default=8,
                        help="Probe agents in a process of their own, one thread each, "
                             "heartbeating every 2.5 s and spread over the replicas (8: "
                             "~450 heartbeats in a run, so their p99 is not just the slowest "
                             "of ~50).")
    parser.add_argument("--generator-nice", type=int, default=0,
                        help="Niceness of the generator processes (0: as the brokers). On a "
                             "machine too small for the clients to run elsewhere, 10 lets the "
                             "brokers and PostgreSQL have the cores first, as when the "
                             "clients are other machines (each generator process then runs "
                             "in a session of its own, whose scheduling group gets the "
                             "niceness); the probes are not niced.")
    parser.add_argument("--broker-option", action="append", default=[], metavar="FLAG=VALUE",
                        help="A setting for every replica, as `parallex broker` takes it "
                             "(e.g. --broker-option=--periodic-niceness=0), for comparing "
                             "settings in the same conditions; repeatable (default: none).")
    parser.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="A PostgreSQL server setting for the run, e.g. "
                             "--pg-setting=log_lock_waits=on (repeatable; default: none); "
                             "its log is kept with --keep-logs.")
    parser.add_argument("--keep-logs", metavar="FOLDER", default=None,
                        help="Copy the replicas' logs into FOLDER at the end (default: none "
                             "kept; they are written to a temporary folder).")
    args = parser.parse_args()
    if not 0 <= args.agent_replicas < args.replicas:
        parser.error(f"--agent-replicas {args.agent_replicas}: give 0 (everyone on every "
                     f"replica) or fewer than --replicas {args.replicas}, so users have one")
    admin_token = secrets.token_hex(24)
    # PostgreSQL counts every statement, BEGIN and COMMIT included, where its distribution
    # ships pg_stat_statements (Debian's does).
    counting = (pg_bin().parent / "lib" / "pg_stat_statements.so").exists()
    # Room for every statement's text (an IN list of each length is a text of its own), so
    # none is evicted with its count (``dealloc`` says if one was).
    settings = ("shared_preload_libraries=pg_stat_statements",
                "pg_stat_statements.max=20000") if counting else ()
    settings = (*settings, *args.pg_setting)
    with (tempfile.TemporaryDirectory() as tmp,
          postgres_server(settings=settings) as server):
        db = fresh_database(server, "load")
        pg_log = server_log(db)
        if counting:
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
        brokers = []
        rec: Recorder | None = None
        try:
            for name in (f"replica-{i + 1}" for i in range(args.replicas)):
                proc, url = start_broker(Path(tmp), admin_token, db_url=db, name=name,
                                         extra=("--metering-interval", METERING_INTERVAL,
                                                "--rate-burst", "1000",
                                                *args.broker_option))
                brokers.append((proc, url))
            transactions_at_start = database_transactions(db)
            statements_at_start = database_statements(db) if counting else {}
            start = time.perf_counter()
            watched = {"broker replicas": [psutil.Process(p.pid) for p, _u in brokers]}
            before = {k: sum(cpu(p) for p in ps) for k, ps in watched.items()}
            cpu_at_start = {p.pid: cpu(p) for p in watched["broker replicas"]}
            # The leader's periodic passes run in a child process (PostgreSQL), spawned at
            # its first pass: counted from here, and any spawned later from its start.
            children_before = {c.pid: cpu(c) for c in children_of(watched["broker replicas"])}
            generator = generator_cpu()
            postmaster = postmaster_of(db)
            server_before, server_exited = server_cpu(postmaster), exited_children_cpu(postmaster)
            machine = psutil.cpu_times()
            busy = BusyTimeline().start()
            try:
                rec = run(args, [url for _p, url in brokers], admin_token)
            finally:
                busy.stop()
            rec.busy = busy
            elapsed = time.perf_counter() - start
            rec.cpu = {k: (sum(cpu(p) for p in ps) - before[k]) / elapsed
                       for k, ps in watched.items()}
            rec.cpu["brokers' periodic processes"] = sum(
                cpu(c) - children_before.get(c.pid, 0.0)
                for c in children_of(watched["broker replicas"])) / elapsed
            rec.cpu["load generator"] = (generator_cpu() - generator) / elapsed
            rec.cpu["postgresql"] = server_cpu_between(server_before, server_exited,
                                                       postmaster) / elapsed
            after = psutil.cpu_times()
            # Everything busy on the machine: the above, and anything else running.
            rec.cpu["whole machine"] = (
                (sum(after) - after.idle - after.iowait)
                - (sum(machine) - machine.idle - machine.iowait)) / elapsed
            # Each replica's samples, read once: its own figures, and summed over all.
            per_replica = [scrape([url], admin_token) for _p, url in brokers]
            samples = [sample for part in per_replica for sample in part]
            passes = {kind: pass_stats(samples, metric) for kind, metric in (
                ("metering", "metering_pass"), ("placement", "placement_pass"),
                ("placement lock wait", "placement_lock_wait"),
                ("heartbeat batch", "heartbeat_batch"), ("report batch", "report_batch"),
                ("scale admission", "scale_admission"),
                ("scale placement wait", "scale_placement_wait"))}
            inside = server_quantiles(samples)
            lag = server_quantiles(samples, "parallex_event_loop_lag_seconds_bucket")
            rec.by_replica = [replica_figures(part, (cpu(p) - cpu_at_start[p.pid]) / elapsed)
                              for part, p in zip(per_replica, watched["broker replicas"],
                                                 strict=True)]
            rec.placement_asks = gauge_sums(samples, {
                "sent to the leader": "parallex_placement_asks_to_leader",
                "placed by their own replica": "parallex_placement_fallbacks"})
            rec.heartbeat_answers = {when: sum(
                s.value for s in samples if s.name == "parallex_agent_heartbeats_answered_total"
                and s.labels.get("when") == when) for when in ("queued", "recorded")}
            if counting:
                now = database_statements(db)
                rec.statements = {k: now[k] - statements_at_start.get(k, 0)
                                  for k in now if k not in ("most frequent", "most time")}
                # Start-up included.
                rec.statements.update({k: now[k] for k in ("most frequent", "most time")})
        finally:
            for proc, _url in brokers:
                proc.stop()
            if rec is not None:
                rec.metering = metering_passes(Path(tmp).glob("replica-*.log"))
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for log in [*Path(tmp).glob("replica-*.log"), pg_log]:
                    shutil.copy(log, args.keep_logs)
        # Counted by PostgreSQL as its backends end (they flush their statistics then), so
        # read once the brokers have stopped; set against the count read before the run.
        after_run = database_transactions(db)
        rec.transactions = {k: (after_run[k] - transactions_at_start[k]) for k in after_run}
    report(rec, elapsed, passes, inside, args, lag.get("", (0, 0.0, 0.0)))


def database_statements(url: str) -> dict[str, int]:
    """Statements PostgreSQL has run on the database so far (pg_stat_statements): all of
    them, and of those the transactions' own BEGIN, COMMIT and ROLLBACK. Each is a round
    trip from a broker (an executemany's rows are pipelined, and counted one each)."""
    with psycopg.connect(url, autocommit=True) as conn:
        # By text, an IN list of any length as one (each length is a text of its own).
        rows = conn.execute(
            "SELECT regexp_replace(ltrim(query), '\\$[0-9]+(, *\\$[0-9]+)*', '$n', 'g'), "
            "sum(calls)::bigint, sum(total_exec_time) FROM pg_stat_statements WHERE dbid = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) GROUP BY 1 "
            "ORDER BY 2 DESC").fetchall()
        evicted = conn.execute("SELECT dealloc FROM pg_stat_statements_info").fetchone()[0]
    first_words: dict[str, int] = defaultdict(int)
    for text, calls, _ms in rows:
        first_words[text.split(" ", 1)[0].upper()] += calls
    out = {"all": sum(first_words.values())}
    out.update({word.lower(): first_words[word] for word in ("BEGIN", "COMMIT", "ROLLBACK")})
    out["evictions"] = int(evicted)  # nonzero: the counts are short by what was evicted
    out["most frequent"] = {text[:140]: int(calls) for text, calls, _ms in rows[:15]}
    # Where statements spent their time in the executor, set-up included: working, and
    # waiting for locks (an advisory lock's wait, a row another transaction holds).
    out["most time"] = {text[:240]: [round(ms), int(calls)] for text, calls, ms in
                        sorted(rows, key=lambda r: r[2], reverse=True)[:10]}
    return out


def database_transactions(url: str) -> dict[str, int]:
    """PostgreSQL's count of the database's transactions so far, committed and rolled back
    (each statement in autocommit is one committed transaction)."""
    with psycopg.connect(url, autocommit=True) as conn:
        committed, rolled_back = conn.execute(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()").fetchone()
    return {"committed": committed, "rolled back": rolled_back}


def generator_cpu() -> float:
    """CPU seconds of this process and the children it waited for (the generator's shards
    and the probes; the brokers and PostgreSQL are still running, so not counted)."""
    me, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def children_of(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes' children and theirs, still running."""
    return [c for p in processes for c in p.children(recursive=True)]


def cpu(process: psutil.Process) -> float:
    """CPU seconds a process has used so far."""
    times = process.cpu_times()
    return times.user + times.system


def scrape(urls: list[str], admin_token: str) -> list:
    """Every sample of every replica's metrics, read once (prometheus_client samples)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for url in urls:
        text = httpx.get(f"{url}/api/v1/metrics", timeout=30,
                         headers={"Authorization": f"Bearer {admin_token}"}).text
        samples += [s for family in text_string_to_metric_families(text)
                    for s in family.samples]
    return samples


def server_quantiles(samples: list, metric: str = "parallex_http_request_seconds_bucket",
                     ) -> dict[str, tuple[int, float, float]]:
    """Per route, from all replicas' request histograms (time inside the broker, from the
    request's arrival to its answer) in ``samples`` (``scrape``): requests, and the bucket
    bounds holding p50 and p99 (an upper bound on each, in seconds; inf past the last
    bucket)."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for s in samples:
        if s.name == metric:
            route = (f"{s.labels['method']} {s.labels['route']}"
                     if "route" in s.labels else "")
            buckets[route][float(s.labels["le"])] += s.value
    out = {}
    for route, counts in buckets.items():
        bounds = sorted(counts)
        total = counts[bounds[-1]]
        if total:
            out[route] = (int(total),
                          next(b for b in bounds if counts[b] >= 0.5 * total),
                          next(b for b in bounds if counts[b] >= 0.99 * total))
    return out


#: Seconds after which the probes' heartbeats count as steady state (the first window holds
#: a thousand agents registering at once, their 429s and retries).
STEADY_AFTER = 20.0


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of an ascending list (its nearest rank)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def probe_summary(latencies: list[float]) -> dict:
    """How many heartbeats, their p50 and p99 in ms (None without any)."""
    ordered = sorted(latencies)
    return {"heartbeats": len(ordered),
            "p50": statistics.median(ordered) * 1000 if ordered else None,
            "p99": quantile(ordered, 0.99) * 1000 if ordered else None}


def probe_figures(samples: list[tuple[float, float, int]]) -> dict:
    """The probes' heartbeats over the whole run, after start-up, and by replica."""
    by_replica: dict[int, list[float]] = defaultdict(list)
    for _t, latency, replica in samples:
        by_replica[replica].append(latency)
    return {**probe_summary([x for _t, x, _r in samples]),
            "after_start_up": probe_summary([x for t, x, _r in samples if t >= STEADY_AFTER]),
            "by_replica": {f"replica-{r + 1}": probe_summary(x)
                           for r, x in sorted(by_replica.items())}}


def replica_figures(samples: list, cpu_cores: float) -> dict:
    """One replica's own figures (``scrape`` of it alone): whether it leads, how late its
    event loop ran, and its agents' heartbeats inside it; a leader that places for both
    and a follower that does not can differ, which the sums over replicas hide."""
    lag = server_quantiles(samples, "parallex_event_loop_lag_seconds_bucket").get(
        "", (0, 0.0, 0.0))
    beats = server_quantiles(samples).get("POST /agent/{provider_id}/heartbeat", (0, 0.0, 0.0))
    return {"leader": bool(gauge_sums(samples, {"l": "parallex_broker_leader"}).get("l")),
            "loop_lag_ms_at_most": {"p50": lag[1] * 1000, "p99": lag[2] * 1000},
            "heartbeats": beats[0],
            "heartbeat_ms_at_most": {"p50": beats[1] * 1000, "p99": beats[2] * 1000},
            "cpu_cores": cpu_cores}


def gauge_sums(samples: list, names: dict[str, str]) -> dict[str, float]:
    """Each gauge of ``names`` (label: metric name) summed over all replicas' ``samples``."""
    return {label: sum(s.value for s in samples if s.name == name)
            for label, name in names.items()}


def pass_stats(samples: list, metric: str) -> tuple[int, float, float, float]:
    """How many passes or phases (``metric``: metering_pass, placement_pass,
    heartbeat_batch, scale_admission, ...) all replicas timed, their mean seconds, and the
    bucket bounds holding their p50 and p99 (upper bounds, seconds)."""
    count, total = gauge_sums(samples, {"count": f"parallex_{metric}_seconds_count",
                                        "sum": f"parallex_{metric}_seconds_sum"}).values()
    _n, p50, p99 = server_quantiles(samples, f"parallex_{metric}_seconds_bucket"
                                    ).get("", (0, 0.0, 0.0))
    return int(count), (total / count if count else 0.0), p50, p99


def steady_endpoints(rec: Recorder, first: float, seconds: float
                     ) -> dict[str, tuple[int, float, float]]:
    """Each endpoint's requests sent in steady state: ``STEADY_AFTER`` seconds after the
    first request (a thousand registrations and a hundred clusters made at once before it)
    and before the users stop at ``seconds`` (a hundred clusters closed at once after it);
    how many, p50 and p99 in ms. Endpoints with none then (registrations, cluster creation
    and closing) are left out."""
    out = {}
    for name in sorted(rec.timelines):
        samples = sorted(latency for sent, latency in rec.timelines[name]
                         if first + STEADY_AFTER <= sent < first + seconds)
        if samples:
            out[name] = (len(samples), statistics.median(samples) * 1000,
                         quantile(samples, 0.99) * 1000)
    return out


def probe_endpoints(rec: Recorder, seconds: float, metering: bool | None = None
                    ) -> dict[str, tuple[int, float, float]]:
    """Each endpoint as the probes timed it after start-up and before the users stop at
    ``seconds`` (how many, p50 and p99 in ms): the probe agents' heartbeats and the probe
    users' and machines' requests. ``metering``: only those that overlapped a periodic
    metering pass (True) or only the others (False)."""
    by_name: dict[str, list[float]] = defaultdict(list)
    samples = [("agent heartbeat", t, latency) for t, latency, _r in rec.probes]
    samples += [(name, t, latency) for name, t, latency, _r in rec.probe_endpoints]
    for name, t, latency in samples:
        sent = rec.probe_start + t
        if not STEADY_AFTER <= t < seconds:
            continue
        if metering is not None and metering != in_metering(rec, sent, latency):
            continue
        by_name[name].append(latency)
    return {name: (len(x), statistics.median(x) * 1000, quantile(x, 0.99) * 1000)
            for name, x in sorted((k, sorted(v)) for k, v in by_name.items())}


def by_window(timeline: list[tuple[float, float]], width: float = 20.0,
              first: float | None = None) -> list[tuple[str, float, float]]:
    """p50 and p99 (ms) of the requests sent in each ``width``-second window since
    ``first`` (default: the first request of ``timeline``)."""
    if not timeline:
        return []
    if first is None:
        first = min(t for t, _ in timeline)
    buckets: dict[int, list[float]] = defaultdict(list)
    for sent, latency in timeline:
        buckets[int((sent - first) // width)].append(latency)
    out = []
    for k in sorted(buckets):
        samples = sorted(buckets[k])
        out.append((f"{k * width:.0f}-{(k + 1) * width:.0f} s", statistics.median(samples) * 1000,
                    quantile(samples, 0.99) * 1000))
    return out


#: A replica's log line of a periodic metering pass: when it ended, and how long it took.
_METERING_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*"
                            + re.escape(METERING_PASS_LOGGED) + r" ([0-9.]+) s")


def metering_passes(logs: Iterable[Path]) -> list[tuple[float, float]]:
    """The periodic metering passes the replicas' ``logs`` name, as (start, end) on this
    machine's monotonic clock (the probes' clock): logging stamps wall-clock local time to
    the millisecond, set against the monotonic clock here."""
    wall_minus_monotonic = time.time() - time.monotonic()
    passes = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if (found := _METERING_LINE.match(line)) is None:
                continue
            ended = time.mktime(time.strptime(found[1][:19], "%Y-%m-%d %H:%M:%S")) + int(
                found[1][20:]) / 1000 - wall_minus_monotonic
            passes.append((ended - float(found[2]), ended))
    return sorted(passes)


def steady_probes(rec: Recorder) -> Iterator[tuple[float, float]]:
    """The probes' heartbeats after start-up: when each was sent (the monotonic clock) and
    how long it took, seconds."""
    for t, latency, _replica in rec.probes:
        if t >= STEADY_AFTER:
            yield rec.probe_start + t, latency


def in_metering(rec: Recorder, sent: float, latency: float) -> bool:
    """Whether a request sent at ``sent`` (the monotonic clock) that took ``latency``
    seconds overlapped one of the leader's periodic metering passes."""
    return any(start < sent + latency and sent < end for start, end in rec.metering)


def during_metering(rec: Recorder) -> dict:
    """The probes' heartbeats after start-up that overlapped a periodic metering pass, and
    the others (the issue's target holds "including during metering"); empty without
    passes."""
    if not rec.metering or not rec.probes:
        return {}
    during, outside = [], []
    for sent, latency in steady_probes(rec):
        (during if in_metering(rec, sent, latency) else outside).append(latency)
    return {"passes": len(rec.metering),
            "pass_seconds": sum(end - start for start, end in rec.metering),
            "since_probes_start": [(start - rec.probe_start, end - rec.probe_start)
                                   for start, end in rec.metering],
            "during": probe_summary(during), "outside": probe_summary(outside)}


#: A probe heartbeat slower than this (seconds, the target's p99) counts as slow.
SLOW = 0.1
#: Busy cores counted as the machine saturated (of 2 on the development machine).
SATURATED = 1.9


def while_slow(rec: Recorder) -> dict:
    """How busy the machine was while the slow probe heartbeats waited, against the others
    (after start-up); empty without a timeline."""
    if rec.busy is None or not rec.busy.times or not rec.probes:
        return {}
    slow, other = [], []
    for sent, latency in steady_probes(rec):
        cores = rec.busy.between(sent, sent + latency)
        if cores is not None:
            (slow if latency > SLOW else other).append(cores)
    if not other:
        return {}
    return {"slow": len(slow), "others": len(other),
            "busy_when_slow": statistics.mean(slow) if slow else None,
            "busy_otherwise": statistics.mean(other),
            "saturated_share": rec.busy.saturated_share(rec.probe_start + STEADY_AFTER,
                                                        rec.busy.times[-1], SATURATED)}


def report(rec: Recorder, elapsed: float, passes: dict[str, tuple[int, float, float, float]],
           inside: dict[str, tuple[int, float, float]], args: argparse.Namespace,
           broker_lag: tuple[int, float, float]) -> None:
    rows = [("endpoint", "requests", "p50 ms", "p99 ms", "errors")]
    worst = 0.0
    for name in sorted(set(rec.latency) | set(rec.errors)):
        samples = sorted(rec.latency.get(name, []))
        p50 = statistics.median(samples) * 1000 if samples else float("nan")
        p99 = quantile(samples, 0.99) * 1000 if samples else float("nan")
        if samples:
            worst = max(worst, p99)
        rows.append((name, str(len(samples)), f"{p50:.1f}", f"{p99:.1f}",
                     str(rec.errors.get(name, 0))))
    print(table(rows))
    probes = probe_figures(rec.probes)
    if probes["heartbeats"]:
        print(f"probe agents in their own process (benchmarks/load_probe.py), "
              f"{probes['heartbeats']} heartbeats: p50 {probes['p50']:.1f} ms, p99 "
              f"{probes['p99']:.1f} ms; by replica: "
              + "; ".join(f"{name}: p50 {x['p50']:.0f}, p99 {x['p99']:.0f} ms"
                          for name, x in probes["by_replica"].items())
              + "; by window: "
              + "; ".join(f"{w}: p50 {a:.0f}, p99 {b:.0f} ms" for w, a, b in by_window(
                  [(t, x) for t, x, _r in rec.probes])))
        steady = probes["after_start_up"]
        if steady["heartbeats"]:
            print(f"the probes after the first {STEADY_AFTER:.0f} s (start-up: a thousand "
                  f"registrations): {steady['heartbeats']} heartbeats, p50 "
                  f"{steady['p50']:.1f} ms, p99 {steady['p99']:.1f} ms")
        probes["while_slow"] = while_slow(rec)
        if probes["while_slow"]:
            w = probes["while_slow"]
            slow = (f"{w['busy_when_slow']:.2f} busy cores on average while they waited"
                    if w["slow"] else "none")
            print(f"the machine while the probes waited (after start-up): "
                  f"{w['slow']} heartbeats over {SLOW * 1000:.0f} ms, {slow}; "
                  f"{w['busy_otherwise']:.2f} while the others did; "
                  f"{w['saturated_share'] * 100:.0f} % of the run with ≥ {SATURATED:g} of "
                  f"{psutil.cpu_count()} cores busy")
    probes["during_metering"] = during_metering(rec)
    if probes["during_metering"]:
        m = probes["during_metering"]

        def told(x: dict) -> str:
            return (f"{x['heartbeats']} heartbeats, p50 {x['p50']:.1f} ms, p99 {x['p99']:.1f} ms"
                    if x["heartbeats"] else "no heartbeats")

        print(f"the probes after start-up during the leader's {m['passes']} metering passes "
              f"({m['pass_seconds']:.1f} s in all, at " + ", ".join(
                  f"{a:.1f}–{b:.1f}" for a, b in m["since_probes_start"])
              + f" s of the probes' run): {told(m['during'])}; outside them: "
              f"{told(m['outside'])}")
    windows = by_window(rec.timeline)
    print("all endpoints by 20 s window since the first request (start-up, then steady): "
          + "; ".join(f"{w}: p50 {p50:.0f} ms, p99 {p99:.0f} ms" for w, p50, p99 in windows))
    first = min((t for t, _ in rec.timeline), default=0.0)
    for name in WINDOWED:
        print(f"{name} by the same windows: " + "; ".join(
            f"{w}: p50 {p50:.0f} ms, p99 {p99:.0f} ms"
            for w, p50, p99 in by_window(rec.timelines.get(name, []), first=first)))
    steady = steady_endpoints(rec, first, args.seconds)
    print(table([("endpoint, steady state (sent 20 s after the first request, before the "
                  "users stop)", "requests", "p50 ms", "p99 ms")]
                + [(name, str(n), f"{p50:.1f}", f"{p99:.1f}")
                   for name, (n, p50, p99) in steady.items()]))
    worst_steady = max((p99 for _n, _p50, p99 in steady.values()), default=0.0)
    probed = probe_endpoints(rec, args.seconds)
    during = probe_endpoints(rec, args.seconds, metering=True)
    outside = probe_endpoints(rec, args.seconds, metering=False)

    def cells(figures: dict, name: str) -> tuple[str, str]:
        n, _p50, p99 = figures.get(name, (0, 0.0, 0.0))
        return (str(n), f"{p99:.1f}" if n else "-")

    if probed:
        print(table([("endpoint, as the probes (a process of their own) saw it after "
                      "start-up", "requests", "p50 ms", "p99 ms", "in metering", "p99 ms",
                      "outside", "p99 ms")]
                    + [(name, str(n), f"{p50:.1f}", f"{p99:.1f}", *cells(during, name),
                        *cells(outside, name))
                       for name, (n, p50, p99) in probed.items()]))
    worst_probed = max((p99 for _n, _p50, p99 in probed.values()), default=0.0)
    errors = sum(rec.errors.values())
    for name, example in rec.examples.items():
        print(f"  first error of {name}: {example}")
    placed = sorted(rec.placed)
    span = (placed[-1] - placed[0]) if len(placed) > 1 else 0.0
    rate = len(placed) / span if span else 0.0
    for kind, (n, mean, p50, p99) in passes.items():
        print(f"{kind}: {n} times, {mean * 1000:.0f} ms each on average, p50 ≤ "
              f"{p50 * 1000:g} ms, p99 ≤ {p99 * 1000:g} ms")
    if rec.placement_asks:
        print("asks for a placement pass (only the leader replica places): " + ", ".join(
            f"{k} {v:.0f}" for k, v in rec.placement_asks.items()))
    if sum(rec.heartbeat_answers.values()):
        queued, recorded = rec.heartbeat_answers["queued"], rec.heartbeat_answers["recorded"]
        print(f"agents' heartbeats (probes' included) answered once queued {queued:.0f}, "
              f"after their batch {recorded:.0f} ({recorded / (queued + recorded):.0%}: "
              "changed workers or offer, a machine's first, or batches stalled)")
    print("CPU used (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in rec.cpu.items())
          + f" of {psutil.cpu_count()}; 429s retried as agents do: {dict(rec.retried)}")
    inside_rows = [("route (inside the broker)", "requests", "p50 ≤ ms", "p99 ≤ ms")]
    worst_inside = 0.0
    for route, (n, p50, p99) in sorted(inside.items()):
        if route.endswith("/metrics"):
            continue
        worst_inside = max(worst_inside, p99)
        inside_rows.append((route, str(n), f"{p50 * 1000:g}", f"{p99 * 1000:g}"))
    print(table(inside_rows))
    lag = sorted(rec.loop_lag) or [0.0]
    lag_p99 = quantile(lag, 0.99)
    print(f"the generator's event loop ran timers late by p50 {statistics.median(lag) * 1000:.0f}"
          f" ms, p99 {lag_p99 * 1000:.0f} ms (included in the client-side latencies above)")
    print(f"the brokers' event loops ran timers late by p50 ≤ {broker_lag[1] * 1000:g} ms, "
          f"p99 ≤ {broker_lag[2] * 1000:g} ms (requests wait that long before they are read)")
    for i, row in enumerate(rec.by_replica, 1):
        print(f"replica-{i}{' (leader)' if row['leader'] else ''}: "
              f"{row['cpu_cores']:.2f} cores, event loop late by p50 ≤ "
              f"{row['loop_lag_ms_at_most']['p50']:g} ms, p99 ≤ "
              f"{row['loop_lag_ms_at_most']['p99']:g} ms; {row['heartbeats']} heartbeats, "
              f"p50 ≤ {row['heartbeat_ms_at_most']['p50']:g} ms, p99 ≤ "
              f"{row['heartbeat_ms_at_most']['p99']:g} ms inside it")
    polls = rec.answered.get("agent poll", 0)
    print(f"agents' long polls answered: {polls} ({polls / max(len(placed), 1):.2f} per lease "
          f"placed); agents' reports answered: {rec.answered.get('agent report', 0)}")
    if rec.statements:
        st = rec.statements
        print(f"PostgreSQL statements during the run: {st['all']} "
              f"({st['all'] / max(len(placed), 1):.1f} per lease placed), of which BEGIN "
              f"{st['begin']}, COMMIT {st['commit']}, ROLLBACK {st['rollback']}"
              + (f" (undercounted: {st['evictions']} evictions)" if st["evictions"] else ""))
        print("  most frequent (set-up included): " + "; ".join(
            f"{calls} × {text}" for text, calls in st["most frequent"].items()))
        print("  most time executing, lock waits included (ms, set-up included): " + "; ".join(
            f"{ms} ms in {calls} calls: {text}" for text, (ms, calls) in st["most time"].items()))
    if rec.transactions:
        print("PostgreSQL transactions (its statistics, start-up and the final closes "
              "included): " + ", ".join(f"{k} {v}" for k, v in rec.transactions.items()))
    print(f"{len(placed)} leases placed, {rate:.0f} placements/s while placing; "
          f"{errors} errors; worst endpoint p99 {worst:.1f} ms, in steady state "
          f"{worst_steady:.1f} ms, as the probes saw it after start-up {worst_probed:.1f} ms "
          "(target < 100 ms, 0 errors)")
    result = {"args": vars(args), "seconds": elapsed, "errors": errors,
              "placements_per_s": rate, "placed": len(placed), "worst_p99_ms": worst,
              "worst_p99_steady_ms": worst_steady,
              "worst_p99_probes_ms": worst_probed,
              "probe_endpoints": {name: {"requests": n, "p50_ms": p50, "p99_ms": p99}
                                  for name, (n, p50, p99) in probed.items()},
              "probe_endpoints_in_metering": {
                  name: {"requests": n, "p50_ms": p50, "p99_ms": p99}
                  for name, (n, p50, p99) in during.items()},
              "probe_endpoints_outside_metering": {
                  name: {"requests": n, "p50_ms": p50, "p99_ms": p99}
                  for name, (n, p50, p99) in outside.items()},
              "steady_endpoints": {name: {"requests": n, "p50_ms": p50, "p99_ms": p99}
                                   for name, (n, p50, p99) in steady.items()},
              "passes": {k: {"count": n, "mean_s": m, "p50_s_at_most": a, "p99_s_at_most": b}
                         for k, (n, m, a, b) in passes.items()},
              "placement_asks": rec.placement_asks, "answered": dict(rec.answered),
              "heartbeat_answers": rec.heartbeat_answers,
              "database_transactions": rec.transactions,
              "database_statements": rec.statements,
              "cpu_cores_used": rec.cpu, "retried_429": dict(rec.retried),
              "worst_p99_inside_broker_ms_at_most": worst_inside * 1000,
              "inside_broker": {route: {"requests": n, "p50_ms_at_most": p50 * 1000,
                                        "p99_ms_at_most": p99 * 1000}
                                for route, (n, p50, p99) in inside.items()},
              "probe_heartbeat_ms": probes,
              "by_window": [{"window": w, "p50_ms": a, "p99_ms": b}
                            for w, a, b in by_window(rec.timeline)],
              "by_window_of": {name: [{"window": w, "p50_ms": a, "p99_ms": b}
                                      for w, a, b in by_window(rec.timelines.get(name, []),
                                                               first=first)]
                               for name in WINDOWED},
              "by_replica": rec.by_replica,
              "broker_loop_lag_ms_at_most": {"p50": broker_lag[1] * 1000,
                                             "p99": broker_lag[2] * 1000},
              "generator_loop_lag_ms": {"p50": statistics.median(lag) * 1000,
                                        "p99": lag_p99 * 1000},
              "endpoints": {r[0]: {"requests": int(r[1]), "p50_ms": float(r[2]),
                                   "p99_ms": float(r[3]), "errors": int(r[4])}
                            for r in rows[1:]}}
    print(f"wrote {write('load', result)}")


if __name__ == "__main__":
    main()
