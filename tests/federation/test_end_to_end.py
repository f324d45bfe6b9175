"""A user's Dask work on workers that two labs' agents contribute, placed by the broker."""

from __future__ import annotations

import dask.array as da
import numpy as np

from federation import FederatedCluster
from tests.utils.procs import live_worker_pids, wait_until


def test_compute_across_two_labs_then_scale_down_and_close(two_labs):
    fed = two_labs
    with FederatedCluster(fed.url, fed.user_tokens["alice"], heartbeat_interval=0.5) as cluster:
        cluster.scale(3)
        cluster.wait_for_workers(3, timeout=60)
        client = cluster.get_client()

        x = da.arange(200_000, chunks=10_000)
        assert int((x * 2).sum().compute()) == int(np.arange(200_000).sum() * 2)

        # Each lab offers 2 CPUs: locality keeps the cluster on one lab until it is full, then
        # the other lab serves the rest.
        by_lab = cluster.workers_by_lab()
        assert sorted(by_lab.values()) == [1, 2], by_lab
        assert set(by_lab) == {"lab-a", "lab-b"}

        pids_before = live_worker_pids(fed.workdirs["agent-a"]) | live_worker_pids(
            fed.workdirs["agent-b"])
        assert len(pids_before) == 3

        cluster.scale(1)
        wait_until(lambda: len(cluster.connected_workers()) == 1, 30, "scale down to 1 worker")
        wait_until(lambda: len(live_worker_pids(fed.workdirs["agent-a"])
                               | live_worker_pids(fed.workdirs["agent-b"])) == 1,
                   30, "retired worker processes to exit")
        gone = pids_before - (live_worker_pids(fed.workdirs["agent-a"])
                              | live_worker_pids(fed.workdirs["agent-b"]))
        assert len(gone) == 2
        assert all(not _alive(pid) for pid in gone)
        assert int(x.sum().compute()) == int(np.arange(200_000).sum())
        client.close()
        lease_ids = [lease["id"] for lease in cluster.leases]

    admin = fed.admin()
    try:
        public = admin.request("GET", f"/clusters/{cluster.cluster_id}")
    finally:
        admin.close()
    assert not public["active"]
    states = {lease["id"]: (lease["state"], lease["end_reason"]) for lease in public["leases"]}
    assert set(states) == set(lease_ids)
    assert all(state == ("ended", "released") for state in states.values()), states
    assert not live_worker_pids(fed.workdirs["agent-a"])
    assert not live_worker_pids(fed.workdirs["agent-b"])


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_repr_dashboard_and_lease_start_timeout(two_labs):
    import httpx
    import pytest

    from federation import LeaseStartTimeout

    fed = two_labs
    with FederatedCluster(fed.url, fed.user_tokens["alice"], heartbeat_interval=0.5) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        text = repr(cluster)
        assert text.startswith(f"FederatedCluster({cluster.cluster_id}, 'tls://127.0.0.1:")
        assert "workers=1, pending=0" in text
        html = cluster._repr_html_()
        assert "<td>pending</td><td>0</td>" in html and cluster.cluster_id in html
        assert httpx.get(cluster.dashboard_link, timeout=10).status_code == 200

        # Each lab has 2 CPUs and one already runs a 1-CPU worker: of three 2-CPU workers one
        # fits now and two wait for capacity.
        cluster.scale(3, cpus=2, memory="1 GiB")
        with pytest.raises(LeaseStartTimeout, match=r"of 4 workers connected after 3 s "
                                                    r"\(leases: pending 2.*Pending leases wait: "
                                                    r"waiting for 2 CPUs and 1.00 GiB to come "
                                                    r"free: all 2 online providers are busy"):
            cluster.wait_for_workers(4, timeout=3)
        (reason,) = cluster.pending()
        assert cluster.pending()[reason] == 2
        assert "(the most free has 1 CPU" in reason, reason
        assert "pending=2" in repr(cluster)
