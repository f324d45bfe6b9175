"""Prometheus metrics of the broker: what the database says at scrape time (leases by state
and lab, the oldest pending lease, agents online, PCU/h), what the passes and requests took,
and only for an administrator."""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from federation import FederatedCluster
from tests.utils.procs import wait_until


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_say_what_the_federation_holds_and_how_long_the_broker_took(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB")
    url = f"{fed.url}/api/v1/metrics"
    admin = {"Authorization": f"Bearer {fed.admin_token}"}
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(3)  # the machine holds two: one waits
        cluster.wait_for_workers(2)

        def scraped() -> dict:
            answer = httpx.get(url, headers=admin, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"].startswith("text/plain")
            return samples(answer.text)

        wait_until(lambda: scraped().get(("parallex_leases", (("lab", "lab-a"),
                                                              ("state", "running")))) == 2,
                   30, "two running leases in the metrics")
        now = scraped()
        assert now[("parallex_leases", (("lab", "lab-a"), ("state", "pending")))] == 1
        assert now[("parallex_oldest_pending_lease_seconds", ())] > 0
        assert now[("parallex_agents_online", (("lab", "lab-a"),))] == 1
        assert now[("parallex_agents_offering", (("lab", "lab-a"),))] == 1
        assert now[("parallex_pcu_per_hour", (("lab", "lab-a"),))] > 0
        assert now[("parallex_placement_pass_seconds_count", ())] >= 1
        requests = {dict(labels)["route"] for (name, labels) in now
                    if name == "parallex_http_request_seconds_count"}
        # Route templates, never raw paths with ids; long polls are not timed.
        assert "/clusters/{cluster_id}/leases" in requests, requests
        assert not any(re.search(r"cl_|prv_|ls-", r) for r in requests), requests
        assert "/agent/{provider_id}/leases" not in requests
    assert httpx.get(url, timeout=30).status_code == 401
    user = httpx.get(url, headers={"Authorization": f"Bearer {fed.user_tokens['alice']}"},
                     timeout=30)
    assert user.status_code == 403 and "kind: admin" in user.json()["message"]
