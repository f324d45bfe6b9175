"""A GET never writes: reading balances, ledgers, prices, costs, clusters and leases leaves
the broker's database exactly as it was (issue 11: some reads created accounts and prices)."""

from __future__ import annotations

from federation.tls import ClusterAuthority
from tests.utils.federation import api_client as api


def whole_database(fed) -> dict[str, list[tuple]]:
    tables = [r["name"] for r in fed.db_dicts(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return fed.db_rows(*tables)


def test_reads_leave_the_database_unchanged(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    with api(fed, fed.provider_tokens["lab-a"]) as agent, \
            api(fed, fed.user_tokens["alice"]) as user, api(fed, fed.admin_token) as admin:
        provider = agent.post("/agent/register", json={"name": "box", "cpus": 2,
                                                        "memory": "4 GiB"}).json()["provider_id"]
        cluster = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                               "ca_cert": ClusterAuthority().ca_pem}).json()["id"]
        assert user.post(f"/clusters/{cluster}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": "ls-00000000000000aa"}]}).status_code == 201
        before = whole_database(fed)
        reads = [(user, "/whoami"), (user, "/clusters"), (user, f"/clusters/{cluster}"),
                 (user, f"/clusters/{cluster}/cost"), (user, "/labs/lab-a/balance"),
                 (user, "/labs/lab-a/ledger"), (user, "/prices"), (user, "/providers"),
                 (user, f"/clusters/{cluster}/signing-requests"),
                 (agent, f"/agent/{provider}/leases"), (admin, "/clusters?all=true"),
                 (admin, "/labs/lab-a/members"), (admin, "/labs/lab-a/machines")]
        for who, path in reads:
            answer = who.get(path)
            assert answer.status_code == 200, (path, answer.text)
        assert whole_database(fed) == before
