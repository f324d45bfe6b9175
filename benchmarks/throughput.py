"""throughput: 20,000 tiny tasks on 2 one-thread federated workers (TLS) against a LocalCluster
with 2 one-thread workers (tcp), in the same run; reports tasks per second and their ratio.

Run: python -m benchmarks.throughput [--tasks 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from benchmarks.common import quiet_logging, report, summary
from federation import FederatedCluster
from tests.utils.federation import make_federation


def inc(x: int) -> int:
    return x + 1


def rate(client: Client, tasks: int) -> float:
    start = time.perf_counter()
    results = client.gather(client.map(inc, range(tasks), pure=False))
    elapsed = time.perf_counter() - start
    assert results[-1] == tasks
    return tasks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000, help="Tasks per trial (20000).")
    parser.add_argument("--repeat", type=int, default=3, help="Trials of each (default 3).")
    args = parser.parse_args()
    quiet_logging()
    with tempfile.TemporaryDirectory() as tmp:
        fed = make_federation(Path(tmp))
        try:
            fed.add_lab("lab-a", user="alice")
            fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB")
            with (FederatedCluster(fed.url, fed.user_tokens["alice"], worker_memory="1 GiB",
                                   dashboard=False) as fc,
                  LocalCluster(n_workers=2, threads_per_worker=1, protocol="tcp",
                               dashboard_address=None) as lc):
                fc.scale(2)
                fc.wait_for_workers(2, timeout=120)
                with fc.get_client() as f_client, Client(lc) as l_client:
                    rate(f_client, 1000)  # warm both up: imports, connections
                    rate(l_client, 1000)
                    federated, local = [], []
                    for _ in range(args.repeat):
                        federated.append(rate(f_client, args.tasks))
                        local.append(rate(l_client, args.tasks))
        finally:
            fed.stop()
    fs, ls = summary(federated), summary(local)
    ratio = fs["median"] / ls["median"]
    report("throughput", [("FederatedCluster, 2x1 thread, TLS", fs),
                          ("LocalCluster, 2x1 thread, tcp", ls)], "tasks/s", ".0f", ratio,
           ">= 0.95", {"tasks": args.tasks, "federated_tasks_per_s": fs,
                       "localcluster_tasks_per_s": ls})


if __name__ == "__main__":
    main()
