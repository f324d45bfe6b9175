"""prune: `parallex db prune` over a federation's old usage records, beside a plain DELETE.

PostgreSQL with ``--leases`` leases of one cluster that ended 60 days ago, each with
``--periods`` usage records (a minute each), and a broker serving another lab's user's
``GET /clusters`` (one cluster of their own) at 10 a second.
The database is copied (``CREATE DATABASE ... TEMPLATE``), then on each copy in turn, while
the user reads: ``parallex db prune --keep-days 31``'s work, in this process (batches of
2,000 leases, each lease's sums kept for its job record), and the peer, what an
administrator could run by hand: one ``DELETE FROM usagerecord WHERE period_end <
<horizon>`` (which keeps nothing). Prints each
one's time and records a second, the user's read latencies quiet and during each, and the
ratio prune / DELETE of the times.

Run: python -m benchmarks.prune [--leases 10000] [--periods 60] [--requests 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg

from benchmarks.common import table, write
from benchmarks.setup_db import setting_up
from federation.broker import db
from federation.broker.retention import horizon, prune
from federation.tls import ClusterAuthority
from tests.utils.postgres import fresh_database, postgres_server
from tests.utils.procs import start_broker

PACE = 0.1  # seconds between the user's reads


def seed(url: str, leases: int, periods: int) -> None:
    """``leases`` leases of the one cluster on the one machine, ended and charged 60 days
    ago, ``periods`` one-minute records each."""
    ended = dt.datetime.now(dt.UTC) - dt.timedelta(days=60)
    with psycopg.connect(url, autocommit=True) as c:
        cluster, user, lab = c.execute(
            "SELECT cluster.id, user_id, lab_id FROM cluster JOIN lab ON lab.id = lab_id "
            "WHERE lab.name = 'lab-a'").fetchone()
        provider = c.execute("SELECT id FROM provider").fetchone()[0]
        c.execute("""
            INSERT INTO lease (id, cluster_id, provider_id, "group", cpus, memory, gpus,
              gpu_indices_json, state, end_reason, message, worker_csr, worker_cert,
              created_at, assigned_at, started_at, ended_at, metered_until, suspensions_json)
            SELECT 'ls-old' || g, %(cluster)s, %(provider)s, 'default', 1, 1073741824, 0, '[]',
              'ended', 'released', '', '', '', t - %(span)s, t - %(span)s, t - %(span)s, t, t,
              '[]'
            FROM generate_series(1, %(leases)s) g,
              LATERAL (SELECT %(ended)s::timestamptz + g * interval '1 ms' AS t) x""",
                  {"cluster": cluster, "provider": provider, "leases": leases, "ended": ended,
                   "span": dt.timedelta(minutes=periods)})
        c.execute("""
            INSERT INTO usagerecord (lease_id, period_start, period_end, seconds, cpus, memory,
              gpus, pcu_per_hour, charge, earned, cloud_cost, consumer_lab_id,
              provider_lab_id, provider_id, user_id, self_use, reliability, price_version_id)
            SELECT 'ls-old' || g, t - (p + 1) * interval '1 min', t - p * interval '1 min', 60,
              1, 1073741824, 0, 1.0, 16666667, 15000000, 0.0008, %(lab)s, %(lab)s + 1,
              %(provider)s, %(user)s, false, 1.0, 1
            FROM generate_series(1, %(leases)s) g, generate_series(0, %(periods)s - 1) p,
              LATERAL (SELECT %(ended)s::timestamptz + g * interval '1 ms' AS t) x""",
                  {"lab": lab, "provider": provider, "user": user, "leases": leases,
                   "periods": periods, "ended": ended})
        c.execute("VACUUM ANALYZE")


def reads(client: httpx.Client, stop: threading.Event | None, count: int) -> list[float]:
    """Milliseconds per ``GET /clusters``, one every PACE seconds: ``count`` of them, or
    until ``stop`` is set."""
    out = []
    while (stop is None and len(out) < count) or (stop is not None and not stop.is_set()):
        start = time.perf_counter()
        client.get("/clusters").raise_for_status()
        out.append((time.perf_counter() - start) * 1000)
        time.sleep(PACE)
    return out


def timed(work, client: httpx.Client) -> tuple[float, list[float]]:
    """Seconds ``work()`` took, and the user's reads meanwhile."""
    stop = threading.Event()
    seen: list[float] = []
    reader = threading.Thread(target=lambda: seen.extend(reads(client, stop, 0)))
    reader.start()
    start = time.perf_counter()
    try:
        work()
    finally:
        took = time.perf_counter() - start
        stop.set()
        reader.join()
    return took, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leases", type=int, default=10_000,
                        help="leases ended 60 days ago (default 10000)")
    parser.add_argument("--periods", type=int, default=60,
                        help="one-minute usage records per lease (default 60)")
    parser.add_argument("--requests", type=int, default=100,
                        help="the user's quiet reads before each run (default 100)")
    args = parser.parse_args()
    admin = secrets.token_urlsafe(24)
    cut = horizon(dt.datetime.now(dt.UTC), 31)
    results = {}
    with postgres_server() as server, tempfile.TemporaryDirectory() as tmp:
        url = fresh_database(server, "prune_a")
        with setting_up(Path(tmp), url, admin, ("lab-a", "lab-b")) as client:
            user, reader = (client.post("/tokens", json={
                "kind": "user", "lab": lab, "user": name}).raise_for_status().json()["token"]
                for name, lab in (("alice", "lab-a"), ("bob", "lab-b")))
            agent = client.post("/tokens", json={"kind": "provider", "lab": "lab-b"}
                                ).raise_for_status().json()["token"]
            for token in (user, reader):
                client.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                               "ca_cert": ClusterAuthority().ca_pem},
                            headers={"Authorization": f"Bearer {token}"}).raise_for_status()
            client.post("/agent/register", json={"name": "box", "cpus": 4, "memory": "8 GiB"},
                        headers={"Authorization": f"Bearer {agent}"}).raise_for_status()
        headers = {"Authorization": f"Bearer {reader}"}
        began = time.perf_counter()
        seed(url, args.leases, args.periods)
        print(f"seeded {args.leases:,} leases, {args.leases * args.periods:,} records in "
              f"{time.perf_counter() - began:.0f} s")
        base = url.rsplit("/", 1)[0]
        with psycopg.connect(f"{base}/postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE prune_b TEMPLATE prune_a")
        copies = {"parallex db prune": url, "DELETE (peer)": f"{base}/prune_b"}
        for name, db_url in copies.items():
            broker, broker_url = start_broker(Path(tmp), admin, db_url=db_url,
                                              name=f"broker-{len(results)}")
            try:
                with httpx.Client(base_url=f"{broker_url}/api/v1", timeout=60,
                                  headers=headers) as client:
                    quiet = reads(client, None, args.requests)
                    if name.startswith("parallex"):
                        def work(db_url=db_url):
                            # In this process, as the DELETE runs (the command's start-up,
                            # ~1 s, is not the prune's).
                            engine = db.plain_engine(db_url)
                            done = prune(engine, 31)
                            engine.dispose()
                            print(f"pruned {done.leases:,} leases' {done.records:,} records")
                    else:
                        def work(db_url=db_url):
                            with psycopg.connect(db_url, autocommit=True) as c:
                                c.execute("DELETE FROM usagerecord WHERE period_end < %s",
                                          (cut,))
                    took, during = timed(work, client)
            finally:
                broker.stop()
            with psycopg.connect(db_url) as c:
                left = c.execute("SELECT count(*) FROM usagerecord").fetchone()[0]
            results[name] = {"seconds": took, "records_left": left, "quiet_ms": quiet,
                             "during_ms": during,
                             "records_per_s": args.leases * args.periods / took}
        db.plain_engine(url).dispose()

    def ms(samples: list[float]) -> str:
        s = sorted(samples)
        return (f"{statistics.median(s):.1f} / {s[int(0.9 * len(s))]:.1f} / {s[-1]:.1f}"
                if s else "—")

    rows = [("", "seconds", "records/s", "records left", "reads quiet ms (p50/p90/max)",
             "reads during ms")]
    for name, r in results.items():
        rows.append((name, f"{r['seconds']:.1f}", f"{r['records_per_s']:,.0f}",
                     f"{r['records_left']:,}", ms(r["quiet_ms"]), ms(r["during_ms"])))
    print(table(rows))
    ratio = results["parallex db prune"]["seconds"] / results["DELETE (peer)"]["seconds"]
    print(f"ratio of times, prune / DELETE: {ratio:.2f}")
    written = write("prune", {"args": vars(args), "results": results, "ratio": ratio})
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
