"""shuffle: a P2P merge of two 10-million-row dataframes on 2 one-thread federated workers (TLS,
two local agents) against a LocalCluster with 2 one-thread workers (tcp), in the same run.
The ratio is speed against the peer (its seconds over ours): above 1 is faster.

The frames are made on the workers (dd.from_map), so the client ships no data; the merge uses
Dask's default shuffle method, P2P. Reports seconds per merge and the peer's time over ours.

Run: python -m benchmarks.shuffle [--rows 10000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client, LocalCluster

from benchmarks.common import quiet_logging, report, summary
from federation import FederatedCluster
from tests.utils.federation import make_federation

PARTITIONS = 20
WORKER_MEMORY = "5 GiB"


def make_part(seed: int, rows: int, keys: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"key": rng.integers(0, keys, rows), "value": rng.random(rows)})


def merge_seconds(client: Client, rows: int) -> float:
    per_part = rows // PARTITIONS
    left = dd.from_map(make_part, range(PARTITIONS), rows=per_part, keys=rows)
    right = dd.from_map(make_part, range(PARTITIONS, 2 * PARTITIONS), rows=per_part, keys=rows)
    start = time.perf_counter()
    merged = len(left.merge(right, on="key"))
    elapsed = time.perf_counter() - start
    assert merged > rows // 2, merged  # about one match per key on average
    client.run(lambda: __import__("gc").collect())
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000, help="Rows per frame (10M).")
    parser.add_argument("--repeat", type=int, default=3, help="Trials of each (default 3).")
    args = parser.parse_args()
    quiet_logging()
    federated, local = [], []
    with tempfile.TemporaryDirectory() as tmp:
        fed = make_federation(Path(tmp))
        try:
            fed.add_lab("lab-a", user="alice")
            fed.add_lab("lab-b")
            fed.add_agent("lab-a", "agent-a", cpus=1, memory="6 GiB")
            fed.add_agent("lab-b", "agent-b", cpus=1, memory="6 GiB")
            with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                                  worker_memory=WORKER_MEMORY) as cluster, \
                    LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                                 memory_limit=WORKER_MEMORY.replace(" ", "")) as peer:
                cluster.scale(2)
                cluster.wait_for_workers(2, timeout=120)
                with Client(cluster, set_as_default=False) as ours, \
                        Client(peer, set_as_default=False) as theirs:
                    for _ in range(args.repeat):  # interleaved so drift hits both alike
                        with ours.as_current():
                            federated.append(merge_seconds(ours, args.rows))
                        with theirs.as_current():
                            local.append(merge_seconds(theirs, args.rows))
        finally:
            fed.stop()
    fs, ls = summary(federated), summary(local)
    ratio = ls["median"] / fs["median"]  # >1: faster than the peer
    report("shuffle", [(f"FederatedCluster, 2x1 thread, TLS, {args.rows:,} rows", fs),
                       ("LocalCluster, 2x1 thread, tcp", ls)], "s", ".2f", ratio, ">= 0.9",
           {"rows": args.rows, "federated_s": fs, "localcluster_s": ls})


if __name__ == "__main__":
    main()
