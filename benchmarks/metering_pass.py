"""metering_pass: the leader's periodic metering pass as the broker runs it
(``metering_runs.meter_pass``, in units, without its pauses) over --leases running leases
(default 10,000) whose lab buys from another lab, on PostgreSQL against SQLite in the same
run: wall time, the pass's own CPU and, on PostgreSQL, the server's CPU, for --periods whole
periods of each lease (default 1, as the broker's passes charge every metering interval).

PostgreSQL's CPU is what a pass takes from the requests on a machine that also runs the
database: the pass's process is niced (``--periodic-niceness``), the server is not. It is
read from the server's processes (/proc), so the server runs on this machine.

Run: python -m benchmarks.metering_pass [--leases 10000] [--periods 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

from benchmarks.common import postmaster_of, quiet_logging, server_cpu, table, write
from federation.broker.metering_runs import meter_pass
from tests.utils.in_process import ADMIN_TOKEN, in_process_broker, scraped
from tests.utils.postgres import fresh_database, postgres_server
from tests.utils.procs import wait_until

#: CPUs of each simulated machine (the leases take one each).
MACHINE_CPUS = 64
#: Seconds of the broker's provider and cluster timeouts.
TIMEOUT = 180.0


def passes(db_url: str, leases: int, periods: int, repeat: int) -> list[dict]:
    """Set up ``leases`` running leases of lab-a's user on lab-b's machines, then time
    ``repeat`` passes, each ``periods`` metering intervals after the last."""
    interval = 3600.0
    postgres = postmaster_of(db_url) if db_url.startswith("postgresql") else None
    # The machines do not heartbeat: the timeouts outlast the run (the reaper ticks every
    # sixth of them).
    with in_process_broker(db_url, 1, rate_limit=1e9, rate_burst=1e9,
                           metering_interval=interval, provider_timeout=TIMEOUT,
                           cluster_timeout=TIMEOUT) as b:
        broker = b.app.state.broker
        # The broker's own first pass, over one lease, before the leases are made: its next
        # comes an interval later, so none runs beside the timed ones.
        wait_until(lambda: scraped(b.client, "parallex_metering_pass_seconds_count") >= 1,
                   TIMEOUT / 6 + 30, "the broker's own first pass")
        assert b.call(ADMIN_TOKEN, "POST", "/labs", json={"name": "lab-b"}).status_code == 201
        seller = b.call(ADMIN_TOKEN, "POST", "/tokens", json={
            "kind": "provider", "lab": "lab-b"}).json()["token"]
        for i in range(leases // MACHINE_CPUS + 1):
            answer = b.call(seller, "POST", "/agent/register", json={
                "name": f"big-{i}", "cpus": MACHINE_CPUS, "memory": "512 GiB"})
            assert answer.status_code == 201, answer.text
        b.run_leases([f"ls-meter{i:06d}" for i in range(leases)])
        at = dt.datetime.now(dt.UTC)
        out = []
        for _ in range(repeat):
            at += dt.timedelta(seconds=interval * periods)
            before = server_cpu(postgres) if postgres else {}
            cpu, began = time.process_time(), time.monotonic()
            recorded = meter_pass(broker.engine, broker.settings, at, pause=lambda _s: None)
            wall, cpu = time.monotonic() - began, time.process_time() - cpu
            after = server_cpu(postgres) if postgres else {}
            # Processes that ended meanwhile drop out; the pass's backend stays.
            server = sum(v - before.get(pid, 0.0) for pid, v in after.items())
            assert recorded is not None and recorded >= leases * periods, recorded
            out.append({"periods": recorded, "wall_s": wall, "pass_cpu_s": cpu,
                        "server_cpu_s": server if postgres else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=10_000, help="Running leases (10000).")
    parser.add_argument("--periods", type=int, default=1,
                        help="Whole periods of each lease a pass charges (1).")
    parser.add_argument("--repeat", type=int, default=2, help="Passes on each database (2).")
    args = parser.parse_args()
    quiet_logging()
    with postgres_server() as server:
        pg = passes(fresh_database(server, "metering_pass"), args.leases, args.periods,
                    args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        lite = passes(f"sqlite:///{Path(tmp) / 'broker.db'}", args.leases, args.periods,
                      args.repeat)
    rows = [("database", "periods", "wall s", "pass CPU s", "PostgreSQL CPU s")]
    for name, runs in (("PostgreSQL", pg), ("SQLite", lite)):
        for r in runs:
            rows.append((name, f"{r['periods']:,}", f"{r['wall_s']:.2f}",
                         f"{r['pass_cpu_s']:.2f}",
                         "—" if r["server_cpu_s"] is None else f"{r['server_cpu_s']:.2f}"))
    print(table(rows))
    ratio = min(r["wall_s"] for r in pg) / min(r["wall_s"] for r in lite)
    print(f"wall time PostgreSQL/SQLite (best of each): {ratio:.2f}")
    result = {"args": vars(args), "postgresql": pg, "sqlite": lite, "ratio": ratio}
    print(f"wrote {write('metering_pass', result)}")


if __name__ == "__main__":
    main()
