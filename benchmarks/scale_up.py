"""scale_up: seconds from `scale(4)` to 4 workers connected through two local provider agents
(their warm interpreters ready, as on an idle lab machine), against
`LocalCluster(n_workers=4, threads_per_worker=1)` start-up, in the same run; the ratio is
scale(4)'s (target <= 0.25). Also printed: the whole start, `FederatedCluster()` (its
scheduler process included) + scale(4), which is what a user waits for in a first cell.

Each LocalCluster is timed only after the agents' pools have refilled, so the peer never
shares the CPUs with interpreters being started.

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
from tests.utils.procs import wait_warm


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
            agents = [fed.add_agent("lab-a", "agent-a", cpus=2, memory="2 GiB",
                                    extra=("--warm-workers", "2")),
                      fed.add_agent("lab-b", "agent-b", cpus=2, memory="2 GiB",
                                    extra=("--warm-workers", "2"))]
            federated, scaled, local = [], [], []
            for agent in agents:
                wait_warm(agent, 2)
            for _ in range(args.repeat):  # interleaved so drift hits both alike
                whole, scale = time_federated(fed, fed.user_tokens["alice"])
                federated.append(whole)
                scaled.append(scale)
                for agent in agents:
                    wait_warm(agent, 2)
                local.append(time_local())
        finally:
            fed.stop()
    fs, ss, ls = summary(federated), summary(scaled), summary(local)
    ratio = ss["median"] / ls["median"]
    whole = fs["median"] / ls["median"]
    report("scale_up", [("scale(4), 2 agents, TLS, warm interpreters", ss),
                        ("FederatedCluster() + scale(4) (first cell)", fs),
                        ("LocalCluster(n_workers=4)", ls)], "s", ".2f", ratio, "<= 0.25",
           {"federated_s": fs, "scale_only_s": ss, "localcluster_s": ls,
            "whole_start_ratio": whole})
    print(f"whole start (FederatedCluster() + scale(4)) / LocalCluster: {whole:.2f}")


if __name__ == "__main__":
    main()
