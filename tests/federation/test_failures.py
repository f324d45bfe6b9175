"""Failures: a provider agent or the broker killed with SIGKILL, an agent restarted."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import re
import signal
import sys
import threading
import time

import dask.array as da
import httpx
import numpy as np
import psutil

from federation import FederatedCluster
from federation.client import BrokerClient
from tests.utils.procs import Proc, live_worker_pids, start_agent, wait_until


def _cluster_public(fed, cluster_id: str) -> dict:
    admin = fed.admin()
    try:
        return admin.request("GET", f"/clusters/{cluster_id}")
    finally:
        admin.close()


def _check_sum(client) -> None:
    x = da.arange(50_000, chunks=5_000)
    assert int(x.sum().compute()) == int(np.arange(50_000).sum())


def test_killed_agent_leases_end_lost_and_other_lab_replaces_them(two_labs):
    fed = two_labs
    with FederatedCluster(fed.url, fed.user_tokens["alice"], heartbeat_interval=0.3) as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=60)
        (lab,) = cluster.workers_by_lab()  # locality: both workers on one lab
        victim, survivor = ("agent-a", "agent-b") if lab == "lab-a" else ("agent-b", "agent-a")
        first_leases = {lease["id"] for lease in cluster.leases if lease["state"] == "running"}

        killed_at = dt.datetime.now(dt.UTC)
        fed.agents[victim].kill9()

        def ended_lost():
            leases = _cluster_public(fed, cluster.cluster_id)["leases"]
            old = [le for le in leases if le["id"] in first_leases]
            return old if all(le["state"] == "ended" for le in old) else None

        old = wait_until(ended_lost, fed.provider_timeout + 10, "the killed agent's leases")
        for lease in old:
            assert lease["end_reason"] == "lost"
            assert "stopped heart-beating" in lease["message"]
            ended_at = dt.datetime.fromisoformat(lease["ended_at"]).replace(tzinfo=dt.UTC)
            # Within the provider timeout plus one reaper pass and scheduling slack.
            assert (ended_at - killed_at).total_seconds() < fed.provider_timeout + 3

        wait_until(lambda: cluster.workers_by_lab() == {
            "lab-b" if lab == "lab-a" else "lab-a": 2}, 60, "replacement workers on the other lab")
        client = cluster.get_client()
        _check_sum(client)
        client.close()
        # The orphaned workers of the killed agent were told to close by the scheduler.
        wait_until(lambda: not live_worker_pids(fed.workdirs[victim]), 30,
                   "orphaned workers of the killed agent to exit")
        assert len(live_worker_pids(fed.workdirs[survivor])) == 2


def test_broker_killed_and_restarted_loses_and_duplicates_nothing(two_labs):
    fed = two_labs
    with FederatedCluster(fed.url, fed.user_tokens["alice"], heartbeat_interval=0.3) as cluster:
        cluster.scale(3)
        cluster.wait_for_workers(3, timeout=60)
        before = {le["id"]: le for le in _cluster_public(fed, cluster.cluster_id)["leases"]}
        assert sorted(le["state"] for le in before.values()) == ["running"] * 3
        pids_before = {name: live_worker_pids(w) for name, w in fed.workdirs.items()}

        fed.broker.kill9()
        restarted_at = dt.datetime.now(dt.UTC)
        fed.restart_broker()

        # Every agent must have heart-beaten after a full provider timeout has passed since the
        # restart: had recovery not credited them, their leases would have ended by then.
        def providers_checked_in():
            admin = BrokerClient(fed.url, fed.admin_token)
            try:
                rows = admin.request("GET", "/providers")
            finally:
                admin.close()
            horizon = restarted_at + dt.timedelta(seconds=fed.provider_timeout + 1)
            return all(dt.datetime.fromisoformat(r["last_seen"]).replace(tzinfo=dt.UTC)
                       > horizon for r in rows)

        wait_until(providers_checked_in, fed.provider_timeout + 20, "agents to heartbeat again")
        after = {le["id"]: le for le in _cluster_public(fed, cluster.cluster_id)["leases"]}
        assert set(after) == set(before), "a lease was lost or duplicated"
        assert all(le["state"] == "running" for le in after.values()), after
        assert {name: live_worker_pids(w) for name, w in fed.workdirs.items()} == pids_before
        assert len(cluster.connected_workers()) == 3
        client = cluster.get_client()
        _check_sum(client)
        client.close()


def test_restarted_agent_adopts_live_workers_and_stops_released_ones(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    agent = fed.add_agent("lab-a", "agent-a", cpus=2)
    with FederatedCluster(fed.url, fed.user_tokens["alice"], heartbeat_interval=0.3) as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=60)
        workdir = fed.workdirs["agent-a"]
        pids = live_worker_pids(workdir)
        assert len(pids) == 2
        agent.kill9()

        # While the agent is down, one lease is released at the broker directly.
        keep, drop = sorted(le["id"] for le in cluster.leases if le["state"] == "running")
        dropped_pid = next(ws["pid"] for ws in cluster.connected_workers()
                           if ws["name"] == drop)
        user = BrokerClient(fed.url, fed.user_tokens["alice"])
        try:
            user.request("POST", f"/clusters/{cluster.cluster_id}/leases/release",
                         json={"lease_ids": [drop]})
        finally:
            user.close()
        assert dropped_pid in pids

        fed.agents["agent-a"] = start_agent(fed.url, fed.provider_tokens["lab-a"], workdir,
                                            name="agent-a", cpus=2, memory="4 GiB",
                                            accounts=fed.accounts["agent-a"])
        wait_until(lambda: dropped_pid not in live_worker_pids(workdir), 30,
                   "the restarted agent to stop the released lease's worker")

        def lease_state(lease_id: str) -> str:
            leases = _cluster_public(fed, cluster.cluster_id)["leases"]
            return next(le["state"] for le in leases if le["id"] == lease_id)

        wait_until(lambda: lease_state(drop) == "ended", 30, "the released lease to end")
        states = {le["id"]: (le["state"], le["end_reason"])
                  for le in _cluster_public(fed, cluster.cluster_id)["leases"]}
        assert states[drop] == ("ended", "released")
        assert states[keep] == ("running", None)
        kept_pid = next(ws["pid"] for ws in cluster.connected_workers() if ws["name"] == keep)
        assert kept_pid in live_worker_pids(workdir), "the live worker was not adopted"
        assert "adopted the running worker of lease " + keep in fed.agents["agent-a"].log_text()
        # The cluster asks for a replacement of the lease it did not release; it connects too.
        cluster.wait_for_workers(2, timeout=60)


def test_dead_worker_ends_its_lease_failed_and_is_replaced(two_labs):
    fed = two_labs
    with FederatedCluster(fed.url, fed.user_tokens["alice"], heartbeat_interval=0.3,
                          dashboard=False) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        (ws,) = cluster.connected_workers()
        victim_lease, victim_pid = ws["name"], ws["pid"]
        os.kill(victim_pid, signal.SIGKILL)

        def failed():
            leases = _cluster_public(fed, cluster.cluster_id)["leases"]
            lease = next(le for le in leases if le["id"] == victim_lease)
            return lease if lease["state"] == "ended" else None

        lease = wait_until(failed, 30, "the dead worker's lease to end")
        assert lease["end_reason"] == "failed"
        assert "worker process exited with code -9" in lease["message"]
        wait_until(lambda: [w["name"] for w in cluster.connected_workers()
                            if w["name"] != victim_lease], 60, "a replacement worker")
        assert len(cluster.plan) == 1 and victim_lease not in cluster.plan


CLUSTER_SCRIPT = """
import sys
import threading
from federation import FederatedCluster
cluster = FederatedCluster(sys.argv[1], sys.argv[2], heartbeat_interval=0.5, dashboard=False)
cluster.scale(1)
cluster.wait_for_workers(1, timeout=60)
print("READY", cluster.cluster_id, cluster._process.pid, flush=True)
threading.Event().wait()  # until the test kills this process
"""


def _start_cluster_script(fed, tmp_path) -> tuple[Proc, str, int]:
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    user = Proc([sys.executable, str(script), fed.url, fed.user_tokens["alice"]],
                tmp_path / "cluster.log")
    cluster_id, scheduler_pid = user.wait_for_line("READY ").split()[:2]
    return user, cluster_id, int(scheduler_pid)


def _ended(fed, cluster_id):
    public = _cluster_public(fed, cluster_id)
    return public if not public["active"] and all(
        le["state"] == "ended" for le in public["leases"]) else None


def test_a_killed_notebook_ends_its_leases_at_once(two_labs, tmp_path):
    """The scheduler process sees its parent's pipe close and ends the cluster: nothing runs,
    or is charged, until the broker's cluster timeout."""
    fed = two_labs
    user, cluster_id, scheduler_pid = _start_cluster_script(fed, tmp_path)
    try:
        assert len(set().union(*(live_worker_pids(w) for w in fed.workdirs.values()))) == 1
        killed_at = dt.datetime.now(dt.UTC)
        user.kill9()
        public = wait_until(lambda: _ended(fed, cluster_id), fed.cluster_timeout + 20,
                            "the orphaned cluster's leases")
        assert public["end_reason"] == "closed"
        (lease,) = public["leases"]
        assert lease["end_reason"] == "released", lease
        ended_at = dt.datetime.fromisoformat(lease["ended_at"]).replace(tzinfo=dt.UTC)
        assert (ended_at - killed_at).total_seconds() < fed.cluster_timeout
        wait_until(lambda: not psutil.pid_exists(scheduler_pid), 30,
                   "the scheduler process to exit")
    finally:
        user.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(scheduler_pid, signal.SIGKILL)


def test_cluster_whose_processes_die_stops_costing_within_its_timeout(two_labs, tmp_path):
    fed = two_labs
    user, cluster_id, scheduler_pid = _start_cluster_script(fed, tmp_path)
    try:
        worker_pids = set().union(*(live_worker_pids(w) for w in fed.workdirs.values()))
        assert len(worker_pids) == 1
        killed_at = dt.datetime.now(dt.UTC)
        # Both the user's process and its scheduler die at once (a machine lost): nobody is
        # left to say goodbye, so the broker's cluster timeout ends the leases.
        os.kill(scheduler_pid, signal.SIGKILL)
        user.kill9()
        public = wait_until(lambda: _ended(fed, cluster_id), fed.cluster_timeout + 20,
                            "the silent cluster's leases")
        assert public["end_reason"] == "lost"
        (lease,) = public["leases"]
        # The worker noticed its scheduler vanish and left; that is no failure of the provider.
        assert lease["end_reason"] == "released", lease
        assert "left its scheduler" in lease["message"]
        ended_at = dt.datetime.fromisoformat(lease["ended_at"]).replace(tzinfo=dt.UTC)
        assert (ended_at - killed_at).total_seconds() < fed.cluster_timeout
        wait_until(lambda: not set().union(*(live_worker_pids(w)
                                             for w in fed.workdirs.values())),
                   30, "the lost cluster's worker to stop")
    finally:
        user.stop()


def test_a_stopped_agent_takes_its_machine_offline_at_once(federation):
    """An agent that shuts down tells the broker, which places nothing more there and ends
    what it held as preempted (no reliability penalty) — without waiting the provider
    timeout (30 s here), so clusters replace those workers at once."""
    fed = federation
    fed.add_lab("lab-a", user="alice")
    leaving = fed.add_agent("lab-a", "leaving", cpus=1, memory="2 GiB")
    admin = fed.admin()
    try:
        (provider,) = admin.request("GET", "/providers")
        assert provider["online"] is True
        stopped_at = time.monotonic()
        leaving.stop()
        wait_until(lambda: not admin.request("GET", "/providers")[0]["online"], 10,
                   "the stopped agent's machine to go offline")
        assert time.monotonic() - stopped_at < fed.provider_timeout
        staying = fed.add_agent("lab-a", "staying", cpus=1, memory="2 GiB")
        with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                              heartbeat_interval=0.5) as cluster:
            cluster.scale(1)
            cluster.wait_for_workers(1, timeout=30)
            (lease,) = cluster.leases
            assert lease["provider_id"] != provider["id"]
        staying.stop()
    finally:
        admin.close()


def test_a_stopping_broker_answers_its_long_polls_at_once(federation):
    """On SIGTERM the broker answers the long polls it holds, so their agents poll again (and
    reach another replica, or this one once it is back). Before, each poll waited out the
    graceful-shutdown time, was cut off, and left a traceback in the broker's log."""
    fed = federation
    fed.add_lab("lab-a")
    api = f"{fed.url}/api/v1"
    provider = {"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"}
    pid = httpx.post(f"{api}/agent/register", headers=provider, timeout=30, json={
        "name": "poller", "cpus": 1, "memory": "1 GiB"}).json()["provider_id"]
    version = httpx.get(f"{api}/agent/{pid}/leases", headers=provider,
                        timeout=30).json()["version"]
    answers: queue.Queue = queue.Queue()

    def poll() -> None:
        try:
            answers.put(httpx.get(f"{api}/agent/{pid}/leases", headers=provider, timeout=90,
                                  params={"since": version, "wait": 60}))
        except httpx.HTTPError as exc:
            answers.put(exc)

    threading.Thread(target=poll, daemon=True).start()

    def held() -> bool:
        metrics = httpx.get(f"{api}/metrics", timeout=30,
                            headers={"Authorization": f"Bearer {fed.admin_token}"}).text
        found = re.search(r"^parallex_long_polls_waiting (\S+)$", metrics, re.MULTILINE)
        return found is not None and float(found.group(1)) == 1

    wait_until(held, 30, "the broker to hold the long poll")
    fed.broker.popen.send_signal(signal.SIGTERM)  # the broker alone, as systemd would
    answer = answers.get(timeout=30)
    assert isinstance(answer, httpx.Response), f"the poll was cut off: {answer!r}"
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == version  # nothing changed: the agent polls again
    # uvicorn ends by the signal it caught, once its shutdown is complete.
    assert fed.broker.popen.wait(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in fed.broker.log_text()
    log = fed.broker.log_text()
    assert "graceful shutdown exceeded" not in log, log[-3000:]
    assert "CancelledError" not in log, log[-3000:]
