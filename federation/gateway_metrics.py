"""Prometheus metrics of a federation gateway that runs as a process of its own
(``parallex gateway --metrics-port``).

Served on the gateway host's loopback by default (the metrics name no secret, but nothing
outside needs them); the values are read from the gateway at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .gateway import Gateway


class GatewayCollector:
    """What the gateway carries, at scrape time."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gateway = self.gateway
        parked = dict(gateway.parked)  # a copy: the event loop changes it while we read
        yield GaugeMetricFamily("parallex_gateway_parked_connections", "Connections workers "
                                "keep parked at the gateway, waiting to be dialled.",
                                value=float(sum(len(conns) for conns in parked.values())))
        yield GaugeMetricFamily("parallex_gateway_workers_reachable", "Workers (leases) with "
                                "at least one connection parked.",
                                value=float(sum(1 for conns in parked.values() if conns)))
        yield GaugeMetricFamily("parallex_gateway_spliced_connections", "Connections the "
                                "gateway carries now (workers to schedulers, anyone to a "
                                "worker).", value=float(gateway.splicing))
        yield CounterMetricFamily("parallex_gateway_routed", "Connections routed since the "
                                  "gateway started.", value=float(gateway.routed))
        yield CounterMetricFamily("parallex_gateway_refused", "Connections refused since the "
                                  "gateway started (not TLS, unknown or ended cluster, no "
                                  "parked connection, too many parked, unreadable database).",
                                  value=float(gateway.refused))


def serve_metrics(gateway: Gateway, port: int, address: str = "127.0.0.1") -> int:
    """Serve /metrics on ``address``:``port`` (0: a free port); returns the port."""
    registry = CollectorRegistry()
    registry.register(GatewayCollector(gateway))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server.server_port
