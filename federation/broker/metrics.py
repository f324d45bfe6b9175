"""Prometheus metrics of the broker, at ``GET /api/v1/metrics`` (administrator token).

Two kinds: what the database says at scrape time (leases by state and lab, the oldest pending
lease's age, agents online, PCU/h by lab), read by a collector so a scrape always sees the
federation as it is, whichever broker replica answers; and what this process timed (placement
and metering passes, HTTP requests by route), histograms of this replica only.

Each app has its own registry: tests build many apps in one process, and Prometheus client's
global registry would refuse a second set of the same names.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import case, func
from sqlmodel import Session, col, select

from accounting.models import Lab, as_utc, utcnow
from accounting.pricing import Resources, pcu_per_hour, price_at

from ..lease_states import NOT_ENDED_STATES
from . import API_PREFIX
from .models import ClusterRecord, Lease, LeaseState, Provider

#: Seconds buckets for passes (placement, metering): from a few ms to a minute.
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Buckets for how many requests one batch served.
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
#: Seconds buckets for HTTP requests (long polls are excluded: they wait on purpose).
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class FederationCollector:
    """Gauges read from the database at each scrape."""

    def __init__(self, session) -> None:
        self.session = session

    def collect(self) -> Iterator[GaugeMetricFamily]:
        leases = GaugeMetricFamily("parallex_leases", "Leases by state and by the lab of "
                                   "the user whose cluster holds them.",
                                   labels=["state", "lab"])
        oldest = GaugeMetricFamily("parallex_oldest_pending_lease_seconds",
                                   "Age of the oldest lease waiting for a provider (0: none).")
        agents = GaugeMetricFamily("parallex_agents_online", "Provider agents online, by lab.",
                                   labels=["lab"])
        offering = GaugeMetricFamily("parallex_agents_offering", "Online provider agents whose "
                                     "owner policy offers the machine now, by lab.",
                                     labels=["lab"])
        spending = GaugeMetricFamily("parallex_pcu_per_hour", "PCU per hour the lab's running "
                                     "leases cost now (own machines included).", labels=["lab"])
        with self.session() as s:
            labs = dict(s.exec(select(Lab.id, Lab.name)).all())
            for state, lab_id, n in s.exec(
                    select(Lease.state, ClusterRecord.lab_id, func.count())
                    .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
                    .where(col(Lease.state).in_(NOT_ENDED_STATES))
                    .group_by(Lease.state, ClusterRecord.lab_id)).all():
                leases.add_metric([str(getattr(state, "value", state)), labs.get(lab_id, "")], n)
            first = s.exec(select(func.min(Lease.created_at))
                           .where(Lease.state == LeaseState.pending)).one()
            oldest.add_metric([], (utcnow() - as_utc(first)).total_seconds() if first else 0.0)
            for lab_id, online, offered in s.exec(
                    select(Provider.lab_id, func.count(),
                           func.sum(case((Provider.offering == True, 1), else_=0)))  # noqa: E712
                    .where(Provider.online == True)  # noqa: E712
                    .group_by(Provider.lab_id)).all():
                agents.add_metric([labs.get(lab_id, "")], online)
                offering.add_metric([labs.get(lab_id, "")], float(offered or 0))
            for lab, rate in _pcu_per_hour(s, labs).items():
                spending.add_metric([lab], rate)
        yield from (leases, oldest, agents, offering, spending)


def _pcu_per_hour(s: Session, labs: dict[int, str]) -> dict[str, float]:
    price = price_at(s, utcnow())
    rates: dict[str, float] = {}
    for lease, lab_id in s.exec(
            select(Lease, ClusterRecord.lab_id)
            .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
            .where(Lease.state == LeaseState.running)).all():
        res = Resources(lease.cpus, lease.memory, lease.gpus, lease.priced_gpu_model)
        lab = labs.get(lab_id, "")
        rates[lab] = rates.get(lab, 0.0) + pcu_per_hour(price, res)
    return rates


class BrokerMetrics:
    """The broker's registry and the timings it records."""

    def __init__(self, session) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(FederationCollector(session))
        self.placement = Histogram("parallex_placement_pass_seconds",
                                   "Seconds of one placement pass, its commit included "
                                   "(this replica; its wait for the lock is "
                                   "parallex_placement_lock_wait_seconds).",
                                   buckets=PASS_BUCKETS, registry=self.registry)
        self.placement_passes = Counter(
            "parallex_placement_passes_total",
            "Placement passes this replica ran, by the process that ran them: the placement "
            "process (PostgreSQL, once started) or the broker's own (SQLite; before the "
            "placement process started, or after it died).", ["process"],
            registry=self.registry)
        self.placement_lock_wait = Histogram(
            "parallex_placement_lock_wait_seconds",
            "Seconds a placement pass waited for the placement lock, which another "
            "replica's pass held (PostgreSQL; this replica).", buckets=PASS_BUCKETS,
            registry=self.registry)
        self.scale_admission = Histogram(
            "parallex_scale_admission_seconds",
            "Seconds a scale request's admission took, from its transaction's start to its "
            "commit, its wait for the lab's admission lock included (this replica).",
            buckets=PASS_BUCKETS, registry=self.registry)
        self.scale_placement_wait = Histogram(
            "parallex_scale_placement_wait_seconds",
            "Seconds a scale request waited, after its commit, for the placement pass that "
            "placed its leases or said why they wait (this replica).",
            buckets=PASS_BUCKETS, registry=self.registry)
        self.metering = Histogram("parallex_metering_pass_seconds",
                                  "Seconds of one periodic metering pass (this replica).",
                                  buckets=PASS_BUCKETS, registry=self.registry)
        self.heartbeat_batch = Histogram("parallex_heartbeat_batch_seconds",
                                         "Seconds to record one batch of agents' heartbeats "
                                         "(this replica).", buckets=PASS_BUCKETS,
                                         registry=self.registry)
        self.heartbeat_batch_size = Histogram("parallex_heartbeat_batch_size",
                                              "Heartbeats recorded by one batch (this "
                                              "replica).", buckets=BATCH_SIZE_BUCKETS,
                                              registry=self.registry)
        self.report_batch = Histogram("parallex_report_batch_seconds",
                                      "Seconds to record one batch of agents' lease reports "
                                      "(this replica).", buckets=PASS_BUCKETS,
                                      registry=self.registry)
        self.report_batch_size = Histogram("parallex_report_batch_size",
                                           "Lease reports recorded by one batch (this "
                                           "replica).", buckets=BATCH_SIZE_BUCKETS,
                                           registry=self.registry)
        self.loop_lag = Histogram("parallex_event_loop_lag_seconds",
                                  "How late this replica's event loop ran a timer due now "
                                  "(sampled 10 times a second): above a few ms, requests "
                                  "queue before they are read (this replica).",
                                  buckets=HTTP_BUCKETS, registry=self.registry)
        self.asks_to_leader = Gauge(
            "parallex_placement_asks_to_leader", "Asks for a placement pass this replica "
            "sent to the leader replica since it started (it places only while it leads).",
            registry=self.registry)
        self.placement_fallbacks = Gauge(
            "parallex_placement_fallbacks", "Scale requests this replica placed itself since "
            "it started because the leader had not answered their ask within 2.5 s (a "
            "leader that died or is overloaded).", registry=self.registry)
        self.frozen_objects = Gauge(
            "parallex_gc_frozen_objects", "Objects this replica's start-up made that the "
            "garbage collector no longer walks (collector.py; 0: a broker inside another "
            "program, whose collector is left as it is).", registry=self.registry)
        self.frozen_objects.set_function(lambda: float(gc.get_freeze_count()))
        # python_gc_collections_total{generation} and the objects collected: full
        # collections stop every thread of the replica.
        GCCollector(registry=self.registry)
        self.long_polls = Gauge(
            "parallex_long_polls_waiting", "Long polls of agents (their lease lists) and "
            "clusters (signing requests) this replica holds open now.", registry=self.registry)
        self.reports_running = Gauge(
            "parallex_reports_running", "Reports that sum usage history this replica is "
            "running now (at most --report-threads).", registry=self.registry)
        self.reports_waiting = Gauge(
            "parallex_reports_waiting", "Reports that sum usage history waiting for one of "
            "this replica's --report-threads (holding no request thread).",
            registry=self.registry)
        self.leader = Gauge("parallex_broker_leader", "1 on the replica that runs the "
                            "periodic passes (reaping, metering, capacity samples), else 0.",
                            registry=self.registry)
        self.agent_fast_path = Counter(
            "parallex_agent_fast_path_total",
            "Agents' heartbeats, lease reports and lease-list polls by how this replica took "
            "them: answered on the fast path (agent_fast_path.py) or handed on to the API's "
            "full routing (a malformed request, an unusual query or a body over 64 KiB; "
            "the answer is the same, it costs more).", ["outcome"], registry=self.registry)
        self.heartbeats_answered = Counter(
            "parallex_agent_heartbeats_answered_total",
            "Agents' heartbeats answered by this replica, by when: once queued (the heartbeat "
            "repeats the last one recorded here, and the replica's heartbeat batches commit) "
            "or after their batch (it changes something, or the batches fail or stall; "
            "refusals included).",
            ["when"], registry=self.registry)
        self.http = Histogram("parallex_http_request_seconds",
                              "Seconds to answer a request, by method and route template "
                              "under /api/v1 (this replica; long polls excluded).",
                              labelnames=["method", "route"], buckets=HTTP_BUCKETS,
                              registry=self.registry)
        self.http_responses = Counter(
            "parallex_http_responses_total",
            "Answers by method, route template under /api/v1 ('' where none matched, or "
            "none was matched yet: the rate limiter's 429s) and HTTP status (this replica; "
            "long polls included): 503s are the database or a batch that could not answer, "
            "500s the broker's own failures.",
            ["method", "route", "status"], registry=self.registry)


#: Methods counted by name in ``parallex_http_responses_total`` (others count as "other").
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class HttpTimer:
    """ASGI middleware timing and counting each HTTP request by its route template (bounded
    labels: never the raw path, which holds ids), and counting its answers by status."""

    #: Routes that wait on purpose (long polls of agents and clusters).
    UNTIMED = ("/agent/{provider_id}/leases", "/clusters/{cluster_id}/signing-requests")

    def __init__(self, app, metrics: BrokerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # An exception that leaves the app before it answered is answered 500 outside.
        status = 500

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None)
            template = template and template.removeprefix(API_PREFIX)
            if template and template not in self.UNTIMED:
                self.metrics.http.labels(scope["method"], template).observe(
                    time.perf_counter() - start)
            # Only known methods: any other word a client sends would be a new series.
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.http_responses.labels(method, template or "", str(status)).inc()
