"""Enforced lease sizes with real agents, workers and cgroups: a task that takes more memory
than its lease is stopped at the limit and the user reads why; a fork bomb stops at the lease's
pids limit; the machine's other leases keep running. The fallback without cgroups (rlimits and
the agent's watchdog) stops a memory hog too."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from federation import FederatedCluster
from federation.cgroups import CgroupUnavailable, detect, remove_scope
from federation.lease_states import EndReason, LeaseState
from tests.utils.procs import wait_until

GiB = 2**30


def _cgroups_or_skip(tmp_path: Path) -> str:
    try:
        cgroups = detect(tmp_path)
    except CgroupUnavailable as exc:
        pytest.skip(f"this machine does not let the tests use cgroups: {exc}")
    remove_scope(cgroups)
    return cgroups.version


def make_tasks():
    """The tasks, as functions local to this one (so Dask pickles them by value, as it does
    a notebook's)."""

    def hog(n_bytes: int) -> int:
        """Fill ``n_bytes`` of memory (every page written, so it is really used)."""
        block = b"\x01" * n_bytes
        return len(block)

    def fork_bomb(limit: int) -> dict:
        """Fork sleeping children until the kernel refuses; report how many it got."""
        import os
        import signal

        children = []
        refused = None
        for _ in range(limit * 4):
            try:
                pid = os.fork()
            except OSError as exc:
                refused = exc.errno
                break
            if pid == 0:
                signal.pause()
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return {"forked": len(children), "refused": refused}

    return hog, fork_bomb


def _lease(cluster: FederatedCluster, lease_id: str) -> dict:
    return next(le for le in cluster.leases if le["id"] == lease_id)


def _worker_of(cluster: FederatedCluster) -> dict[str, str]:
    return {w["lease"]: w["address"] for w in cluster.connected_workers()}


def test_a_memory_hog_and_a_fork_bomb_stop_at_their_lease_limits(federation, tmp_path):
    version = _cgroups_or_skip(tmp_path)
    fed = federation
    fed.add_lab("lab-a", user="alice")
    agent = fed.add_agent("lab-a", "limits-box", cpus=2, memory="4 GiB",
                          extra=("--lease-pids", "128"))
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          heartbeat_interval=0.5) as cluster:
        cluster.scale(2, cpus=1, memory="1 GiB")
        cluster.wait_for_workers(2)
        workers = _worker_of(cluster)
        hog_lease, other_lease = sorted(workers)
        # The kernel holds each lease to its size: the group's limits are the lease's.
        own = {line.split(":")[1]: line.split(":")[2] for line in
               Path(f"/proc/{agent.pid}/cgroup").read_text().splitlines()}
        if version == "v1":
            from federation.cgroups import scope_name

            scope = scope_name(fed.workdirs["limits-box"])
            memory_dir = Path("/sys/fs/cgroup/memory") / own["memory"].lstrip("/") / scope
            cpu_dir = Path("/sys/fs/cgroup/cpu") / own["cpu"].lstrip("/") / scope
            assert int((memory_dir / hog_lease / "memory.limit_in_bytes").read_text()) == GiB
            assert int((cpu_dir / hog_lease / "cpu.cfs_quota_us").read_text()) == 100_000
            pid = next(w["pid"] for w in cluster.connected_workers()
                       if w["lease"] == hog_lease)
            assert str(pid) in (memory_dir / hog_lease / "cgroup.procs").read_text().split()
        client = cluster.get_client()
        hog, fork_bomb = make_tasks()
        bomb = client.submit(fork_bomb, 128, workers=[workers[other_lease]], pure=False)
        outcome = bomb.result(timeout=60)
        assert 0 < outcome["forked"] < 128 and outcome["refused"] == 11  # EAGAIN
        hogging = client.submit(hog, 3 * GiB, workers=[workers[hog_lease]],
                                allow_other_workers=False, pure=False)
        ended = wait_until(lambda: _lease(cluster, hog_lease)["state"] == LeaseState.ended
                           and _lease(cluster, hog_lease), 60, "the hog's lease to end")
        assert ended["end_reason"] == EndReason.failed
        assert re.fullmatch(rf"worker {hog_lease} used [\d.]+ [GM]iB of its 1 GiB and was "
                            r"stopped at its lease's memory limit; .*", ended["message"]), \
            ended["message"]
        assert any(line.startswith("1 worker failed: worker ls-") for line in
                   cluster.worker_news())
        hogging.cancel()
        # The machine's other lease ran on, untouched.
        assert _lease(cluster, other_lease)["state"] == LeaseState.running
        done = client.submit(sum, [1, 2, 3], workers=[workers[other_lease]], pure=False)
        assert done.result(timeout=30) == 6


def test_without_cgroups_the_watchdog_stops_a_memory_hog(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    fed.add_agent("lab-a", "watchdog-box", cpus=2, memory="4 GiB",
                  extra=("--cgroups", "off"))
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          heartbeat_interval=0.5) as cluster:
        cluster.scale(1, cpus=1, memory="512 MiB")
        cluster.wait_for_workers(1)
        (lease_id, address), = _worker_of(cluster).items()
        client = cluster.get_client()
        hog, _ = make_tasks()
        client.submit(hog, 3 * GiB, workers=[address], allow_other_workers=False,
                      pure=False)
        ended = wait_until(lambda: _lease(cluster, lease_id)["state"] == LeaseState.ended
                           and _lease(cluster, lease_id), 60, "the hog's lease to end")
        assert ended["end_reason"] == EndReason.failed
        assert re.match(rf"worker {lease_id} used [\d.]+ [GM]iB of its 512 MiB and was stopped",
                        ended["message"]), ended["message"]
    assert os.path.exists("/proc/self")  # the machine (and this test process) lived on
