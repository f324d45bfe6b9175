"""Prometheus metrics of a provider agent (``parallex provide --metrics-port``).

Served on the lab machine's loopback by default: a lab's firewall then still sees no
listener, and a node-local Prometheus (or node exporter's textfile, or an SSH tunnel) reads it.
The values are read from the agent at scrape time; the heartbeat's round trip to the broker
is the one thing timed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .agent import ProviderAgent

#: Seconds buckets of the heartbeat's round trip to the broker.
HEARTBEAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class AgentCollector:
    """What the agent holds and offers, at scrape time."""

    def __init__(self, agent: ProviderAgent):
        self.agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily]:
        agent = self.agent
        workers = GaugeMetricFamily("parallex_agent_workers", "Workers this agent runs, by "
                                    "state (running or suspended for the owner).",
                                    labels=["state"])
        suspended = len(agent._suspended & set(agent.workers))
        workers.add_metric(["running"], len(agent.workers) - suspended)
        workers.add_metric(["suspended"], suspended)
        yield workers
        yield GaugeMetricFamily("parallex_agent_registered", "1 once the broker accepted this "
                                "agent, else 0.", value=float(agent.registered.is_set()))
        yield GaugeMetricFamily("parallex_agent_offering", "1 while the owner policy offers the "
                                "machine, else 0.", value=float(agent.offering))
        yield GaugeMetricFamily("parallex_agent_cpus_offered", "CPU cores offered.",
                                value=float(agent.capacity.cpus))
        yield GaugeMetricFamily("parallex_agent_cpus_leased", "CPU cores held by this "
                                "agent's leases.",
                                value=float(sum(agent._sizes.get(lid, 0.0)
                                                for lid in agent.workers)))
        yield GaugeMetricFamily("parallex_agent_memory_offered_bytes", "Memory offered.",
                                value=float(agent.capacity.memory))
        yield GaugeMetricFamily("parallex_agent_warm_workers", "Worker interpreters started "
                                "and waiting for a lease.", value=float(agent._ready))
        envs = agent.environments
        yield GaugeMetricFamily("parallex_agent_environments_ready", "Clusters' software "
                                "environments built and cached here.",
                                value=float(envs.ready_count()))
        yield GaugeMetricFamily("parallex_agent_environments_bytes", "Disk the cached "
                                "environments take, in bytes.", value=float(envs.disk_bytes()))
        yield GaugeMetricFamily("parallex_agent_environment_builds_running", "Environment "
                                "builds running now.", value=float(envs.building()))
        builds = CounterMetricFamily("parallex_agent_environment_builds", "Environment builds "
                                     "since the agent started, by outcome (built, failed).",
                                     labels=["outcome"])
        for outcome in ("built", "failed"):
            builds.add_metric([outcome], float(envs.builds[outcome]))
        yield builds


class AgentMetrics:
    """The agent's registry; ``serve`` starts the HTTP endpoint."""

    def __init__(self, agent: ProviderAgent):
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(agent))
        self.heartbeat = Histogram("parallex_agent_heartbeat_seconds", "Seconds of a "
                                   "heartbeat's round trip to the broker.",
                                   buckets=HEARTBEAT_BUCKETS, registry=self.registry)

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve /metrics on ``address``:``port`` (0: a free port); returns the port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server.server_port
