"""The federation gateway: one public port where workers outside the hub's network reach their
cluster's scheduler. Each TLS connection is routed by the server name its ClientHello carries
(SNI, ``<cluster id>.parallex``) to that cluster's scheduler; the gateway reads nothing past
the ClientHello and holds no cluster's key, so TLS stays end to end between the worker and its
scheduler (a certificate of one cluster still fails against another).

Workers dial it with ``parallex://<gateway host>:<port>/<cluster id>`` addresses
(federation.gateway_comm).

Workers behind NAT accept nothing inbound, so connections *to* a worker go through the gateway
too, the other way round (HTCondor's CCB does the same): the worker keeps a few connections
parked at the gateway under its lease id (``PXPARK <lease id>``); a connection whose server name
is ``<lease id>.parallex`` takes one (``GO`` / ``OK``), and the worker runs the TLS server
side of the handshake on it. A parked connection proves nothing about who parked it: a
stranger parking under a lease id gets connections it cannot complete (it has no certificate
from the cluster's CA), which the dialer sees as a failed handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
from collections.abc import Callable

from .ids import LEASE_ID, OBJECT_ID

logger = logging.getLogger("parallex.gateway")

#: The Dask comm scheme of addresses through the gateway (federation.gateway_comm).
SCHEME = "parallex"
#: What follows the cluster id in the server name a worker asks the gateway for.
SNI_SUFFIX = ".parallex"
#: The most ClientHello bytes the gateway reads before it gives up on a connection.
MAX_HELLO = 64 * 1024
#: Seconds a new connection may take to send its ClientHello or its parking request. Only
#: that first message is timed.
HELLO_TIMEOUT = 10.0
#: TCP keepalive on the gateway's connections: seconds idle before the first probe, seconds
#: between probes, probes unanswered before the connection is dropped.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_PROBES = 3


class NotRoutable(ValueError):
    """A connection the gateway does not route (not TLS, no or unknown server name)."""


def server_name(cluster_id: str) -> str:
    """The TLS server name of a cluster at the gateway ('cl_7fe8…' → 'cl-7fe8….parallex':
    a DNS label may not hold '_')."""
    return cluster_id.replace("_", "-") + SNI_SUFFIX


def gateway_address(gateway: str, cluster_id: str) -> str:
    """The address a worker dials to reach ``cluster_id`` through ``gateway`` (host:port)."""
    return f"{SCHEME}://{gateway}/{cluster_id}"


#: Parked connections one lease may keep at the gateway.
MAX_PARKED = 8
#: Seconds a connection to a worker waits for one of its parked connections.
PARK_WAIT = 10.0


def lease_of(name: str) -> str | None:
    """The lease id a server name asks for ('ls-….parallex'), None when it is not one."""
    if not name.endswith(SNI_SUFFIX):
        return None
    label = name[: -len(SNI_SUFFIX)]
    return label if label.startswith("ls-") and re.fullmatch(LEASE_ID, label) else None


def cluster_of(name: str) -> str | None:
    """The cluster id a server name asks for, None when it is not one of ours."""
    if not name.endswith(SNI_SUFFIX):
        return None
    label = name[: -len(SNI_SUFFIX)]
    cluster = label.replace("-", "_", 1)
    return cluster if label.startswith("cl-") and re.fullmatch(OBJECT_ID, cluster) else None


def parse_sni(hello: bytes) -> str | None:
    """The server name in a ClientHello handshake message (type, length, body), or None."""
    try:
        if hello[0] != 1:
            raise NotRoutable("the first handshake message is not a ClientHello")
        at = 4 + 2 + 32  # type + length, client version, random
        at += 1 + hello[at]  # session id
        (n,) = struct.unpack_from("!H", hello, at)
        at += 2 + n  # cipher suites
        at += 1 + hello[at]  # compression methods
        if at >= len(hello):
            return None  # no extensions
        (end,) = struct.unpack_from("!H", hello, at)
        at += 2
        end += at
        while at + 4 <= end:
            kind, size = struct.unpack_from("!HH", hello, at)
            at += 4
            if kind == 0:  # server_name: list length, then (type, length, name)
                name_type, name_len = struct.unpack_from("!BH", hello, at + 2)
                if name_type == 0:
                    return hello[at + 5: at + 5 + name_len].decode("ascii")
            at += size
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise NotRoutable(f"malformed ClientHello: {exc}") from exc
    return None


async def read_client_hello(reader: asyncio.StreamReader,
                            first: bytes = b"") -> tuple[bytes, str | None]:
    """Read TLS records until the whole ClientHello is in; (the raw bytes read, its SNI).
    ``first``: bytes of the first record already read."""
    raw = b""
    handshake = b""
    while True:
        header = first + await reader.readexactly(5 - len(first))
        first = b""
        kind, _version, length = struct.unpack("!BHH", header)
        if kind != 22:  # handshake
            raise NotRoutable("not a TLS handshake")
        raw += header + await reader.readexactly(length)
        handshake += raw[-length:]
        if len(raw) > MAX_HELLO:
            raise NotRoutable(f"ClientHello larger than {MAX_HELLO} bytes")
        if len(handshake) >= 4:
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= needed:
                return raw, parse_sni(handshake[:needed])


class Gateway:
    """Routes workers' TLS connections to schedulers by server name.

    ``route(cluster_id)`` gives the scheduler's ``host:port`` (or None for an unknown or
    ended cluster), called in a thread; the brokers' clusters table is the source
    (``Broker.scheduler_of`` in a broker's process, ``gateway_routes.DatabaseRoutes`` in
    ``parallex gateway``'s)."""

    def __init__(self, route: Callable[[str], str | None]):
        self.route = route
        self.server: asyncio.Server | None = None
        self.refused = 0
        self.routed = 0
        self.splicing = 0  # connections being carried now
        # lease id -> its worker's parked connections, oldest first: (reader, writer, an
        # event set once the connection has been used, which ends its parking handler, the
        # read that notices its worker closing it while parked)
        self.parked: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                          asyncio.Event, asyncio.Future]]] = {}
        # lease id -> an event set when one of its connections parks, and the dials waiting
        # on it; both are dropped once nothing is parked or waiting, as leases come and go
        # for months in a gateway's process.
        self._parked_event: dict[str, asyncio.Event] = {}
        self._dialling: dict[str, int] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = await asyncio.start_server(self._handle, host, port)

    @property
    def address(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        keep_alive(writer)
        try:
            try:
                # Only what a connection says first is timed: a parked connection then waits
                # for as long as its worker lives, and a spliced one carries that worker's
                # comm (a scheduler's pooled connection, a peer's) for as long as Dask keeps it.
                async with asyncio.timeout(HELLO_TIMEOUT):
                    first = await reader.readexactly(1)
                    if first == b"P":
                        parking = await _parking_request(reader)
                    else:
                        parking = None
                        raw, name = await read_client_hello(reader, first=first)
                if parking is not None:
                    await self._park(parking, reader, writer)
                    return
                lease = lease_of(name or "")
                used = None
                if lease is not None:
                    up_reader, up_writer, used = await self._take_parked(lease)
                else:
                    cluster = cluster_of(name or "")
                    # A database read: off the event loop, which carries every splice.
                    target = await asyncio.to_thread(self.route, cluster) if cluster else None
                    if target is None:
                        raise NotRoutable(f"no active cluster for server name {name!r}")
                    host, _, port = target.rpartition(":")
                    up_reader, up_writer = await asyncio.open_connection(host.strip("[]"),
                                                                         int(port))
                    keep_alive(up_writer)
            except (NotRoutable, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
                self.refused += 1
                logger.info("gateway: refused a connection from %s: %s", peer, exc)
                return
            self.routed += 1
            self.splicing += 1
            up_writer.write(raw)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self.splicing -= 1
                if used is not None:
                    used.set()
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    async def _park(self, lease: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """A worker's parked connection waits here until a connection to that worker takes
        it, or its worker closes it (then it leaves the lease's list at once, so connections
        that died while parked neither fill the lease's ``MAX_PARKED`` nor delay a dial)."""
        waiting = self.parked.setdefault(lease, [])
        if len(waiting) >= MAX_PARKED:
            raise NotRoutable(f"lease {lease} already has {MAX_PARKED} parked connections")
        used = asyncio.Event()
        # The worker sends nothing until it is told GO, so a byte or an end of stream here
        # means it went away. _take_parked cancels this read before it says GO.
        watch = asyncio.ensure_future(reader.read(1))
        parked = (reader, writer, used, watch)
        waiting.append(parked)
        self._parked_event.setdefault(lease, asyncio.Event()).set()
        try:
            await asyncio.wait({watch})
            if not watch.cancelled():
                return  # closed (or talking out of turn) while parked: drop it
            # Taken: stay while it is in use, since asyncio closes a connection whose handler
            # ends.
            await used.wait()
        finally:
            watch.cancel()
            with contextlib.suppress(ValueError):
                waiting.remove(parked)
            if not waiting and self.parked.get(lease) is waiting:
                del self.parked[lease]
                if lease not in self._dialling:
                    self._parked_event.pop(lease, None)

    async def _take_parked(self, lease: str):
        """One of the lease's parked connections, told to expect a connection; waits up to
        PARK_WAIT seconds for one."""
        self._dialling[lease] = self._dialling.get(lease, 0) + 1
        try:
            return await self._take_parked_in_time(lease)
        finally:
            self._dialling[lease] -= 1
            if not self._dialling[lease]:
                del self._dialling[lease]
                if lease not in self.parked:
                    self._parked_event.pop(lease, None)

    async def _take_parked_in_time(self, lease: str):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PARK_WAIT
        while True:
            waiting = self.parked.get(lease) or []
            while waiting:
                reader, writer, used, watch = waiting.pop(0)
                watch.cancel()
                await asyncio.wait({watch})  # the reader is free once the watch has ended
                if not watch.cancelled():
                    continue  # its worker closed it first; its handler is ending
                try:
                    writer.write(b"GO\n")
                    await writer.drain()
                    async with asyncio.timeout(5):
                        if await reader.readline() == b"OK\n":
                            return reader, writer, used
                except (OSError, TimeoutError, asyncio.IncompleteReadError):
                    pass
                writer.close()  # gone or confused: the worker parks another
                used.set()
            event = self._parked_event.setdefault(lease, asyncio.Event())
            event.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise NotRoutable(f"worker {lease} has no connection parked at the gateway")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await event.wait()


async def _parking_request(reader: asyncio.StreamReader) -> str:
    """The lease id of a parking request, ``PXPARK <lease id>\\n`` (its ``P`` already read)."""
    line = await reader.readline()
    parts = line.decode("ascii", "replace").split()
    if len(parts) != 2 or parts[0] != "XPARK" or lease_of(parts[1] + SNI_SUFFIX) is None:
        raise NotRoutable(f"bad parking request {line[:80]!r}")
    return parts[1]


def keep_alive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive on a gateway connection: a parked or spliced connection may sit idle for
    hours, and keepalive both holds its NAT mappings open and lets a peer that vanished without
    a word (a machine switched off, a mapping dropped) end it after about a minute."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until either side closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()
