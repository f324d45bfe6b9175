"""The federation gateway: it reads only the ClientHello's server name, routes to the named
active cluster's scheduler, refuses everything else, and leaves TLS end to end (a worker of one
cluster still fails against another). With `parallex broker --gateway`, workers of real
agents reach their schedulers through it and compute."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import ssl
import time

import dask
import pytest

from federation import FederatedCluster
from federation.errors import ParallexError
from federation.gateway import (
    Gateway,
    NotRoutable,
    cluster_of,
    gateway_address,
    read_client_hello,
    server_name,
)
from federation.ports import free_port
from tests.utils.delay_relay import Relay
from tests.utils.federation import make_federation
from tests.utils.procs import Proc, parallex, ready, wait_until
from tests.utils.scrape import samples


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


def worker_and_scheduler(tmp_path, lease: str):
    """Dask ``Security`` of a worker holding ``lease`` and of its cluster's scheduler (one
    cluster CA), the worker's files under ``tmp_path``."""
    from distributed.security import Security

    from federation.tls import ROLE_SCHEDULER, ClusterAuthority, worker_key_and_request

    ca = ClusterAuthority()
    key, csr = worker_key_and_request(lease)
    for name, text in (("ca.pem", ca.ca_pem), ("cert.pem", ca.sign_worker_request(lease, csr)),
                       ("key.pem", key)):
        (tmp_path / name).write_text(text)
    worker = Security(tls_ca_file=str(tmp_path / "ca.pem"),
                      tls_worker_cert=str(tmp_path / "cert.pem"),
                      tls_worker_key=str(tmp_path / "key.pem"), require_encryption=True)
    issued = ca.issue("scheduler", ROLE_SCHEDULER)
    scheduler = Security(tls_ca_file=ca.ca_pem, tls_scheduler_cert=issued.cert,
                         tls_scheduler_key=issued.key, require_encryption=True)
    return worker, scheduler


async def eventually(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` on the running loop until it holds; fail with ``what`` on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


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
            # Each worker dialled the gateway with its cluster's address, not the scheduler,
            # and is dialled there too (its connections parked under its lease id).
            via = gateway_address(gateway, cluster.cluster_id)
            workers = cluster.connected_workers()
            for worker in workers:
                assert worker["address"] == gateway_address(gateway, worker["lease"])
                log = (fed.workdirs["agent-a"] / "leases" / worker["lease"] /
                       "worker.log").read_text()
                assert f"Registered to: {via}" in log, log[-2000:]
            # The scheduler gathers from a worker, and a worker fetches from the other,
            # both through the gateway.
            first, second = (w["address"] for w in workers)
            made = client.submit(list, range(1000), workers=[first], pure=False)
            summed = client.submit(sum, made, workers=[second], pure=False)
            assert summed.result(timeout=30) == sum(range(1000))
            assert len(made.result(timeout=30)) == 1000
            # Dask's P2P shuffle, worker to worker through the gateway.
            import dask
            import dask.dataframe as dd
            import pandas as pd

            left = dd.from_pandas(pd.DataFrame({"k": range(2000), "a": range(2000)}),
                                  npartitions=4)
            right = dd.from_pandas(pd.DataFrame({"k": range(0, 4000, 2), "b": 1}),
                                   npartitions=3)
            with dask.config.set({"dataframe.shuffle.method": "p2p"}):
                merged = client.compute(left.merge(right, on="k")).result(timeout=120)
            assert len(merged) == 1000
    finally:
        fed.stop()


def test_a_worker_behind_nat_is_dialled_through_connections_it_parked(tmp_path, monkeypatch):
    """The reverse path alone: a listener that accepts nothing inbound keeps connections
    parked at the gateway; Dask comms dialled to it arrive over them, TLS end to end."""
    from distributed.comm import connect, listen
    from distributed.security import Security

    from federation.gateway_comm import LEASE_ENV, PARKED
    from federation.tls import ROLE_SCHEDULER, ClusterAuthority

    lease = "ls-0123456789abcdef"
    worker, scheduler = worker_and_scheduler(tmp_path, lease)
    stranger_ca = ClusterAuthority()
    other = stranger_ca.issue("scheduler", ROLE_SCHEDULER)
    stranger = Security(tls_ca_file=stranger_ca.ca_pem, tls_scheduler_cert=other.cert,
                        tls_scheduler_key=other.key, require_encryption=True)
    monkeypatch.setenv(LEASE_ENV, lease)

    async def go():
        gateway = Gateway(lambda cluster: None)
        await gateway.start()

        async def echo(comm):
            await comm.write({"echo": await comm.read()})
            await comm.close()

        listener = await listen(f"parallex://{gateway.address}", echo,
                                **worker.get_listen_args("worker"))
        try:
            assert listener.contact_address == gateway_address(gateway.address, lease)
            async with asyncio.timeout(10):
                while len(gateway.parked.get(lease, [])) < PARKED:
                    await asyncio.sleep(0.02)
            answers = []
            for i in range(5):
                comm = await connect(listener.contact_address,
                                     **scheduler.get_connection_args("scheduler"))
                await comm.write(i)
                answers.append(await comm.read())
                await comm.close()
            # A dialler of another cluster (another CA) fails the worker's handshake.
            from distributed.comm.core import CommClosedError

            with pytest.raises((CommClosedError, OSError)):
                comm = await connect(listener.contact_address, timeout=5,
                                     **stranger.get_connection_args("scheduler"))
                await comm.write(0)
                await comm.read()
            async with asyncio.timeout(10):  # each used connection was replaced
                while len(gateway.parked.get(lease, [])) < PARKED:
                    await asyncio.sleep(0.02)
            return answers
        finally:
            listener.stop()
            await gateway.close()

    assert asyncio.run(go()) == [{"echo": i} for i in range(5)]


def test_a_connection_to_a_worker_outlives_the_gateways_hello_timeout(tmp_path, monkeypatch):
    """Only what a connection says first is timed. A scheduler's connection to a worker behind
    NAT, spliced onto one of its parked connections, still carries messages after several hello
    timeouts, and the worker's other parked connections stay parked until it stops listening.
    (The gateway once timed
    a parked connection's whole life, so every connection to a worker died within 10 s of
    being parked: a notebook's `client.run` failed with "Stream is closed" when the
    scheduler reused one from its pool.)"""
    from distributed.comm import connect, listen
    from distributed.comm.core import CommClosedError

    from federation import gateway as gateway_module
    from federation.gateway_comm import LEASE_ENV, PARKED

    lease = "ls-0123456789abcdef"
    worker, scheduler = worker_and_scheduler(tmp_path, lease)
    monkeypatch.setenv(LEASE_ENV, lease)
    monkeypatch.setattr(gateway_module, "HELLO_TIMEOUT", 0.3)

    async def go():
        gateway = Gateway(lambda cluster: None)
        await gateway.start()

        async def echo(comm):
            with contextlib.suppress(CommClosedError):
                while True:
                    await comm.write(await comm.read())

        listener = await listen(f"parallex://{gateway.address}", echo,
                                **worker.get_listen_args("worker"))
        try:
            await eventually(lambda: len(gateway.parked.get(lease, [])) == PARKED, 10,
                             "the worker's parked connections")
            parked_before = list(gateway.parked[lease])
            comm = await connect(listener.contact_address,
                                 **scheduler.get_connection_args("scheduler"))
            answers = []
            for i in range(4):
                await comm.write(i)
                answers.append(await comm.read())
                # The connection's age is what is under test: each pause is longer than the
                # hello timeout, so the last message goes four timeouts after parking.
                await asyncio.sleep(0.4)
            await comm.close()
            kept = [conn for conn in parked_before if conn in gateway.parked.get(lease, [])]
            # A worker that stops listening takes its parked connections with it.
            listener.stop()
            await eventually(lambda: lease not in gateway.parked, 5,
                             "a stopped listener's parked connections to leave the gateway")
            return answers, len(kept), gateway.refused
        finally:
            listener.stop()
            await gateway.close()

    answers, kept, refused = asyncio.run(go())
    assert answers == [0, 1, 2, 3]
    assert kept == PARKED - 1  # one was taken by the connection; the others were never dropped
    assert refused == 0


def test_parked_connections_their_worker_closed_leave_the_gateway_at_once():
    """A parked connection whose worker closes it leaves the lease's list at once, so dead
    ones neither fill the lease's MAX_PARKED (which refuses new parking) nor wait for a dial."""
    from federation.gateway import MAX_PARKED

    lease = "ls-0123456789abcdef"

    async def go():
        gateway = Gateway(lambda cluster: None)
        await gateway.start()
        host, port = gateway.address.split(":")

        async def park():
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"PXPARK {lease}\n".encode())
            await writer.drain()
            return reader, writer

        try:
            first = [await park() for _ in range(MAX_PARKED)]
            await eventually(lambda: len(gateway.parked.get(lease, [])) == MAX_PARKED, 10,
                             f"{MAX_PARKED} parked connections")
            reader, writer = await park()  # one too many: refused, closed without a word
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            for _, writer in first:
                writer.close()
            await eventually(lambda: lease not in gateway.parked, 5,
                             "closed parked connections to leave the gateway")
            again = [await park() for _ in range(MAX_PARKED)]
            await eventually(lambda: len(gateway.parked.get(lease, [])) == MAX_PARKED, 10,
                             "parking again after the worker's connections closed")
            for _, writer in again:
                writer.close()
            # Nothing is kept for a lease with nothing parked (a gateway runs for months).
            await eventually(lambda: not gateway.parked and not gateway._parked_event, 5,
                             "the lease's parking state to go")
            return gateway.refused
        finally:
            await gateway.close()

    assert asyncio.run(go()) == 1


def test_workers_behind_a_gateway_of_its_own_outlive_their_broker_killed_and_restarted(
        tmp_path):
    """`parallex gateway` runs apart from the brokers, which name it (--gateway-public). A
    broker killed with -9 and restarted leaves workers' connections alone: the cluster keeps
    its workers and what they hold, and no lease ends. (With the gateway inside the broker,
    its restart ended every lease behind it "failed": a Dask worker ends when its scheduler
    connection drops, and the provider's reliability paid for it.)"""
    port = free_port()
    fed = make_federation(tmp_path, broker_args=("--gateway-public", f"127.0.0.1:{port}"))
    db_url = fed.db_url or f"sqlite:///{tmp_path / 'broker.db'}"
    gateway = Proc(parallex("--log-level", "INFO", "gateway", "--listen", f"127.0.0.1:{port}",
                            "--db-url", db_url, "--metrics-port", "0"),
                   tmp_path / "gateway.log")
    try:
        assert ready(gateway, "PARALLEX_GATEWAY=") == f"127.0.0.1:{port}"
        metrics_url = ready(gateway, "PARALLEX_GATEWAY_METRICS=")
        fed.add_lab("lab-a", user="alice")
        fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB",
                      extra=("--no-peer-connections",))
        with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                              heartbeat_interval=0.5) as cluster:
            cluster.scale(2, memory="1 GiB")
            cluster.wait_for_workers(2)
            client = cluster.get_client()
            workers = sorted(client.run(lambda: 0))
            assert [w.rsplit("/", 1)[0] for w in workers] == [f"parallex://127.0.0.1:{port}"] * 2
            held = client.submit(random.random, pure=False)
            value = held.result()
            leases = fed.db_dicts("SELECT id, state FROM lease ORDER BY id")
            assert [le["state"] for le in leases] == ["running", "running"]
            # Its metrics: both workers parked their three connections (a dialled one is
            # replaced), and it carries at least their two connections to the scheduler.
            parked = "parallex_gateway_parked_connections"
            wait_until(lambda: samples(metrics_url)[parked] == 6, 30,
                       "both workers' parked connections in the gateway's metrics")
            seen = samples(metrics_url)
            assert seen["parallex_gateway_workers_reachable"] == 2
            assert seen["parallex_gateway_spliced_connections"] >= 2
            assert seen["parallex_gateway_routed_total"] >= 4  # to the scheduler, and back

            fed.broker.kill9()
            restarted = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            fed.restart_broker()

            def seen_again() -> bool:
                (row,) = fed.db_dicts("SELECT p.last_seen AS agent, c.last_seen AS cluster "
                                      "FROM provider p, cluster c")
                return all(dt.datetime.fromisoformat(row[k]).replace(tzinfo=None) > restarted
                           for k in ("agent", "cluster"))

            wait_until(seen_again, 60, "the agent and the cluster to reach the new broker")
            assert sorted(client.run(lambda: 0)) == workers
            assert held.result() == value  # still in a worker's memory, not computed again
            assert client.submit(lambda x: x + 1, 1).result() == 2
            assert fed.db_dicts("SELECT id, state FROM lease ORDER BY id") == leases
    finally:
        gateway.stop()
        fed.stop()


def test_a_certificate_of_one_cluster_fails_against_another_through_the_gateway():
    """The gateway routes by name only; the scheduler's own TLS refuses a worker whose
    certificate another cluster's CA signed, even when it names this cluster."""
    from distributed.comm import connect, listen
    from distributed.comm.core import CommClosedError
    from distributed.security import Security

    from federation.tls import ROLE_SCHEDULER, ROLE_WORKER, ClusterAuthority

    def security(ca: ClusterAuthority, role: str, kind: str) -> Security:
        issued = ca.issue(kind, role)
        return Security(tls_ca_file=ca.ca_pem, require_encryption=True,
                        **{f"tls_{kind}_cert": issued.cert, f"tls_{kind}_key": issued.key})

    ours, theirs = ClusterAuthority(), ClusterAuthority()
    scheduler = security(ours, ROLE_SCHEDULER, "scheduler")

    async def go():
        async def echo(comm):
            await comm.write(await comm.read())
            await comm.close()

        listener = await listen("tls://127.0.0.1:0", echo,
                                **scheduler.get_listen_args("scheduler"))
        await listener.start()
        host_port = listener.contact_address.removeprefix("tls://")
        gateway = Gateway(lambda cluster: host_port if cluster == "cl_0123456789ab" else None)
        await gateway.start()
        try:
            address = gateway_address(gateway.address, "cl_0123456789ab")
            comm = await connect(address, **security(ours, ROLE_WORKER, "worker")
                                 .get_connection_args("worker"))
            await comm.write("ours")
            assert await comm.read() == "ours"
            await comm.close()
            with pytest.raises((CommClosedError, OSError)):
                comm = await connect(address, timeout=5, **security(
                    theirs, ROLE_WORKER, "worker").get_connection_args("worker"))
                await comm.write("theirs")
                await comm.read()
        finally:
            listener.stop()
            await gateway.close()

    asyncio.run(go())


def test_a_cluster_measures_its_round_trips_and_hides_them(tmp_path):
    """Workers 40 ms away (a delay relay in front of the gateway's public address): the
    cluster measures that round trip, its scheduler dials workers through the gateway's
    inside address (one WAN crossing, not two) and runs with the federation's settings."""
    gateway = free_port()
    relay = Relay([("127.0.0.1", gateway)])
    fed = make_federation(tmp_path, broker_args=(
        "--gateway", f"127.0.0.1:{gateway}", "--gateway-public", f"127.0.0.1:{relay.ports[0]}"))
    try:
        relay.set_rtt(40)
        fed.add_lab("lab-a", user="alice")
        fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB")
        with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                              worker_memory="1 GiB") as cluster:
            cluster.scale(2)
            cluster.wait_for_workers(2)
            trips = cluster.round_trips()
            assert sorted(trips) == sorted(w["name"] for w in cluster.connected_workers())
            # At least the relay's 40 ms; well under the 80 ms of a detour through the
            # gateway's public address.
            assert all(0.040 <= rtt < 0.075 for rtt in trips.values()), trips
            client = cluster.get_client()
            assert client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) == float("inf")
            # Queuing is off, so a worker is handed tasks ahead of its thread.
            slow = client.map(time.sleep, [0.2] * 8, pure=False)
            wait_until(lambda: max(map(len, client.processing().values()), default=0) > 2, 10,
                       "a worker to hold more tasks than queuing would give it (2)")
            client.gather(slow)
        # {} gives Dask's defaults back (queuing at 1.1).
        with dask.config.set({"parallex.scheduler.latency-settings": {}}), FederatedCluster(
                fed.url, fed.user_tokens["alice"], dashboard=False) as plain:
            assert plain.get_client().run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) == 1.1
        with dask.config.set({"parallex.scheduler.latency-settings": "fast"}), \
                pytest.raises(ParallexError, match="must map Dask config keys"):
            FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False)
    finally:
        fed.stop()
        relay.stop()
