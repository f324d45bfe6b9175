"""The broker on a real PostgreSQL server: the two-lab flow and a restart keep their leases."""

from __future__ import annotations

import dask.array as da
import httpx
import numpy as np
import pytest

from federation import FederatedCluster, NoProviderFits
from tests.utils.federation import make_federation


@pytest.fixture
def pg_two_labs(tmp_path, postgres_url):
    fed = make_federation(tmp_path, provider_timeout=3, cluster_timeout=6, db_url=postgres_url)
    try:
        yield fed.with_two_labs()
    finally:
        fed.stop()


def test_two_labs_on_postgresql(pg_two_labs):
    fed = pg_two_labs
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          heartbeat_interval=0.3) as cluster:
        cluster.scale(3)
        cluster.wait_for_workers(3, timeout=60)
        assert sorted(cluster.workers_by_lab().values()) == [1, 2]
        client = cluster.get_client()
        x = da.arange(100_000, chunks=10_000)
        assert int(x.sum().compute()) == int(np.arange(100_000).sum())
        with pytest.raises(NoProviderFits, match="asked for 64 CPUs; the largest provider has 2"):
            cluster.scale(1, cpus=64)

        before = {le["id"] for le in cluster.leases if le["state"] == "running"}
        fed.broker.kill9()
        fed.restart_broker()
        cluster.sync(cluster._refresh)
        assert {le["id"] for le in cluster.leases if le["state"] == "running"} == before
        cluster.scale(1)
        cluster.sync(cluster._refresh)
        assert sum(le["state"] in ("running", "releasing") for le in cluster.leases) >= 1
        client.close()
    admin = fed.admin()
    try:
        leases = admin.request("GET", f"/clusters/{cluster.cluster_id}")["leases"]
    finally:
        admin.close()
    assert {(le["state"], le["end_reason"]) for le in leases} == {("ended", "released")}


def test_a_value_postgresql_cannot_store_is_a_422_not_a_500(tmp_path, postgres_url):
    """PostgreSQL refuses NUL characters in text (SQLite stores them): the request is
    answered 422 with a message, and nothing is written."""
    fed = make_federation(tmp_path, db_url=postgres_url)
    try:
        check_unstorable_values(fed)
    finally:
        fed.stop()


def check_unstorable_values(fed) -> None:
    admin = {"Authorization": f"Bearer {fed.admin_token}"}
    answer = httpx.get(f"{fed.url}/api/v1/usage", params={"lab": "lab-a\x00"}, headers=admin)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "unstorable-value"
    assert "NUL" in answer.json()["message"]
    before = httpx.get(f"{fed.url}/api/v1/labs", headers=admin).json()
    refused = httpx.post(f"{fed.url}/api/v1/labs", json={"name": "bad\x00lab"}, headers=admin)
    assert 400 <= refused.status_code < 500, refused.text
    assert httpx.get(f"{fed.url}/api/v1/labs", headers=admin).json() == before
