"""The broker samples capacity per lab for the dashboards; `parallex dashboard` serves them
standalone in development and refuses to start without the hub or --dev-user."""

from __future__ import annotations

import os
import subprocess

import pytest

from federation import FederatedCluster
from tests.utils.browser import chromium
from tests.utils.federation import make_federation
from tests.utils.hub import free_port
from tests.utils.procs import Proc, parallex, wait_until


@pytest.fixture
def sampled(tmp_path):
    fed = make_federation(tmp_path, provider_timeout=5, cluster_timeout=10,
                          broker_args=("--capacity-interval", "0.5"))
    try:
        yield fed.with_two_labs()
    finally:
        fed.stop()


def test_capacity_samples_follow_providers_and_leases(sampled):
    fed = sampled
    # The latest pass's rows (one per lab with providers online); a pass taken before the
    # second agent registered has lab-a's only.
    sql = ("SELECT l.name, c.cpus_online, c.cpus_leased FROM capacitysample c "
           "JOIN lab l ON l.id = c.lab_id "
           "WHERE c.at = (SELECT MAX(at) FROM capacitysample)")
    latest = wait_until(lambda: (rows := fed.db_dicts(sql)) and len(rows) == 2 and rows, 30,
                        "a capacity sample of both labs")
    assert {r["name"]: r["cpus_online"] for r in latest} == {"lab-a": 2, "lab-b": 2}
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          heartbeat_interval=0.5) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        leased = wait_until(lambda: sum(r["cpus_leased"] for r in fed.db_dicts(sql)) == 1, 30,
                            "a sample with the worker's CPU leased")
        assert leased


def test_standalone_dashboard_in_chromium_and_refusal_without_hub(sampled, tmp_path):
    fed = sampled
    no_hub = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    refused = subprocess.run(parallex("dashboard", "--db-url", f"sqlite:///{fed.tmp}/broker.db",
                                      "--port", "0"), capture_output=True, text=True,
                             timeout=60, env=no_hub)
    assert refused.returncode == 1 and "use --dev-user for development" in refused.stderr

    port = free_port()
    server = Proc(parallex("dashboard", "--db-url", f"sqlite:///{fed.tmp}/broker.db",
                           "--port", str(port), "--dev-user", "alice"), tmp_path / "dash.log")
    try:
        with chromium() as browser:
            page = browser.new_page()
            wait_until(lambda: _loads(page, f"http://127.0.0.1:{port}/"), 60,
                       "the standalone dashboard to answer")
            page.wait_for_selector(".px-whoami", timeout=60_000)
            header = page.locator(".px-whoami").first.evaluate(
                "e => e.shadowRoot ? e.shadowRoot.textContent : e.textContent")
            assert "alice (member of lab-a)" in header
    finally:
        server.stop()


def _loads(page, url: str) -> bool:
    try:
        return page.goto(url).status == 200
    except Exception:  # not listening yet
        return False


def test_the_dashboard_reads_but_never_migrates_the_brokers_database(tmp_path):
    """The broker owns the schema: a dashboard started on a database at an older revision
    waits (--schema-wait), then says what to do, and leaves the database as it was."""
    from federation.broker import db

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.plain_engine(url)
    db.migrate(engine, "0005")
    refused = subprocess.run(parallex("dashboard", "--db-url", url, "--port", "0",
                                      "--dev-user", "alice", "--schema-wait", "1"),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert "is at schema revision 0005" in refused.stderr
    assert "start (or upgrade) the broker" in refused.stderr
    assert db.current_revision(engine) == "0005"

