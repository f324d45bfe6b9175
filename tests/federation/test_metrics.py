"""Prometheus metrics of the broker: what the database says at scrape time (leases by state
and lab, the oldest pending lease, agents online, PCU/h), what the passes and requests took,
and only for an administrator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from federation import FederatedCluster
from federation.ports import free_port
from tests.utils.procs import wait_until

REPO = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_say_what_the_federation_holds_and_how_long_the_broker_took(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB")
    url = f"{fed.url}/api/v1/metrics"
    admin = {"Authorization": f"Bearer {fed.admin_token}"}
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(3)  # the machine holds two: one waits
        cluster.wait_for_workers(2)

        def scraped() -> dict:
            answer = httpx.get(url, headers=admin, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"].startswith("text/plain")
            return samples(answer.text)

        wait_until(lambda: scraped().get(("parallex_leases", (("lab", "lab-a"),
                                                              ("state", "running")))) == 2,
                   30, "two running leases in the metrics")
        now = scraped()
        assert now[("parallex_leases", (("lab", "lab-a"), ("state", "pending")))] == 1
        assert now[("parallex_oldest_pending_lease_seconds", ())] > 0
        assert now[("parallex_agents_online", (("lab", "lab-a"),))] == 1
        assert now[("parallex_agents_offering", (("lab", "lab-a"),))] == 1
        assert now[("parallex_pcu_per_hour", (("lab", "lab-a"),))] > 0
        assert now[("parallex_placement_pass_seconds_count", ())] >= 1
        # Where a scale request's time goes: its admission (the cluster asked at least
        # once: scale(3)), and the passes' waits for the lock. The lease keeper does not
        # wait for the pass after its request (wait=0): none timed yet.
        assert now[("parallex_scale_admission_seconds_count", ())] >= 1
        assert now.get(("parallex_scale_placement_wait_seconds_count", ()), 0) == 0
        assert now[("parallex_placement_lock_wait_seconds_count", ())] >= 1
        # A request through the API that waits for its pass (the default) is timed.
        asked = httpx.post(f"{fed.url}/api/v1/clusters/{cluster.cluster_id}/leases",
                           headers={"Authorization": f"Bearer {fed.user_tokens['alice']}"},
                           json={"spec": {"cpus": 1, "memory": 2**30},
                                 "workers": [{"lease_id": "ls-metrics-waited"}]}, timeout=30)
        assert asked.status_code == 201, asked.text
        assert scraped()[("parallex_scale_placement_wait_seconds_count", ())] == 1
        requests = {dict(labels)["route"] for (name, labels) in now
                    if name == "parallex_http_request_seconds_count"}
        # Route templates, never raw paths with ids; long polls are not timed.
        assert "/clusters/{cluster_id}/leases" in requests, requests
        assert not any(re.search(r"cl_|prv_|ls-", r) for r in requests), requests
        assert "/agent/{provider_id}/leases" not in requests
        # The server process froze what its start-up made (collector.py): a full
        # collection no longer walks it. Collections are counted by generation.
        assert now[("parallex_gc_frozen_objects", ())] > 50_000
        assert now[("python_gc_collections_total", (("generation", "0"),))] >= 0
        # A real agent's heartbeats, lease reports and polls all take the fast path.
        assert now[("parallex_agent_fast_path_total", (("outcome", "answered"),))] >= 3
        assert now[("parallex_agent_fast_path_total", (("outcome", "handed on"),))] == 0
    assert httpx.get(url, timeout=30).status_code == 401
    user = httpx.get(url, headers={"Authorization": f"Bearer {fed.user_tokens['alice']}"},
                     timeout=30)
    assert user.status_code == 403 and "kind: admin" in user.json()["message"]


def test_an_agent_serves_its_own_metrics_on_loopback(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    port = free_port()
    fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB",
                  extra=("--metrics-port", str(port)))
    url = f"http://127.0.0.1:{port}/metrics"
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2)

        def running() -> float | None:
            return samples(httpx.get(url, timeout=10).text).get(
                ("parallex_agent_workers", (("state", "running"),)))

        wait_until(lambda: running() == 2, 30, "the agent's metrics to show two workers")
        now = samples(httpx.get(url, timeout=10).text)
        assert now[("parallex_agent_registered", ())] == 1
        assert now[("parallex_agent_offering", ())] == 1
        assert now[("parallex_agent_cpus_offered", ())] == 2
        assert now[("parallex_agent_cpus_leased", ())] == 2
        assert now[("parallex_agent_heartbeat_seconds_count", ())] >= 1
    # Loopback only: the lab's network sees no listener.
    listening = [c for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"], listening


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Every metric family the broker, an agent and the gateway register (what Prometheus can
    scrape)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from federation.agent_metrics import AgentMetrics
    from federation.broker.app import create_app
    from federation.environment_cache import EnvironmentCache
    from federation.gateway import Gateway
    from federation.gateway_metrics import GatewayCollector

    app = create_app(f"sqlite:///{tmp_path / 'b.db'}", admin_token="t" * 40)
    exposed = generate_latest(app.state.broker.metrics.registry).decode()

    class Idle:  # only what AgentCollector reads
        _suspended: set = set()
        workers: dict = {}
        _sizes: dict = {}
        _ready = 0
        offering = True
        capacity = type("C", (), {"cpus": 1.0, "memory": 1})()
        registered = type("R", (), {"is_set": lambda self: True})()
        environments = EnvironmentCache(tmp_path / "envs")

    exposed += generate_latest(AgentMetrics(Idle()).registry).decode()
    gateway = CollectorRegistry()
    gateway.register(GatewayCollector(Gateway(lambda cluster: None)))
    exposed += generate_latest(gateway).decode()
    return set(re.findall(r"^# TYPE (\w+) ", exposed, re.MULTILINE))


def unknown_metrics(expressions: list[str], names: set[str]) -> set[str]:
    """The parallex_* metrics ``expressions`` use that nothing exports; each expression must
    also parse as PromQL (promql_parser raises ValueError with the reason)."""
    import promql_parser

    used = set()
    for expr in expressions:
        promql_parser.parse(expr)
        used |= set(re.findall(r"parallex_\w+", expr))
    assert used, "the expressions use no Parallex metric"
    return {m for m in used
            if m not in names and re.sub(r"_(bucket|count|sum|total)$", "", m) not in names}


def test_the_grafana_dashboard_plots_only_metrics_that_exist(tmp_path):
    """deploy/grafana/parallex.json against what the broker and an agent register: a renamed
    metric must not leave an empty panel behind, nor a typo a panel that fails to load."""
    dashboard = json.loads((REPO / "deploy" / "grafana" / "parallex.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    unknown = unknown_metrics(exprs, exported_metric_names(tmp_path))
    assert not unknown, unknown


def test_the_alerting_rules_are_well_formed_and_watch_metrics_that_exist(tmp_path):
    """deploy/prometheus-alerts.yml, which deploy/prometheus.yml loads: each rule parses, names
    a severity the file explains, says what to do, and watches only exported metrics."""
    import yaml

    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["prometheus-alerts.yml"]
    rules = [rule for group in yaml.safe_load(
        (REPO / "deploy" / "prometheus-alerts.yml").read_text())["groups"]
        for rule in group["rules"]]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) >= 8, names
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
    unknown = unknown_metrics([rule["expr"] for rule in rules], exported_metric_names(tmp_path))
    assert not unknown, unknown
