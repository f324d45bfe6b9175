"""Bad input: every malformed or impossible request gets a 4xx with a message, and the database
is left exactly as it was."""

from __future__ import annotations

import httpx
import pytest

from federation import FederatedCluster, NoProviderFits, TokenRefused
from federation.tls import ClusterAuthority

TABLES = ("lab", "user", "apitoken", "provider", "cluster", "lease")


@pytest.fixture
def registered(federation):
    """A lab with a user and one provider registered through the API (no agent, so nothing
    heart-beats and the database only changes when a request changes it)."""
    fed = federation
    fed.add_lab("lab-a", user="alice")
    provider = httpx.post(f"{fed.url}/api/v1/agent/register",
                          headers={"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"},
                          json={"name": "gpu-box", "cpus": 8, "memory": "32 GiB",
                                "gpus": [{"index": 0, "model": "NVIDIA A100", "memory": 40e9},
                                         {"index": 1, "model": "NVIDIA A100", "memory": 40e9}]})
    assert provider.status_code == 201, provider.text
    authority = ClusterAuthority()
    user = {"Authorization": f"Bearer {fed.user_tokens['alice']}"}
    cluster = httpx.post(f"{fed.url}/api/v1/clusters", headers=user, json={
        "scheduler_address": "tls://127.0.0.1:1", "ca_cert": authority.ca_pem})
    assert cluster.status_code == 201, cluster.text
    return fed, user, cluster.json()["id"], authority


def lease_body(authority: ClusterAuthority, **spec) -> dict:
    return {"spec": {"cpus": 1, "memory": "1 GiB", **spec},
            "workers": [{"lease_id": "ls-badinput000001"}]}


CASES = [
    ("zero cpus", {"cpus": 0}, 422, "spec.cpus: Input should be greater than or equal to 1"),
    ("negative cpus", {"cpus": -2}, 422, "spec.cpus: Input should be greater than or equal"),
    ("fraction of a cpu", {"cpus": 1e-300}, 422, "spec.cpus: Input should be a valid integer"),
    ("half a cpu", {"cpus": 1.5}, 422, "spec.cpus: Input should be a valid integer"),
    ("zero memory", {"memory": 0}, 422, "memory must be more than 0 bytes"),
    ("memory as a fraction of the machine", {"memory": 1}, 422,
     "spec.memory: Input should be greater than or equal to 268435456"),
    ("infinite memory", {"memory": "Infinity"}, 422, "memory 'Infinity' is not a size"),
    ("overflowing memory", {"memory": "1e400"}, 422, "memory '1e400' is not a size"),
    ("2**70 bytes", {"memory": 2**70}, 422, "spec.memory: Input should be less than or equal"),
    ("negative memory", {"memory": "-4 GiB"}, 422, "memory must be more than 0 bytes"),
    ("memory lots", {"memory": "lots"}, 422, "memory 'lots' is not a size"),
    ("negative gpus", {"gpus": -1}, 422, "spec.gpus: Input should be greater than or equal"),
    ("too many gpus", {"gpus": 8}, 422, "asked for 8 GPUs; the largest provider has 2"),
    ("unknown gpu model", {"gpus": 1, "gpu_model": "H200"}, 422,
     "asked for 1 H200 GPUs; the largest provider has 0"),
    ("too much memory", {"memory": "1 TiB"}, 422,
     "asked for 1.00 TiB of memory; the largest provider has 32.00 GiB"),
]


@pytest.mark.parametrize(("label", "spec", "status", "message"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_worker_spec_is_refused_and_nothing_written(registered, label, spec, status,
                                                        message):
    fed, user, cluster_id, authority = registered
    before = fed.db_rows(*TABLES)
    answer = httpx.post(f"{fed.url}/api/v1/clusters/{cluster_id}/leases", headers=user,
                        json=lease_body(authority, **spec))
    assert answer.status_code == status, answer.text
    assert message in answer.json()["message"]
    assert fed.db_rows(*TABLES) == before


def test_malformed_requests_are_refused_and_nothing_written(registered):
    fed, user, cluster_id, authority = registered
    before = fed.db_rows(*TABLES)
    api = f"{fed.url}/api/v1"

    bad_json = httpx.post(f"{api}/clusters/{cluster_id}/leases",
                          headers={**user, "content-type": "application/json"},
                          content=b'{"spec": {"cpus": 1,')
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.json()["message"]

    unknown = httpx.post(f"{api}/clusters/cl_doesnotexist/leases", headers=user,
                         json=lease_body(authority))
    assert unknown.status_code == 404
    assert "no cluster 'cl_doesnotexist'" in unknown.json()["message"]

    duplicate = lease_body(authority)
    duplicate["workers"] *= 2
    twice = httpx.post(f"{api}/clusters/{cluster_id}/leases", headers=user, json=duplicate)
    assert twice.status_code == 422
    assert "lease ids in one request must differ" in twice.json()["message"]

    not_tls = httpx.post(f"{api}/clusters", headers=user, json={
        "scheduler_address": "tcp://127.0.0.1:1", "ca_cert": authority.ca_pem})
    assert not_tls.status_code == 422
    assert "must be a tls:// address" in not_tls.json()["message"]

    release_unknown = httpx.post(f"{api}/clusters/{cluster_id}/leases/release", headers=user,
                                 json={"lease_ids": ["ls-nosuchlease0001"]})
    assert release_unknown.status_code == 404
    assert "no such leases" in release_unknown.json()["message"]

    no_endpoint = httpx.get(f"{api}/nonsense", headers=user)
    assert no_endpoint.status_code == 404
    assert "no endpoint GET /api/v1/nonsense" in no_endpoint.json()["message"]

    wrong_method = httpx.put(f"{api}/clusters/{cluster_id}/heartbeat", headers=user)
    assert wrong_method.status_code == 405
    assert "PUT is not allowed on" in wrong_method.json()["message"]

    assert fed.db_rows(*TABLES) == before


def test_federated_cluster_raises_clear_errors(registered):
    fed, _user, _cluster_id, _authority = registered
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False) as cluster:
        with pytest.raises(NoProviderFits, match="asked for 8 GPUs; the largest provider has 2"):
            cluster.scale(1, gpus=8)
        with pytest.raises(ValueError, match="whole number of workers"):
            cluster.scale(-1)
        with pytest.raises(ValueError, match="is not a size"):
            cluster.scale(1, memory="lots")
        assert cluster.leases == []
        assert cluster.plan == set()


def test_cluster_takes_broker_and_token_from_dask_config(registered, monkeypatch):
    import dask

    fed, _user, _cluster_id, _authority = registered
    monkeypatch.delenv("PARALLEX_BROKER_URL", raising=False)
    monkeypatch.delenv("PARALLEX_TOKEN", raising=False)
    with dask.config.set({"parallex.broker-url": fed.url,
                          "parallex.token": fed.user_tokens["alice"],
                          "parallex.worker.memory": "3 GiB"}):
        with FederatedCluster(dashboard=False) as cluster:
            assert cluster.cluster_id.startswith("cl_")
            assert cluster.worker_memory == 3 * 2**30
    with pytest.raises(TokenRefused, match="no API token"):
        FederatedCluster(fed.url, dashboard=False)


def test_unreachable_broker_is_reported(tmp_path):
    import socket

    from federation import BrokerUnreachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BrokerUnreachable, match=f"cannot reach the Parallex broker at "
                                                f"http://127.0.0.1:{port}"):
        FederatedCluster(f"http://127.0.0.1:{port}", "px_token", dashboard=False)


def test_a_hub_token_when_the_hub_cannot_answer_is_a_503_saying_so():
    """The broker checks hub tokens through JupyterHub's HubAuth; a hub that is down is not a
    refusal of the token (503, asked again next time), and says what happened."""
    from federation.broker.errors import Unavailable, http_status
    from federation.broker.hub_tokens import HubTokenChecker
    from federation.ports import free_port

    checker = HubTokenChecker(f"http://127.0.0.1:{free_port()}/hub/api")
    for _attempt in range(2):  # not cached: the second request asks again, and fails again
        with pytest.raises(Unavailable) as refused:
            checker.identify("a-hub-token")
        assert http_status(refused.value) == 503
        assert "cannot be reached" in refused.value.message


def test_a_broker_the_hubs_proxy_cannot_reach_is_unreachable_not_an_html_page(tmp_path):
    """Behind JupyterHub, a broker that is down or restarting is answered by
    configurable-http-proxy's own 503 page. The notebook and the CLI say the broker did not
    answer, as for a broker they cannot connect to (which their callers retry), in one line
    without the page's HTML."""
    import asyncio
    from pathlib import Path

    from federation import BrokerUnreachable
    from federation.client import AsyncBrokerClient, BrokerClient
    from federation.ports import free_port
    from tests.utils.procs import Proc, wait_until

    chp = Path(__file__).parents[2] / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
    port, api_port = free_port(), free_port()
    proxy = Proc([str(chp), "--ip", "127.0.0.1", "--port", str(port), "--api-ip", "127.0.0.1",
                  "--api-port", str(api_port), "--default-target",
                  f"http://127.0.0.1:{free_port()}"], tmp_path / "chp.log")
    try:
        def listening() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/").status_code == 503
            except httpx.TransportError:
                return False
        wait_until(listening, 30, "configurable-http-proxy to listen")
        url = f"http://127.0.0.1:{port}/services/parallex"
        says = (f"the Parallex broker did not answer: http://127.0.0.1:{port} answered HTTP 503 "
                r"\(503: Proxy Target Missing\) in its place")
        with pytest.raises(BrokerUnreachable, match=says) as blocking:
            BrokerClient(url, "px_token").request("GET", "/whoami")
        assert "<" not in str(blocking.value)

        async def from_a_notebook() -> None:
            client = AsyncBrokerClient(url, "px_token")
            try:
                await client.request("GET", "/whoami")
            finally:
                await client.close()
        with pytest.raises(BrokerUnreachable, match=says):
            asyncio.run(from_a_notebook())
    finally:
        proxy.stop()
