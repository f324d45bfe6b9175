"""The ``parallex://`` Dask comm: TLS to a cluster's scheduler through the federation gateway.

An address is ``parallex://<gateway host>:<port>/<cluster id>``; connecting opens TLS to the
gateway with the cluster's server name (SNI), which the gateway routes to the scheduler. The
handshake and everything after it are the worker's and the scheduler's own, as with
``tls://``. Only connecting uses it: a worker whose scheduler is ``parallex://`` listens with
``tls://`` (the agent passes ``--protocol tls``). Registered as a Dask comm backend through
the ``distributed.comm.backends`` entry point, so a worker process needs no import.
"""

from __future__ import annotations

from distributed.comm.tcp import TLSBackend, TLSConnector

from .gateway import SCHEME, server_name


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
        comm = await super().connect(target, deserialize, **connection_args,
                                     server_hostname=server_name(cluster))
        comm._peer_addr = f"{self.prefix}{address}"
        return comm


class GatewayBackend(TLSBackend):
    """Connect-only backend for ``parallex://`` addresses."""

    _connector_class = GatewayConnector

    def get_listener(self, loc, handle_comm, deserialize, **connection_args):
        raise NotImplementedError(f"{SCHEME}:// addresses are for connecting through the "
                                  "gateway; listen with tls://")

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
