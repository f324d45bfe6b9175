"""Certificates carry their role and lease id; sizes parse with readable errors."""

from __future__ import annotations

import pytest

from federation.inventory import Capacity, offer, parse_gpu_list
from federation.sizes import parse_memory
from federation.tls import (
    ROLE_WORKER,
    ClusterAuthority,
    certificate_identity,
    is_ca_certificate,
    key_matches,
    signed_by,
)


def test_worker_certificate_names_its_lease_and_role():
    ca = ClusterAuthority("t")
    creds = ca.worker_credentials("ls-0123456789abcdef")
    assert certificate_identity(creds.cert) == ("ls-0123456789abcdef", ROLE_WORKER)
    assert signed_by(creds.cert, ca.ca_pem)
    assert not signed_by(creds.cert, ClusterAuthority("other").ca_pem)
    assert key_matches(creds.cert, creds.key)
    assert not key_matches(creds.cert, ca.worker_credentials("ls-x").key)
    assert is_ca_certificate(ca.ca_pem) and not is_ca_certificate(creds.cert)
    assert not signed_by("not a certificate", ca.ca_pem)


@pytest.mark.parametrize(("value", "expected"), [("4 GiB", 4 * 2**30), ("512MB", 512 * 10**6),
                                                 (1024, 1024), ("1.5 GiB", int(1.5 * 2**30))])
def test_parse_memory(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize(("value", "message"), [("lots", "memory 'lots' is not a size"),
                                                (0, "must be more than 0 bytes"),
                                                ("-1 GiB", "must be more than 0 bytes"),
                                                (True, "is not a size"), (None, "is not a size")])
def test_parse_memory_refuses(value, message):
    with pytest.raises(ValueError, match=message):
        parse_memory(value)


def test_offer_caps_by_flags():
    machine = Capacity(cpus=8, memory=16 * 2**30,
                       gpus=[{"index": 0, "model": "T4", "memory": 1},
                             {"index": 1, "model": "T4", "memory": 1}])
    offered = offer(cpus=4, memory="8 GiB", gpus="1", detected=machine)
    assert (offered.cpus, offered.memory, [g["index"] for g in offered.gpus]) == (4, 8 * 2**30,
                                                                                   [1])
    assert offer(detected=machine).gpus == machine.gpus
    assert offer(gpus="none", detected=machine).gpus == []
    with pytest.raises(ValueError, match="more than this machine has"):
        offer(memory="32 GiB", detected=machine)
    with pytest.raises(ValueError, match="must be a whole number of cores, at least 1; got 0"):
        offer(cpus=0, detected=machine)
    with pytest.raises(ValueError, match="must be a whole number of cores, at least 1; got 1.5"):
        offer(cpus=1.5, detected=machine)
    with pytest.raises(ValueError, match="not a list of GPU indices"):
        parse_gpu_list("first", machine.gpus)


def test_an_agent_waiting_for_a_signature_keeps_its_key_when_an_old_lease_list_comes_back(
        federation, tmp_path):
    """Once a lease's environment is ready the agent looks at the lease again, as the broker
    last listed it, and that list may predate its signing request. It must keep waiting for
    the signature of the key it has, not make a second key and request (which replaced the
    first while the cluster signed it). A certificate for another key than the agent's
    (a request it replaced) is answered with a new request."""
    import asyncio

    import httpx

    from federation.agent import ProviderAgent
    from federation.tls import ClusterAuthority, key_matches

    fed = federation
    fed.add_lab("lab-a", user="alice")
    authority = ClusterAuthority()

    def stored_request(lid: str) -> str:
        (row,) = fed.db_dicts(f"SELECT worker_csr FROM lease WHERE id = '{lid}'")
        return row["worker_csr"]

    async def sent(agent: ProviderAgent) -> None:
        """The requests the agent spawned on its loop, answered."""
        await asyncio.wait_for(asyncio.gather(*agent._tasks), 30)

    async def scenario() -> None:
        agent = ProviderAgent(fed.url, fed.provider_tokens["lab-a"],
                              Capacity(cpus=2, memory=2**30), workdir=tmp_path / "agent",
                              name="in-process", warm_workers=0)
        api = httpx.AsyncClient(base_url=f"{fed.url}/api/v1", timeout=30, headers={
            "Authorization": f"Bearer {fed.user_tokens['alice']}"})
        try:
            await agent._register()
            cluster = (await api.post("/clusters", json={
                "scheduler_address": "tls://127.0.0.1:1",
                "ca_cert": authority.ca_pem})).json()["id"]
            placed = await api.post(f"/clusters/{cluster}/leases", json={
                "spec": {"cpus": 1, "memory": "256 MiB"},
                "workers": [{"lease_id": "ls-00000000000000a1"}]})
            assert placed.status_code == 201, placed.text
            listed = await agent.client.request("GET", f"/agent/{agent.provider_id}/leases")
            (lease,) = listed["leases"]
            assert lease["state"] == "starting" and not lease["csr_sent"]
            agent._start_when_certified(lease)
            await sent(agent)
            first = stored_request(lease["id"])
            assert first and key_matches(
                authority.sign_worker_request(lease["id"], first), agent._keys[lease["id"]])
            # The same list again, older than the request: nothing new is asked.
            agent._start_when_certified(lease)
            assert not agent._requesting and stored_request(lease["id"]) == first
            # A certificate for another key than the agent's: a new key and request.
            other = ClusterAuthority().issue(lease["id"], "worker").cert
            agent._start_when_certified({**lease, "csr_sent": True, "cert": other})
            await sent(agent)
            assert stored_request(lease["id"]) not in ("", first)
        finally:
            await api.aclose()
            await agent.client.close()

    asyncio.run(scenario())
