"""The federation gateway: it reads only the ClientHello's server name, routes to the named
active cluster's scheduler, refuses everything else, and leaves TLS end to end (a worker of one
cluster still fails against another). With `parallex broker --gateway`, workers of real
agents reach their schedulers through it and compute."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from federation import FederatedCluster
from federation.gateway import (
    Gateway,
    NotRoutable,
    cluster_of,
    gateway_address,
    read_client_hello,
    server_name,
)
from tests.utils.federation import make_federation


def client_hello(name: str | None) -> bytes:
    """The bytes a TLS client sends first, asking for server name ``name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def hello_of(data: bytes) -> tuple[bytes, str | None]:
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_client_hello(reader)

    return asyncio.run(go())


def test_the_server_name_is_read_from_a_real_client_hello():
    name = server_name("cl_7fe87be983cc")
    assert name == "cl-7fe87be983cc.parallex"
    assert cluster_of(name) == "cl_7fe87be983cc"
    assert cluster_of("example.org") is None
    data = client_hello(name)
    raw, sni = hello_of(data)
    assert (raw, sni) == (data, name)
    assert hello_of(client_hello(None))[1] is None
    with pytest.raises(NotRoutable, match="not a TLS handshake"):
        hello_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert gateway_address("gw.example.edu:8786", "cl_1") == "parallex://gw.example.edu:8786/cl_1"


def test_the_gateway_refuses_what_it_cannot_route():
    async def go():
        gateway = Gateway(lambda cluster: None)
        await gateway.start()
        host, port = gateway.address.split(":")
        for payload in (b"plain bytes, not TLS", client_hello(server_name("cl_unknown")),
                        client_hello("example.org")):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(payload)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing said
            writer.close()
        await gateway.close()
        return gateway.refused

    assert asyncio.run(go()) == 3


def test_workers_reach_their_schedulers_through_the_gateway(tmp_path):
    fed = make_federation(tmp_path, broker_args=("--gateway", "127.0.0.1:0"))
    try:
        gateway = fed.broker.wait_for_line("PARALLEX_GATEWAY=")
        fed.add_lab("lab-a", user="alice")
        # Behind NAT: its workers accept no connections from other sites (the broker keeps
        # a cluster using it within its site).
        fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB",
                      extra=("--no-peer-connections",))
        assert fed.db_value("SELECT accepts_peers FROM provider WHERE name = 'agent-a'") == 0
        with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                              heartbeat_interval=0.5) as cluster:
            cluster.scale(2, memory="1 GiB")
            cluster.wait_for_workers(2)
            client = cluster.get_client()
            total = client.submit(sum, [1, 2, 3], pure=False).result(timeout=30)
            assert total == 6
            # Each worker dialled the gateway with its cluster's address, not the scheduler.
            via = gateway_address(gateway, cluster.cluster_id)
            for worker in cluster.connected_workers():
                log = (fed.workdirs["agent-a"] / "leases" / worker["lease"] /
                       "worker.log").read_text()
                assert f"Registered to: {via}" in log, log[-2000:]
    finally:
        fed.stop()
