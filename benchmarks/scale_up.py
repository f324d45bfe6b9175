"""scale_up: seconds from `FederatedCluster()` (its scheduler process included) and from
`scale(4)` to 4 workers connected through two local provider agents, against
`LocalCluster(n_workers=4, threads_per_worker=1)` start-up, in the same run. The ratio compares
the whole start, which is what a user waits for.

Run: python -m benchmarks.scale_up [--repeat 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from distributed import LocalCluster

from benchmarks.common import quiet_logging, report, summary
from federation import FederatedCluster
from tests.utils.federation import make_federation


def time_federated(fed, token: str) -> tuple[float, float]:
    """(whole start, scale alone) in seconds."""
    made = time.perf_counter()
    with FederatedCluster(fed.url, token, worker_memory="1 GiB", dashboard=False,
                          heartbeat_interval=1) as cluster:
        start = time.perf_counter()
        cluster.scale(4)
        cluster.wait_for_workers(4, timeout=120)
        end = time.perf_counter()
        return end - made, end - start


def time_local() -> float:
    start = time.perf_counter()
    with LocalCluster(n_workers=4, threads_per_worker=1, dashboard_address=None) as cluster:
        cluster.wait_for_workers(4, timeout=120)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="Trials of each (default 5).")
    args = parser.parse_args()
    quiet_logging()
    with tempfile.TemporaryDirectory() as tmp:
        fed = make_federation(Path(tmp))
        try:
            fed.add_lab("lab-a", user="alice")
            fed.add_lab("lab-b")
            fed.add_agent("lab-a", "agent-a", cpus=2, memory="2 GiB")
            fed.add_agent("lab-b", "agent-b", cpus=2, memory="2 GiB")
            federated, scaled, local = [], [], []
            for _ in range(args.repeat):  # interleaved so drift hits both alike
                whole, scale = time_federated(fed, fed.user_tokens["alice"])
                federated.append(whole)
                scaled.append(scale)
                local.append(time_local())
        finally:
            fed.stop()
    fs, ss, ls = summary(federated), summary(scaled), summary(local)
    ratio = fs["median"] / ls["median"]
    report("scale_up", [("FederatedCluster() + scale(4), 2 agents, TLS", fs),
                        ("  of which scale(4) alone", ss),
                        ("LocalCluster(n_workers=4)", ls)], "s", ".2f", ratio, "<= 1.5",
           {"federated_s": fs, "scale_only_s": ss, "localcluster_s": ls})


if __name__ == "__main__":
    main()
