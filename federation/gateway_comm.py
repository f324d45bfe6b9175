"""The ``parallex://`` Dask comm: TLS to a cluster's scheduler through the federation gateway.

An address is ``parallex://<gateway host>:<port>/<cluster id>``; connecting opens TLS to the
gateway with the cluster's server name (SNI), which the gateway routes to the scheduler. The
handshake and everything after it are the worker's and the scheduler's own, as with
``tls://``. A worker behind NAT *listens* at ``parallex://<gateway>/<lease id>`` too: the
``ReverseListener`` keeps connections parked at the gateway and serves whatever arrives on
them (scheduler, peers, clients) as a TLS server. Registered as a Dask comm backend through
the ``distributed.comm.backends`` entry point, so a worker process needs no import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from distributed.comm.addressing import parse_host_port
from distributed.comm.core import BaseListener, CommClosedError
from distributed.comm.tcp import (
    MAX_BUFFER_SIZE,
    TLS,
    TLSBackend,
    TLSConnector,
    _expect_tls_context,
    set_tcp_timeout,
)
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from .gateway import SCHEME, server_name

logger = logging.getLogger("parallex.gateway")

#: Connections a worker keeps parked at the gateway, ready for whoever dials it.
PARKED = 3
#: The environment variable that tells a worker's listener its lease id (the dask worker
#: command line turns --listen-address into a host and a port, dropping any path).
LEASE_ENV = "WORKER_LEASE_ID"

#: In a scheduler's process (inside the hub's network): the gateway address to dial instead
#: of the public one in workers' addresses, which may not route back in (no NAT hairpin) or
#: would cross the internet twice. None: dial addresses as they are (workers do).
dial_via: str | None = None


def split(address: str) -> tuple[str, str]:
    """'host:port/cl_x' → ('host:port', 'cl_x'); a ValueError without the cluster."""
    target, _, cluster = address.partition("/")
    if not cluster:
        raise ValueError(f"{SCHEME}:// address {address!r} names no cluster: use "
                         f"{SCHEME}://<gateway host>:<port>/<cluster id>")
    return target, cluster


class GatewayConnector(TLSConnector):
    prefix = f"{SCHEME}://"

    async def connect(self, address, deserialize=True, **connection_args):
        target, cluster = split(address)
        comm = await super().connect(dial_via or target, deserialize, **connection_args,
                                     server_hostname=server_name(cluster))
        comm._peer_addr = f"{self.prefix}{address}"
        return comm


class ReverseListener(BaseListener):
    """Listens for a worker behind NAT: connections parked at the gateway under its lease id
    become incoming TLS connections once someone dials ``parallex://<gateway>/<lease id>``."""

    prefix = f"{SCHEME}://"

    def __init__(self, loc, handle_comm, deserialize=True, allow_offload=True,
                 **connection_args):
        super().__init__()
        self.target, _, lease = loc.partition("/")
        self.lease = lease or os.environ.get(LEASE_ENV, "")
        if not self.lease:
            raise ValueError(f"a {SCHEME}:// listener needs its lease id: "
                             f"{SCHEME}://<gateway>/<lease id> or {LEASE_ENV}")
        self.comm_handler = handle_comm
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self.ssl_context = _expect_tls_context(connection_args)
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    async def start(self) -> None:
        for _ in range(PARKED):
            self._spawn(self._park())

    def stop(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()

    @property
    def listen_address(self) -> str:
        return f"{self.prefix}{self.target}/{self.lease}"

    @property
    def contact_address(self) -> str:
        return self.listen_address

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _park(self) -> None:
        """Keep one connection parked; when it is taken, park another and serve it."""
        host, port = parse_host_port(self.target)
        delay = 0.1
        while not self._closing:
            stream = None
            try:
                stream = await TCPClient().connect(host, port, max_buffer_size=MAX_BUFFER_SIZE)
                # A parked connection idles until dialled: keepalive holds the lab's NAT
                # mapping open and notices a gateway that vanished, so the worker parks anew.
                set_tcp_timeout(stream)
                await stream.write(f"PXPARK {self.lease}\n".encode())
                if await stream.read_until(b"\n", max_bytes=16) != b"GO\n":
                    stream.close()
                    continue
                await stream.write(b"OK\n")
            except asyncio.CancelledError:
                # Stopped while parked: the gateway holds a parked connection until its
                # worker closes it, and this one would never answer a dial.
                if stream is not None:
                    stream.close()
                raise
            except (StreamClosedError, OSError) as exc:
                logger.debug("parking at the gateway %s failed: %s", self.target, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
                continue
            delay = 0.1
            self._spawn(self._serve(stream))

    async def _serve(self, stream) -> None:
        try:
            stream = await stream.start_tls(True, ssl_options=self.ssl_context)
        except (StreamClosedError, OSError) as exc:
            logger.warning("TLS handshake through the gateway failed: %s", exc)
            return
        comm = TLS(stream, self.listen_address, f"{self.prefix}{self.target}",
                   self.deserialize)
        comm.allow_offload = self.allow_offload
        try:
            await self.on_connection(comm)
        except CommClosedError:
            return
        with contextlib.suppress(CommClosedError):
            await self.comm_handler(comm)


class GatewayBackend(TLSBackend):
    """``parallex://`` addresses: dial through the gateway; listen behind it."""

    _connector_class = GatewayConnector

    def get_listener(self, loc, handle_comm, deserialize, **connection_args):
        return ReverseListener(loc, handle_comm, deserialize, **connection_args)

    # A connection's local address has no cluster part ("parallex://host:port"): the address
    # helpers take both forms; only connecting needs the cluster.

    def get_address_host(self, loc):
        return super().get_address_host(loc.partition("/")[0])

    def get_address_host_port(self, loc):
        return super().get_address_host_port(loc.partition("/")[0])

    def resolve_address(self, loc):
        target, slash, cluster = loc.partition("/")
        return f"{super().resolve_address(target)}{slash}{cluster}"

    def get_local_address_for(self, loc):
        return super().get_local_address_for(loc.partition("/")[0])
