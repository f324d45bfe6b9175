"""wan: Parallex across a wide-area network against a LocalCluster behind the same delay.

Latency comes from a userspace relay (tests/utils/delay_relay.py) that holds each direction for
half the round trip. Topology, as on a real federation:

- Parallex: the client and the scheduler are on the hub; the 4 workers (one 4-CPU agent) dial
XX, so
  every worker's traffic, to the scheduler and to other workers (relayed by the gateway),
  crosses it. A worker-to-worker transfer crosses it twice: out of one site, into another.
- Peer: a LocalCluster's scheduler (same machine as the client); 4 `dask worker` processes
  reach it through the relay and are reached through it too (--contact-address on the relay).
- "Parallex, Dask defaults" is the same federation with parallex.scheduler.latency-settings
  emptied: what the federation's scheduler settings are worth.

At each round trip (0, 10, 20, 40 ms; the relay's measured round trip is printed): scale(4) →
ready, tiny-task throughput (client.map of an increment) and a P2P merge. Each figure is the
median of --repeat trials; ratios are against the same cluster at 0 ms. Targets at 20 ms:
throughput ≥ 0.8×, merge ≥ 0.7× of 0 ms.

Run: python -m benchmarks.wan [--tasks 2000] [--rows 2000000] [--repeat 3] [--rtts 0,10,20,40]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client, LocalCluster

from benchmarks.common import quiet_logging, table, write
from federation import FederatedCluster, latency
from federation.ports import free_port
from tests.utils.delay_relay import Relay
from tests.utils.federation import make_federation
from tests.utils.procs import Proc, wait_until

WORKERS = 4
PARTITIONS = 8
CLUSTERS = ("Parallex", "Parallex, Dask defaults", "LocalCluster")


# inc, tiny_rate, make_part and merge_seconds repeat benchmarks/throughput.py and shuffle.py on
# purpose: defined in __main__ they travel to the workers by value, and workers (in their
# lease folders) cannot import benchmarks/. Distributed pickles a task holding an imported
# function by reference, even with cloudpickle.register_pickle_by_value.
def inc(x: int) -> int:
    return x + 1


def tiny_rate(client: Client, tasks: int) -> float:
    start = time.perf_counter()
    results = client.gather(client.map(inc, range(tasks), pure=False))
    elapsed = time.perf_counter() - start
    assert results[-1] == tasks
    return tasks / elapsed


def make_part(seed: int, rows: int, keys: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"key": rng.integers(0, keys, rows), "value": rng.random(rows)})


def merge_seconds(client: Client, rows: int) -> float:
    per_part = rows // PARTITIONS
    left = dd.from_map(make_part, range(PARTITIONS), rows=per_part, keys=rows)
    right = dd.from_map(make_part, range(PARTITIONS, 2 * PARTITIONS), rows=per_part, keys=rows)
    start = time.perf_counter()
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        n = client.compute(left.merge(right, on="key").size).result()
    elapsed = time.perf_counter() - start
    assert n > 0
    return elapsed


def measure(client: Client, args: argparse.Namespace) -> dict:
    tiny_rate(client, 200)  # connections, imports
    rates = [tiny_rate(client, args.tasks) for _ in range(args.repeat)]
    merges = [merge_seconds(client, args.rows) for _ in range(args.repeat)]
    return {"tasks_per_s": statistics.median(rates), "merge_s": statistics.median(merges)}


def worker_round_trip(client: Client) -> float:
    """Median round trip from the scheduler to the workers in ms, measured as a
    FederatedCluster measures it (federation.latency)."""
    async def measured(dask_scheduler) -> dict[str, float]:
        return await latency.measure(dask_scheduler, list(dask_scheduler.workers))

    return statistics.median(client.run_on_scheduler(measured).values()) * 1000


# ---- Parallex ---------------------------------------------------------------------------------

@contextlib.contextmanager
def federation(tmp: Path) -> Iterator[tuple[object, Relay]]:
    gateway = free_port()
    relay = Relay([("127.0.0.1", gateway)])
    fed = make_federation(tmp, broker_args=("--gateway", f"127.0.0.1:{gateway}",
                                            "--gateway-public",
                                            f"127.0.0.1:{relay.ports[0]}"))
    try:
        fed.add_lab("lab-a", user="alice")
        # Two 2-CPU agents: an agent offers no more CPUs than its machine has.
        fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB")
        fed.add_agent("lab-a", "agent-b", cpus=2, memory="4 GiB")
        yield fed, relay
    finally:
        fed.stop()
        relay.stop()


def parallex_level(fed, relay: Relay, rtt: float, args, settings: dict | None) -> dict:
    relay.set_rtt(rtt)
    overrides = {} if settings is None else {"parallex.scheduler.latency-settings": settings}
    with dask.config.set(overrides), FederatedCluster(
            fed.url, fed.user_tokens["alice"], worker_memory="1 GiB", dashboard=False,
            quiet=True) as cluster:
        start = time.perf_counter()
        cluster.scale(WORKERS)
        cluster.wait_for_workers(WORKERS, timeout=300)
        ready = time.perf_counter() - start
        with cluster.get_client() as client:
            out = {"ready_s": ready, **measure(client, args)}
            trips = cluster.round_trips()
            out["measured_rtt_ms"] = statistics.median(trips.values()) * 1000
    return out


# ---- LocalCluster behind the relay -------------------------------------------------------------

def local_level(tmp: Path, rtt: float, args) -> dict:
    with LocalCluster(n_workers=0, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        port = int(cluster.scheduler_address.rsplit(":", 1)[1])
        listen = [free_port() for _ in range(WORKERS)]
        relay = Relay([("127.0.0.1", port)] + [("127.0.0.1", p) for p in listen])
        workers: list[Proc] = []
        try:
            relay.set_rtt(rtt)
            start = time.perf_counter()
            for i, (own, public) in enumerate(zip(listen, relay.ports[1:], strict=True)):
                workers.append(Proc(
                    [sys.executable, "-m", "distributed.cli.dask_worker",
                     f"tcp://127.0.0.1:{relay.ports[0]}", "--nthreads", "1",
                     "--memory-limit", "1GiB", "--no-nanny", "--no-dashboard",
                     "--listen-address", f"tcp://127.0.0.1:{own}",
                     "--contact-address", f"tcp://127.0.0.1:{public}", "--name", f"w{i}"],
                    tmp / f"local-worker-{i}.log"))
            client.wait_for_workers(WORKERS, timeout=300)
            ready = time.perf_counter() - start
            out = {"ready_s": ready, **measure(client, args),
                   "measured_rtt_ms": worker_round_trip(client)}
            client.retire_workers(list(client.scheduler_info()["workers"]))
            wait_until(lambda: not client.scheduler_info()["workers"], 60,
                       "the LocalCluster's workers to leave")
            return out
        finally:
            for worker in workers:
                worker.stop()
            relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000, help="Tiny tasks per trial (2000).")
    parser.add_argument("--rows", type=int, default=2_000_000,
                        help="Rows of each side of the merge (2000000; at 400000 the merge "
                             "is mostly round trips).")
    parser.add_argument("--repeat", type=int, default=3, help="Trials per figure (3).")
    parser.add_argument("--rtts", default="0,10,20,40",
                        help="Round trips to measure at, in ms, comma-separated (0,10,20,40).")
    args = parser.parse_args()
    rtts = [float(x) for x in args.rtts.split(",")]
    quiet_logging()
    results: dict[str, dict[float, dict]] = {name: {} for name in CLUSTERS}
    with tempfile.TemporaryDirectory() as tmp, federation(Path(tmp)) as (fed, relay):
        for rtt in rtts:
            results["Parallex"][rtt] = parallex_level(fed, relay, rtt, args, None)
            results["Parallex, Dask defaults"][rtt] = parallex_level(fed, relay, rtt, args, {})
            results["LocalCluster"][rtt] = local_level(Path(tmp), rtt, args)
            print(f"{rtt:g} ms: " + "; ".join(
                f"{name}: {r[rtt]['tasks_per_s']:.0f} tasks/s, merge {r[rtt]['merge_s']:.2f} s, "
                f"ready {r[rtt]['ready_s']:.2f} s, measured {r[rtt]['measured_rtt_ms']:.1f} ms"
                for name, r in results.items()), flush=True)
    rows = [("cluster", "RTT ms", "measured ms", "tasks/s", "× at 0", "merge s", "× at 0",
             "ready s")]
    for name in CLUSTERS:
        base = results[name][rtts[0]]
        for rtt in rtts:
            r = results[name][rtt]
            rows.append((name, f"{rtt:g}", f"{r['measured_rtt_ms']:.1f}",
                         f"{r['tasks_per_s']:.0f}", f"{r['tasks_per_s'] / base['tasks_per_s']:.2f}",
                         f"{r['merge_s']:.2f}", f"{base['merge_s'] / r['merge_s']:.2f}",
                         f"{r['ready_s']:.2f}"))
    print(table(rows))
    at20 = results["Parallex"].get(20.0)
    if at20 and 0.0 in results["Parallex"]:
        base = results["Parallex"][0.0]
        print(f"Parallex at 20 ms: throughput {at20['tasks_per_s'] / base['tasks_per_s']:.2f}× "
              f"(target ≥ 0.8), merge {base['merge_s'] / at20['merge_s']:.2f}× (target ≥ 0.7) "
              "of 0 ms")
    for rtt in rtts:
        p, loc = results["Parallex"][rtt], results["LocalCluster"][rtt]
        print(f"{rtt:g} ms, Parallex/LocalCluster: throughput "
              f"{p['tasks_per_s'] / loc['tasks_per_s']:.2f}, merge speed "
              f"{loc['merge_s'] / p['merge_s']:.2f}, "
              f"ready speed {loc['ready_s'] / p['ready_s']:.2f}")
    saved = {name: {f"{rtt:g}": r for rtt, r in by_rtt.items()}
             for name, by_rtt in results.items()}
    print(f"wrote {write('wan', {'results': saved, 'args': vars(args)})}")


if __name__ == "__main__":
    main()
