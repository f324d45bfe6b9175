"""Security: certificates bind workers to their lease and cluster; tokens bind users to their
clusters; provider and revoked tokens cannot act as users."""

from __future__ import annotations

import asyncio
import os

import pytest
from distributed import Client, Worker
from distributed.security import Security

from federation import FederatedCluster, NotFound, PermissionDenied, TokenRefused
from federation.client import BrokerClient
from federation.tls import ClusterAuthority


def worker_security(authority: ClusterAuthority, lease_id: str) -> Security:
    creds = authority.worker_credentials(lease_id)
    return Security(tls_ca_file=authority.ca_pem, tls_worker_cert=creds.cert,
                    tls_worker_key=creds.key, tls_client_cert=creds.cert,
                    tls_client_key=creds.key, require_encryption=True)


def client_security(authority: ClusterAuthority) -> Security:
    creds = authority.issue("client", "parallex-client")
    return Security(tls_ca_file=authority.ca_pem, tls_client_cert=creds.cert,
                    tls_client_key=creds.key, require_encryption=True)


async def _cluster(fed, user: str) -> FederatedCluster:
    return await FederatedCluster(fed.url, fed.user_tokens[user], asynchronous=True,
                                  heartbeat_interval=0.5, dashboard=False)


def test_certificates_of_another_cluster_are_refused(two_labs):
    async def main():
        a = await _cluster(two_labs, "alice")
        b = await _cluster(two_labs, "bob")
        try:
            # A client with cluster B's certificates cannot reach cluster A's scheduler.
            with pytest.raises((OSError, TimeoutError)):
                await asyncio.wait_for(Client(a.scheduler_address, asynchronous=True,
                                              security=client_security(b.authority),
                                              timeout="3s"), 10)
            # Nor can a worker holding B's certificate for one of A's lease names.
            await a.scale(1)
            lease = next(iter(a.live))
            with pytest.raises((OSError, TimeoutError)):
                await asyncio.wait_for(
                    Worker(a.scheduler_address, name=lease, nthreads=1,
                           security=worker_security(b.authority, lease),
                           death_timeout="3s"), 15)
            # Only the agent's real worker may hold that name; the impostor ran in this process.
            state = await a._refresh_state()
            assert all(ws["pid"] != os.getpid() for ws in state["workers"])
        finally:
            await b.close()
            await a.close()

    asyncio.run(main())


def test_worker_certificates_speak_the_whole_protocol_but_register_only_as_their_lease(
        two_labs):
    """Inside its cluster a worker may do what Dask workers do — open a client from a task,
    which is what worker_client() and get_client() do — but a client certificate cannot pose
    as a worker."""
    async def main():
        cluster = await _cluster(two_labs, "alice")
        try:
            await cluster.scale(1)
            await cluster._wait_for_workers(1, timeout=60)
            lease = next(iter(cluster.live))
            async with Client(cluster.scheduler_address, asynchronous=True,
                              security=worker_security(cluster.authority, lease)) as client:
                assert await client.submit(lambda x: x + 1, 41) == 42
                # …but it cannot drive the cluster: scaling spends the user's credits.
                with pytest.raises(PermissionError, match="may not call 'parallex_scale'"):
                    await client.scheduler.parallex_scale(n=5)
            client_creds = cluster.authority.issue("client-2", "parallex-client")
            as_client = Security(tls_ca_file=cluster.authority.ca_pem,
                                 tls_worker_cert=client_creds.cert,
                                 tls_worker_key=client_creds.key, require_encryption=True)
            with pytest.raises((ValueError, OSError, TimeoutError, RuntimeError)):
                await asyncio.wait_for(
                    Worker(cluster.scheduler_address, name=lease, nthreads=1,
                           security=as_client, death_timeout="5s"), 20)
            state = await cluster._refresh_state()
            assert "a parallex-client connection cannot register a worker" in state["refusals"]
            assert len(state["workers"]) == 1 and list(state["live"]) == [lease]
        finally:
            await cluster.close()

    asyncio.run(main())


def test_worker_cannot_register_under_another_lease_name(two_labs):
    async def main():
        cluster = await _cluster(two_labs, "alice")
        try:
            await cluster.scale(2)
            await cluster._wait_for_workers(2, timeout=60)
            mine, other = sorted(cluster.live)
            with pytest.raises((ValueError, OSError, TimeoutError, RuntimeError)):
                await asyncio.wait_for(
                    Worker(cluster.scheduler_address, name=other, nthreads=1,
                           security=worker_security(cluster.authority, mine),
                           death_timeout="5s"), 20)
            refusals = (await cluster._refresh_state())["refusals"]
            assert any(f"for lease {mine!r} tried to register as {other!r}" in r
                       for r in refusals), refusals
            # A certificate for a lease id the cluster never asked for is refused as well.
            with pytest.raises((ValueError, OSError, TimeoutError, RuntimeError)):
                await asyncio.wait_for(
                    Worker(cluster.scheduler_address, name="ls-notalease0000", nthreads=1,
                           security=worker_security(cluster.authority, "ls-notalease0000"),
                           death_timeout="5s"), 20)
            state = await cluster._refresh_state()
            assert any("'ls-notalease0000' is not a live lease" in r for r in state["refusals"])
            assert len(state["workers"]) == 2
        finally:
            await cluster.close()

    asyncio.run(main())


def test_user_cannot_touch_another_users_cluster(two_labs):
    fed = two_labs
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        bob = BrokerClient(fed.url, fed.user_tokens["bob"])
        creds = cluster.authority.worker_credentials("ls-bobwantsthis01")
        mine = f"no cluster '{cluster.cluster_id}' of yours"
        try:
            # Another user's cluster answers exactly as an unknown one would (404).
            with pytest.raises(NotFound, match=mine):
                bob.request("GET", f"/clusters/{cluster.cluster_id}")
            with pytest.raises(NotFound, match=mine):
                bob.request("POST", f"/clusters/{cluster.cluster_id}/leases", json={
                    "spec": {"cpus": 1, "memory": "1 GiB"},
                    "workers": [{"lease_id": "ls-bobwantsthis01"}]})
            with pytest.raises(NotFound, match=mine):
                bob.request("POST", f"/clusters/{cluster.cluster_id}/leases/release",
                            json={"lease_ids": sorted(cluster.live)})
            with pytest.raises(NotFound, match=mine):
                bob.request("GET", f"/clusters/{cluster.cluster_id}/signing-requests")
            with pytest.raises(NotFound, match=mine):
                bob.request("POST", f"/clusters/{cluster.cluster_id}/certificates", json={
                    "certificates": [{"lease_id": "ls-bobwantsthis01", "cert": creds.cert}]})
            with pytest.raises(NotFound, match=mine):
                bob.request("DELETE", f"/clusters/{cluster.cluster_id}")
            assert [c["id"] for c in bob.request("GET", "/clusters")] == []
        finally:
            bob.close()
        public = BrokerClient(fed.url, fed.user_tokens["alice"])
        try:
            state = public.request("GET", f"/clusters/{cluster.cluster_id}")
        finally:
            public.close()
        assert state["active"]
        assert [le["state"] for le in state["leases"]] == ["running"]


def test_provider_token_cannot_act_as_user_and_user_cannot_act_as_provider(two_labs):
    fed = two_labs
    with pytest.raises(PermissionDenied, match="provider token cannot"):
        FederatedCluster(fed.url, fed.provider_tokens["lab-a"], dashboard=False)
    provider = BrokerClient(fed.url, fed.provider_tokens["lab-a"])
    user = BrokerClient(fed.url, fed.user_tokens["alice"])
    try:
        with pytest.raises(PermissionDenied, match="a provider token cannot do this"):
            provider.request("GET", "/clusters")
        with pytest.raises(PermissionDenied, match="a provider token cannot do this"):
            provider.request("POST", "/labs", json={"name": "sneaky"})
        with pytest.raises(PermissionDenied, match="a user token cannot do this"):
            user.request("POST", "/agent/register", json={"name": "x", "cpus": 1,
                                                          "memory": "1 GiB"})
        with pytest.raises(PermissionDenied, match="a user token cannot do this"):
            user.request("POST", "/tokens", json={"kind": "user", "lab": "lab-a",
                                                  "user": "mallory"})
        # lab-a's provider token cannot act for lab-b's provider.
        lab_b = next(p for p in provider.request("GET", "/providers") if p["lab"] == "lab-b")
        with pytest.raises(NotFound, match=f"no provider '{lab_b['id']}' of your lab"):
            provider.request("POST", f"/agent/{lab_b['id']}/heartbeat", json={"running": []})
    finally:
        provider.close()
        user.close()


def test_revoked_and_unknown_tokens_get_401(two_labs):
    fed = two_labs
    admin = fed.admin()
    try:
        issued = admin.request("POST", "/tokens", json={"kind": "user", "lab": "lab-a",
                                                        "user": "carol"})
        carol = BrokerClient(fed.url, issued["token"])
        assert carol.request("GET", "/whoami")["user"] == "carol"
        admin.request("DELETE", f"/tokens/{issued['id']}")
        with pytest.raises(TokenRefused, match="was revoked"):
            carol.request("GET", "/whoami")
        carol.close()
    finally:
        admin.close()
    with pytest.raises(TokenRefused, match="was revoked"):
        FederatedCluster(fed.url, issued["token"], dashboard=False)
    with pytest.raises(TokenRefused, match="not known to the broker"):
        FederatedCluster(fed.url, "px_made-up-token", dashboard=False)
    import httpx

    answer = httpx.get(f"{fed.url}/api/v1/clusters")
    assert answer.status_code == 401
    assert "Authorization: Bearer" in answer.json()["message"]
