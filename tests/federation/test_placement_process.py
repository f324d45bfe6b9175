"""On PostgreSQL the leader's placement passes run in a process of their own
(placement_process.py): their Python work no longer holds the request process's interpreter
lock. A pass never waits for that process: before it has started, and when it dies, the
pass runs in the broker's process, and a new placement process takes over."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families

from tests.federation.test_periodic_process import pass_processes
from tests.utils.in_process import ADMIN_TOKEN, InProcess, in_process_broker
from tests.utils.procs import process_ended, wait_until


def passes(b: InProcess, process: str) -> float:
    """parallex_placement_passes_total of ``process`` ("placement" or "broker")."""
    answer = b.client.get("/api/v1/metrics",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    answer.raise_for_status()
    return sum(s.value for f in text_string_to_metric_families(answer.text)
               for s in f.samples
               if s.name == "parallex_placement_passes_total"
               and s.labels.get("process") == process)


def scale_one(b: InProcess, lease_id: str) -> dict:
    """Ask for one lease of a CPU; its state and provider after the pass it waited for."""
    answer = b.call(b.user, "POST", f"/clusters/{b.cid}/leases",
                    json={"spec": {"cpus": 1, "memory": "256 MiB"},
                          "workers": [{"lease_id": lease_id}]})
    assert answer.status_code == 201, answer.text
    [lease] = answer.json()
    return lease


def test_placement_passes_run_in_their_own_process_and_outlive_its_death(postgres_url):
    with in_process_broker(postgres_url, 1) as b:
        broker = b.app.state.broker
        # Room for the three leases asked below beside the one the box runs.
        second = b.call(b.agent, "POST", "/agent/register", json={
            "name": "box2", "cpus": 4, "memory": "8 GiB"}).json()["provider_id"]
        machines = {b.box, second}
        wait_until(lambda: broker.placement_process.ready, 60, "the placement process")
        [child] = pass_processes(os.getpid(), "parallex-placer")
        before = passes(b, "placement")
        lease = scale_one(b, "ls-inchild")
        assert lease["state"] == "starting" and lease["provider_id"] in machines, lease
        assert passes(b, "placement") > before

        child.kill()
        # Not reaped here: the broker's process pool is the one to find it dead.
        wait_until(lambda: process_ended(child), 30, "the placement process to die")
        before = passes(b, "broker")
        lease = scale_one(b, "ls-whiledead")
        # Placed all the same, in the broker's process; no request failed.
        assert lease["state"] == "starting" and lease["provider_id"] in machines, lease
        assert passes(b, "broker") > before

        wait_until(lambda: broker.placement_process.ready, 60, "a new placement process")
        [again] = pass_processes(os.getpid(), "parallex-placer")
        assert again.pid != child.pid
        before = passes(b, "placement")
        lease = scale_one(b, "ls-inchild2")
        assert lease["state"] == "starting" and lease["provider_id"] in machines, lease
        assert passes(b, "placement") > before
    # The app's shutdown ends it.
    assert not pass_processes(os.getpid(), "parallex-placer")
