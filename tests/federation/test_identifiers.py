"""Every identifier and name field refuses traversal, URL specials, NUL, 10 kB strings and
non-ASCII with a 422, and nothing is written."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from federation.tls import ClusterAuthority

HOSTILE = {"dotdot": "../", "encoded dotdot": "%2e%2e/", "query": "a?b", "fragment": "a#b",
           "nul": "a\x00b", "10 kB": "x" * 10_000, "non-ascii": "\u00e9cole-\u00fc"}

ALL_TABLES = ("lab", "user", "membership", "apitoken", "provider", "cluster", "lease",
              "transfer", "ledgerentry")


@pytest.fixture
def world(federation):
    """lab-a with alice, a registered provider, a cluster with one lease; the clients."""
    fed = federation
    fed.add_lab("lab-a", user="alice")
    admin = httpx.Client(base_url=f"{fed.url}/api/v1", timeout=30,
                         headers={"Authorization": f"Bearer {fed.admin_token}"})
    user = httpx.Client(base_url=f"{fed.url}/api/v1", timeout=30,
                        headers={"Authorization": f"Bearer {fed.user_tokens['alice']}"})
    provider = httpx.Client(base_url=f"{fed.url}/api/v1", timeout=30,
                            headers={"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"})
    pid = provider.post("/agent/register", json={"name": "box", "cpus": 2,
                                                 "memory": "4 GiB"}).json()["provider_id"]
    cluster = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                           "ca_cert": ClusterAuthority().ca_pem}).json()["id"]
    user.post(f"/clusters/{cluster}/leases", json={
        "spec": {"cpus": 1, "memory": "1 GiB"},
        "workers": [{"lease_id": "ls-identifier001"}]}).raise_for_status()
    clients = {"admin": admin, "user": user, "provider": provider}
    try:
        yield fed, clients, pid, cluster
    finally:
        for client in clients.values():
            client.close()


def requests_with(bad: str, pid: str, cluster: str) -> list[tuple[str, str, str, dict | None]]:
    """(client, method, path, body) with ``bad`` in one identifier or name field each."""
    seg = quote(bad, safe="")
    spec = {"cpus": 1, "memory": "1 GiB"}
    return [
        ("admin", "POST", "/labs", {"name": bad}),
        ("admin", "POST", "/labs", {"name": "lab-z", "site": bad}),
        ("admin", "PUT", f"/labs/lab-a/members/{seg}", {}),
        ("admin", "PATCH", f"/labs/{seg}", {"share": 2}),
        ("admin", "POST", "/tokens", {"kind": "user", "lab": bad, "user": "u1"}),
        ("admin", "POST", "/tokens", {"kind": "user", "lab": "lab-a", "user": bad}),
        ("admin", "DELETE", f"/tokens/{seg}", None),
        ("admin", "POST", "/grants", {"lab": bad, "amount": 1}),
        ("provider", "POST", "/agent/register", {"name": bad, "cpus": 1, "memory": "1 GiB"}),
        ("provider", "POST", "/agent/register",
         {"name": "box2", "site": bad, "cpus": 1, "memory": "1 GiB"}),
        ("provider", "POST", "/agent/register",
         {"name": "box3", "cpus": 1, "memory": "1 GiB",
          "gpus": [{"index": 0, "model": bad, "memory": 1}]}),
        ("provider", "POST", f"/agent/{pid}/heartbeat", {"running": [bad]}),
        ("provider", "POST", f"/agent/{seg}/heartbeat", {"running": []}),
        ("provider", "POST", f"/agent/{pid}/leases/{seg}/state", {"state": "ended"}),
        ("provider", "POST", f"/agent/{pid}/leases/{seg}/csr", {"csr": "x"}),
        ("user", "POST", "/clusters", {"name": bad, "scheduler_address": "tls://127.0.0.1:1",
                                       "ca_cert": "x"}),
        ("user", "POST", f"/clusters/{cluster}/leases",
         {"spec": spec, "group": bad, "workers": [{"lease_id": "ls-identifier002"}]}),
        ("user", "POST", f"/clusters/{cluster}/leases",
         {"spec": {**spec, "gpus": 1, "gpu_model": bad},
          "workers": [{"lease_id": "ls-identifier003"}]}),
        ("user", "POST", f"/clusters/{cluster}/leases",
         {"spec": spec, "workers": [{"lease_id": bad}]}),
        ("user", "POST", f"/clusters/{cluster}/leases/release", {"lease_ids": [bad]}),
        ("user", "POST", f"/clusters/{cluster}/heartbeat", {"connected": [bad]}),
        ("user", "POST", f"/clusters/{cluster}/certificates",
         {"certificates": [{"lease_id": bad, "cert": "x"}]}),
        ("user", "GET", f"/clusters/{seg}", None),
    ]


@pytest.mark.parametrize("bad", list(HOSTILE.values()), ids=list(HOSTILE))
def test_every_identifier_field_refuses_hostile_strings(world, bad):
    fed, clients, pid, cluster = world
    before = fed.db_rows(*ALL_TABLES)
    answers = []
    for who, method, path, body in requests_with(bad, pid, cluster):
        answer = clients[who].request(method, path, json=body)
        answers.append((who, method, path[:60], answer.status_code, answer.text[:120]))
    # A bad path segment that still routes is a 422; one that no longer routes (an encoded
    # '/' or '?', which the server decodes before routing) is the router's 404. Never a 2xx,
    # never a 5xx.
    wrong = [a for a in answers if a[3] not in (404, 422) or a[3] == 404 and "%" not in a[2]]
    assert wrong == [], wrong
    assert fed.db_rows(*ALL_TABLES) == before
