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


def test_environment_failures_on_postgresql(postgres_url):
    """A failed build recorded twice at once keeps one row (the latest words), is read back
    within its time to live, and is forgotten when the provider registers again — with
    PostgreSQL's INSERT … ON CONFLICT, which SQLite's tests do not run."""
    from sqlmodel import Session

    from accounting.models import Lab, User
    from federation.broker import db, environments
    from federation.broker.models import (
        ApiToken,
        ClusterRecord,
        EnvironmentCreate,
        Lease,
        Provider,
        TokenKind,
    )

    engine = db.make_engine(postgres_url)
    try:
        with Session(engine) as s:
            digest, _ = environments.store(s, EnvironmentCreate(python="3.11", packages=[
                {"name": "missing-pkg", "version": "1.0"}]))
            lab = Lab(name="a")
            s.add(lab)
            s.flush()
            user = User(name="u", lab_id=lab.id)
            s.add_all([user, ApiToken(id="tk1", kind=TokenKind.provider, token_hash="h",
                                      lab_id=lab.id)])
            s.flush()
            s.add_all([Provider(id="p1", lab_id=lab.id, token_id="tk1", name="box", cpus=8,
                                memory=2**30),
                       ClusterRecord(id="c1", user_id=user.id, lab_id=lab.id,
                                     scheduler_address="tls://x:1", ca_cert="x",
                                     environment=digest)])
            s.commit()
        lease = Lease(id="ls-0123456789abcdef", cluster_id="c1", cpus=1, memory=2**30)
        for words in ("first failure", "second failure"):
            with Session(engine) as s:
                environments.record_failure(s, lease, "p1", words)
                s.commit()
        with Session(engine) as s:
            assert environments.failures_of(s, digest) == {"p1": "second failure"}
            environments.forget_failures(s, "p1")
            s.commit()
            assert environments.failures_of(s, digest) == {}
    finally:
        engine.dispose()
