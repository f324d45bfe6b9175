"""end_metering: what charging a burst of lease ends costs the broker, with its end-metering
batches spaced (``--end-metering-spacing``, 10 s by default) against unspaced (0, every
batch as soon as the last one ended: the broker before 2026-12-02), in the same run.

A broker app runs in this process on PostgreSQL with one cluster of --leases leases
(default 200, 1 CPU each) running on four machines. The cluster releases them all, and
their agents report them ended in --groups report requests' worth (default 20 groups of
10), 0.2 s apart, as agents that stopped their workers do. Counted until every end is
charged: the end meterer's batches, its statements (each a round trip, with the labs'
balance rows locked, under load) and how long the last charge took after the first report.

Run: python -m benchmarks.end_metering [--leases 200] [--groups 20]
"""

from __future__ import annotations

import argparse
import threading
import time

from sqlalchemy import event, func
from sqlmodel import select

from benchmarks.common import table, write
from federation.broker.models import END_NOT_CHARGED, Lease
from tests.utils.in_process import in_process_broker
from tests.utils.postgres import fresh_database, postgres_server
from tests.utils.procs import wait_until

#: The end meterer's thread (service.py names it so).
METERER = "parallex-end-meterer"


def burst(db_url: str, spacing: float, leases: int, groups: int) -> dict:
    """One broker, one burst of ``leases`` ends; what charging them took."""
    # The periodic metering pass, which also charges ended leases, only after the burst is
    # done: what is counted is the end meterer's work alone.
    with in_process_broker(db_url, 1, rate_limit=1e9, rate_burst=1e9, metering_interval=3600,
                           end_metering_spacing=spacing) as b:
        broker = b.app.state.broker
        for i in range(4):
            assert b.call(b.agent, "POST", "/agent/register", json={
                "name": f"big-{i}", "cpus": 64, "memory": "256 GiB"}).status_code == 201
        ids = [f"ls-burst{i:05d}" for i in range(leases)]
        answer = b.run_leases(ids)
        on = {le["id"]: le["provider_id"] for le in answer.json()["leases"]
              if le["state"] == "running"}
        assert set(ids) <= set(on), "every lease runs before the burst"
        assert b.call(b.user, "POST", f"/clusters/{b.cid}/leases/release",
                      json={"lease_ids": ids}).status_code == 200

        # The reaper's first metering pass comes a few seconds after start: it must come
        # before the burst, not charge its ends in the end meterer's place.
        wait_until(lambda: broker._last_metering, 60, "the first periodic metering pass")
        statements = 0

        def count(*_args) -> None:
            nonlocal statements
            if threading.current_thread().name == METERER:
                statements += 1

        event.listen(broker.engine, "before_cursor_execute", count)
        batches = broker.end_meterer.passes
        started = time.monotonic()
        size = max(1, leases // groups)
        for k in range(0, leases, size):
            for lease_id in ids[k:k + size]:
                answer = b.call(b.agent, "POST",
                                f"/agent/{on[lease_id]}/leases/{lease_id}/state",
                                json={"state": "ended", "reason": "released"})
                assert answer.status_code == 200, answer.text
            time.sleep(0.2)
        def all_charged() -> bool:
            with broker.session() as s:
                return not s.exec(select(func.count()).select_from(Lease)
                                  .where(END_NOT_CHARGED)).one()

        wait_until(all_charged, 60, "every end charged")
        charged_after = time.monotonic() - started
        return {"spacing_s": spacing, "batches": broker.end_meterer.passes - batches,
                "statements": statements, "all_charged_after_s": charged_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=200, help="leases ending (200)")
    parser.add_argument("--groups", type=int, default=20,
                        help="report requests' worth they end in, 0.2 s apart (20)")
    args = parser.parse_args()
    with postgres_server() as server:
        runs = [burst(fresh_database(server, f"end_metering_{n}"), spacing, args.leases,
                      args.groups) for n, spacing in enumerate((0.0, 10.0))]
    unspaced, spaced = runs
    print(table([("end-metering spacing", "batches", "statements", "all charged after s")]
                + [(f"{r['spacing_s']:g} s", str(r["batches"]), str(r["statements"]),
                    f"{r['all_charged_after_s']:.1f}") for r in runs]))
    ratio = spaced["statements"] / unspaced["statements"]
    print(f"statements spaced/unspaced: {ratio:.3f} (target: fewer than a tenth)")
    print(f"wrote {write('end_metering', {'args': vars(args), 'runs': runs, 'ratio': ratio})}")


if __name__ == "__main__":
    main()
