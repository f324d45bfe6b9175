"""The site deployment (deploy/site/compose.yaml) comes up and serves the journey: people
sign in through the hub, its broker replica and the second one share the database, lab
machines register on either, the dashboards open, the gateway listens, and it all stops.

With a container runtime (docker with compose and a running daemon) the compose stack is
built and brought up; otherwise the same file and environment run as processes
(federation.site), with a throwaway PostgreSQL standing for the `db` service.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from federation.ports import free_port
from federation.site import SiteError, interpolate, plan, read_env_file, start_site
from tests.utils.hub import DEMO_USERS, INSTITUTION_RULES, browser_login, start_institution
from tests.utils.postgres import fresh_database, postgres_server
from tests.utils.procs import wait_until

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "deploy" / "site"
COMPOSE = SITE / "compose.yaml"
EXAMPLE_ENV = SITE / "site.env.example"


def container_runtime() -> bool:
    """docker with compose and a daemon that answers."""
    if shutil.which("docker") is None:
        return False
    checks = (["docker", "info"], ["docker", "compose", "version"])
    return all(subprocess.run(c, capture_output=True, timeout=30).returncode == 0
               for c in checks)


@dataclass
class RunningStack:
    hub_url: str
    broker_1: str
    broker_2: str
    gateway_port: int
    admin_token: str
    gateway_metrics: str


def site_environment(tmp: Path, db_url: str, hub_port: int) -> tuple[dict[str, str], list]:
    """The test's part of the environment (it wins over site.env.example, as the shell's does
    with compose): secrets, free ports on loopback, and two institutions' identity providers
    (the npm oidc-provider) named in a hub.yaml of the example's shape."""
    hub_url = f"http://127.0.0.1:{hub_port}"
    institutions = {name: start_institution(tmp, name, title, DEMO_USERS[name], hub_url)
                    for name, title in (("north", "North University"),
                                        ("south", "South Institute"))}
    import yaml

    (tmp / "hub.yaml").write_text(yaml.safe_dump({"public_url": hub_url, "institutions": {
        name: {**INSTITUTION_RULES[name], "issuer": inst.issuer, "client_id": "parallex-hub",
               "client_secret_env": f"{name.upper()}_OIDC_SECRET"}
        for name, inst in institutions.items()}}))
    gateway_port = free_port()
    overrides = {
        "PARALLEX_DB_URL": db_url, "PARALLEX_DB_PASSWORD": "unused-by-processes",
        "PARALLEX_ADMIN_TOKEN": secrets.token_hex(24),
        "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
        "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16),
        "PARALLEX_HUB_PUBLIC_URL": hub_url, "PARALLEX_BIND": "127.0.0.1",
        "PARALLEX_HUB_SETTINGS_FILE": str(tmp / "hub.yaml"),
        "PARALLEX_GATEWAY_PUBLIC": f"127.0.0.1:{gateway_port}",
        "PARALLEX_GATEWAY_INTERNAL": f"127.0.0.1:{gateway_port}",
        "PARALLEX_HUB_PORT": str(hub_port), "PARALLEX_GATEWAY_PORT": str(gateway_port),
        **{f"PARALLEX_{k}_PORT": str(free_port()) for k in (
            "BROKER", "BROKER_2", "HUB_INTERNAL", "PROXY_API", "DASHBOARD",
            "GATEWAY_METRICS")},
        **{f"{n.upper()}_OIDC_SECRET": i.client_secret for n, i in institutions.items()},
    }
    return read_env_file(EXAMPLE_ENV, overrides), list(institutions.values())


@contextlib.contextmanager
def as_processes(tmp: Path) -> Iterator[RunningStack]:
    with postgres_server() as server, contextlib.ExitStack() as stack:
        hub_port = free_port()
        env, institutions = site_environment(tmp, fresh_database(server, "site"), hub_port)
        for inst in institutions:
            stack.callback(inst.provider.stop)
            stack.callback(inst.relay.stop)
        site = start_site(COMPOSE, env, tmp / "data", progress=lambda _line: None)
        stack.callback(site.stop)
        # The gateway is a service of its own: a broker's restart leaves workers connected.
        assert {"hub", "broker-2", "gateway"} <= set(site.processes), set(site.processes)
        yield RunningStack(f"http://127.0.0.1:{hub_port}",
                           f"http://127.0.0.1:{env['PARALLEX_BROKER_PORT']}",
                           f"http://127.0.0.1:{env['PARALLEX_BROKER_2_PORT']}",
                           int(env["PARALLEX_GATEWAY_PORT"]), env["PARALLEX_ADMIN_TOKEN"],
                           f"http://127.0.0.1:{env['PARALLEX_GATEWAY_METRICS_PORT']}/metrics")
        processes = list(site.processes.values())
        started = [child for p in processes
                   for child in psutil.Process(p.pid).children(recursive=True)]
        assert len(started) >= 3  # the hub's proxy, broker replica 1 and the dashboards
        site.stop()
        assert all(p.poll() is not None for p in processes), "a service outlived stop()"
        assert not [c for c in started if c.is_running() and c.status() != "zombie"], \
            "a process a service started outlived stop()"


@contextlib.contextmanager
def as_containers(tmp: Path) -> Iterator[RunningStack]:
    """The compose stack itself, published on loopback (run where docker is available)."""
    hub_port = free_port()
    env, institutions = site_environment(tmp, "", hub_port)
    # In containers the database is the db service and the identity providers must be
    # reachable from the hub's container: the host's network.
    env["PARALLEX_DB_URL"] = (f"postgresql://parallex:{env['PARALLEX_DB_PASSWORD']}"
                              "@db:5432/parallex")
    env["PARALLEX_BIND"] = "0.0.0.0"
    env["PARALLEX_GATEWAY_INTERNAL"] = f"gateway:{env['PARALLEX_GATEWAY_PORT']}"
    env_file = tmp / "site.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()
                                if k.startswith(("PARALLEX_", "JUPYTERHUB_", "CONFIGPROXY_",
                                                 "NORTH_", "SOUTH_"))))
    project = f"parallex-test-{secrets.token_hex(4)}"
    compose = ["docker", "compose", "-p", project, "-f", str(COMPOSE),
               "--env-file", str(env_file)]
    try:
        subprocess.run([*compose, "up", "-d", "--build", "--wait"], check=True, timeout=1200)
        yield RunningStack(f"http://127.0.0.1:{hub_port}",
                           f"http://127.0.0.1:{env['PARALLEX_BROKER_PORT']}",
                           f"http://127.0.0.1:{env['PARALLEX_BROKER_2_PORT']}",
                           int(env["PARALLEX_GATEWAY_PORT"]), env["PARALLEX_ADMIN_TOKEN"],
                           f"http://127.0.0.1:{env['PARALLEX_GATEWAY_METRICS_PORT']}/metrics")
    finally:
        subprocess.run([*compose, "down", "-v"], timeout=300)
        for inst in institutions:
            inst.provider.stop()
            inst.relay.stop()


@pytest.fixture
def stack(tmp_path):
    runner = as_containers if container_runtime() else as_processes
    with runner(tmp_path) as running:
        yield running


def leaders(stack: RunningStack) -> float:
    total = 0.0
    for url in (stack.broker_1, stack.broker_2):
        text = httpx.get(f"{url}/api/v1/metrics", timeout=10,
                         headers={"Authorization": f"Bearer {stack.admin_token}"}).text
        for family in text_string_to_metric_families(text):
            total += sum(s.value for s in family.samples if s.name == "parallex_broker_leader")
    return total


def test_the_site_stack_serves_sign_in_both_replicas_dashboards_and_the_gateway(stack):
    assert httpx.get(f"{stack.hub_url}/hub/api/", timeout=10).status_code == 200

    # A student signs in through their institution; the hub records their lab through its
    # broker replica, and the other replica reads it from the shared database.
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        landed = browser_login(stack.hub_url, "north", "alice", "alice-pw", browser)
        assert landed.status_code == 200 and str(landed.url).endswith("/hub/home"), \
            landed.text[:500]
        dashboards = browser.get(f"{stack.hub_url}/services/parallex-dashboard/")
        assert dashboards.status_code == 200, dashboards.text[:500]
        assert "/services/parallex-dashboard/" in str(dashboards.url)

    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    labs = httpx.get(f"{stack.broker_2}/api/v1/labs", headers=admin, timeout=10)
    assert "north-physics" in {lab["name"] for lab in labs.json()}, labs.text

    # A lab machine registers on replica 2; replica 1 (the hub's) sees it.
    token = httpx.post(f"{stack.broker_2}/api/v1/tokens", headers=admin, timeout=10,
                       json={"kind": "provider", "lab": "north-physics"}).json()["token"]
    registered = httpx.post(f"{stack.broker_2}/api/v1/agent/register", timeout=10,
                            headers={"Authorization": f"Bearer {token}"},
                            json={"name": "rack-1", "cpus": 4, "memory": 2**33, "gpus": []})
    assert registered.status_code == 201, registered.text
    machines = httpx.get(f"{stack.broker_1}/api/v1/providers", headers=admin, timeout=10)
    assert registered.json()["provider_id"] in {p["id"] for p in machines.json()}, machines.text

    # One replica runs the periodic passes.
    wait_until(lambda: leaders(stack) == 1, 30, "one broker replica to lead")

    # The gateway (its own service) accepts lab workers' connections, and serves its metrics.
    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=5):
        pass
    scraped = httpx.get(stack.gateway_metrics, timeout=10)
    assert scraped.status_code == 200 and "parallex_gateway_parked_connections" in scraped.text


def test_a_missing_secret_is_named_and_nothing_starts(tmp_path):
    env = read_env_file(EXAMPLE_ENV, {"PARALLEX_DB_URL": "postgresql://x@127.0.0.1:1/x"})
    del env["PARALLEX_ADMIN_TOKEN"]
    with pytest.raises(SiteError, match="PARALLEX_ADMIN_TOKEN is not set"):
        plan(COMPOSE, env, tmp_path / "data")


def test_without_a_database_url_the_processes_refuse_to_start(tmp_path):
    env = read_env_file(EXAMPLE_ENV, {"PARALLEX_DB_URL": ""})
    with pytest.raises(SiteError, match="set PARALLEX_DB_URL"):
        plan(COMPOSE, env, tmp_path / "data")


def test_the_processes_follow_the_compose_file(tmp_path):
    env = read_env_file(EXAMPLE_ENV, {"PARALLEX_DB_URL": "postgresql://u@h/d",
                                      "PARALLEX_HUB_SETTINGS_FILE": "/etc/site/hub.yaml"})
    site = plan(COMPOSE, env, tmp_path / "data")
    order = [s.name for s in site.services]
    assert order.index("migrate") < order.index("hub") and "db" not in order
    assert site.external == {"db": "PARALLEX_DB_URL"}
    migrate = next(s for s in site.services if s.name == "migrate")
    assert migrate.one_shot and migrate.command[-1] == "postgresql://u@h/d"
    hub = next(s for s in site.services if s.name == "hub")
    # Container paths become host paths: the repository, the settings file, named volumes.
    assert hub.command[-1] == str(REPO / "hub_config" / "jupyterhub_config.py")
    assert hub.environment["PARALLEX_HUB_SETTINGS"] == "/etc/site/hub.yaml"
    assert hub.environment["PARALLEX_HUB_DATA"] == str(tmp_path / "data" / "hub")
    assert hub.environment["PARALLEX_HUB_DB_URL"] == \
        f"sqlite:///{tmp_path / 'data' / 'hub'}/jupyterhub.sqlite"
    # The gateway runs apart from the brokers, and both replicas name it.
    assert "PARALLEX_GATEWAY" not in hub.environment
    assert hub.environment["PARALLEX_GATEWAY_INTERNAL"] == "gateway:8786"
    gateway = next(s for s in site.services if s.name == "gateway")
    assert Path(gateway.command[0]).name == "parallex" and gateway.command[1] == "gateway"
    assert gateway.command[-1] == "0.0.0.0:8786" and gateway.ready_urls == ["tcp://127.0.0.1:8786"]
    assert "--metrics-port" in gateway.command
    broker_2 = next(s for s in site.services if s.name == "broker-2")
    assert broker_2.command[-4:] == ["--gateway-public", "gw.hub.example.edu:8786",
                                     "--gateway-internal", "gateway:8786"]


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("${A}", {"A": "1"}, "1"),
    ("${A:-x}", {"A": ""}, "x"),
    ("${A-x}", {"A": ""}, ""),
    ("${A-x}", {}, "x"),
    ("$${A}", {"A": "1"}, "${A}"),
])
def test_variables_are_read_as_compose_reads_them(text, env, expected):
    assert interpolate(text, env) == expected


def test_a_malformed_environment_line_is_named(tmp_path):
    bad = tmp_path / "site.env"
    bad.write_text("GOOD=1\nthis is not a setting\n")
    with pytest.raises(SiteError, match=r"site.env:2: expected KEY=VALUE"):
        read_env_file(bad, {})
