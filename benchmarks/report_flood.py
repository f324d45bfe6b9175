"""report_flood: a PI's heavy usage report read from 50 connections, and what it does to
another lab's cluster view, with the reports' concurrency limit and without it.

PostgreSQL with ``--records`` usage records in today's hours (half of them the PI's lab's),
so a report of today from one second past midnight reads that part of the day's records
(~0.2-0.3 s here). A broker with the default ``--max-concurrent-reports`` (2), then one on
the same database with 1,000 (no limit: as the broker was before the limit), each flooded
by the PI's report from ``--flooders`` connections while another lab's user reads their
clusters (``GET /clusters``) at 10 a second, the pace of the cluster endpoints' rate limit.
The user's quiet reads just before each flood are the baseline. Prints medians, p90s and
maxima and the ratio of the flooded medians, no limit / limit.

Run: python -m benchmarks.report_flood [--records 1200000] [--requests 30] [--flooders 50]
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import table, write
from benchmarks.setup_db import setting_up
from federation.broker import db
from tests.utils.flood import Flood
from tests.utils.postgres import fresh_database, postgres_server
from tests.utils.procs import start_broker, wait_until

PACE = 0.1  # seconds between the user's reads: under the cluster endpoints' 20 a second
UNLIMITED = 1000


def seed(url: str, records: int) -> None:
    """Usage records spread over today's hours so far, half of them lab-a's (the PI's)."""
    engine = db.make_engine(url)
    midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with engine.begin() as c:
        lab = c.exec_driver_sql("SELECT id FROM lab WHERE name = 'lab-a'").scalar()
        user = c.exec_driver_sql("SELECT id FROM \"user\" WHERE name = 'pia'").scalar()
        c.exec_driver_sql(f"""
            INSERT INTO usagerecord (lease_id, period_start, period_end, seconds, cpus, memory,
              gpus, pcu_per_hour, charge, earned, cloud_cost, consumer_lab_id,
              provider_lab_id, provider_id, user_id, self_use, reliability, price_version_id)
            SELECT 'lease-' || mod(g, 10000), ts - interval '60 s', ts, 60, 1, 1073741824, 0,
              1.0, 1000, 900, 0.01, CASE WHEN mod(g, 2) = 0 THEN {lab} ELSE {lab} + 1000 END,
              {lab} + 1001, 'machine', {user}, false, 1.0, 1
            FROM generate_series(1, {records}) g, LATERAL (
              SELECT timestamptz '{midnight.isoformat()}' + (g::float8 / {records})
                * (now() - timestamptz '{midnight.isoformat()}') AS ts) x""")
    with engine.connect() as c:
        c.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()


def reads(client: httpx.Client, requests: int) -> list[float]:
    """Seconds per ``GET /clusters``, one every PACE seconds."""
    out = []
    for _ in range(requests):
        start = time.perf_counter()
        client.get("/clusters").raise_for_status()
        out.append(time.perf_counter() - start)
        time.sleep(PACE)
    return out


def flooded(tmp: Path, url: str, admin: str, tokens: dict[str, str], limit: int,
            args: argparse.Namespace) -> dict:
    """The user's reads quiet and during the PI's flood, on a broker with ``limit``."""
    broker, broker_url = start_broker(tmp, admin, db_url=url, name=f"broker-{limit}",
                                      extra=("--max-concurrent-reports", str(limit)))
    since = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=1, microsecond=0)
    params = {"since": since.isoformat(), "by": "user"}
    try:
        with httpx.Client(base_url=f"{broker_url}/api/v1", timeout=300, headers={
                "Authorization": f"Bearer {tokens['bob']}"}) as bob, httpx.Client(
                base_url=f"{broker_url}/api/v1", timeout=300, headers={
                    "Authorization": f"Bearer {tokens['pia']}"}) as pia:
            start = time.perf_counter()
            pia.get("/usage", params=params).raise_for_status()
            one_report = time.perf_counter() - start
            quiet = reads(bob, args.requests)
            with Flood(broker_url, tokens["pia"], None, args.flooders, path="/usage",
                       params=params) as flood:
                wait_until(lambda: sum(flood.statuses.values()) >= 10, 300,
                           "the flood to be under way")
                during = reads(bob, args.requests)
                statuses = dict(flood.statuses)
    finally:
        broker.stop()
    return {"one_report_s": one_report, "quiet_ms": [s * 1000 for s in quiet],
            "flooded_ms": [s * 1000 for s in during], "flood_statuses": statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_200_000,
                        help="usage records of today (default 1200000)")
    parser.add_argument("--requests", type=int, default=30,
                        help="the other user's reads measured each way (default 30)")
    parser.add_argument("--flooders", type=int, default=50,
                        help="connections the PI's report is read from at once (default 50)")
    args = parser.parse_args()
    admin = secrets.token_urlsafe(24)
    with postgres_server() as server, tempfile.TemporaryDirectory() as tmp:
        url = fresh_database(server, "report_flood")
        with setting_up(Path(tmp), url, admin, ("lab-a", "lab-b")) as client:
            client.put("/labs/lab-a/members/pia", json={"role": "pi"}).raise_for_status()
            client.put("/labs/lab-b/members/bob", json={"role": "member"}).raise_for_status()
            tokens = {user: client.post("/tokens", json={
                "kind": "user", "lab": lab, "user": user}).raise_for_status().json()["token"]
                for user, lab in (("pia", "lab-a"), ("bob", "lab-b"))}
        seed(url, args.records)
        runs = {limit: flooded(Path(tmp), url, admin, tokens, limit, args)
                for limit in (2, UNLIMITED)}

    def row(label: str, samples: list[float]) -> tuple[str, ...]:
        ms = sorted(samples)
        return (label, f"{statistics.median(ms):.1f}", f"{ms[int(0.9 * len(ms))]:.1f}",
                f"{ms[-1]:.1f}")

    rows = [("GET /clusters of another lab's user", "median ms", "p90 ms", "max ms")]
    for limit, name in ((2, "limit 2 (default)"), (UNLIMITED, "no limit")):
        rows += [row(f"{name}: quiet", runs[limit]["quiet_ms"]),
                 row(f"{name}: during the flood", runs[limit]["flooded_ms"])]
    print(table(rows))
    for limit in (2, UNLIMITED):
        print(f"--max-concurrent-reports {limit}: one report {runs[limit]['one_report_s']:.2f} s,"
              f" flood answered {runs[limit]['flood_statuses']}")
    ratio = (statistics.median(runs[UNLIMITED]["flooded_ms"])
             / statistics.median(runs[2]["flooded_ms"]))
    print(f"ratio of flooded medians, no limit / limit: {ratio:.1f}")
    written = write("report_flood", {"args": vars(args), "limit_2": runs[2],
                                     "no_limit": runs[UNLIMITED], "ratio": ratio})
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
