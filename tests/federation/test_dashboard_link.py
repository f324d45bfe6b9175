"""The Dask dashboard through the broker, for users whose notebook server cannot proxy it: a
capability link told only to the cluster's owner, pages and Bokeh's websockets relayed to the
cluster's own scheduler, nothing for a wrong key or an ended cluster. And the broker accepts
schedulers only inside its --scheduler-networks, so neither the gateway nor this proxy can be
pointed at other hosts."""

from __future__ import annotations

import re
import subprocess

import httpx

from federation import FederatedCluster
from federation.tls import ClusterAuthority
from tests.utils.browser import chromium
from tests.utils.procs import parallex


def test_the_broker_serves_a_clusters_dashboard_to_the_link_only(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    fed.add_user("lab-a", "carol")
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=True) as cluster:
        link = cluster.broker_dashboard_link
        assert link and link.startswith(
            f"{fed.url}/api/v1/clusters/{cluster.cluster_id}/dashboard/"), link
        assert link.endswith("/status")
        # Outside a JupyterHub server, Dask's own link (the user's machine reaches it).
        assert cluster.dashboard_link != link
        page = httpx.get(link, timeout=30)
        assert page.status_code == 200 and "Dask" in page.text, page.text[:300]
        # Dask's redirect to its absolute /status stays under the link.
        root = httpx.get(link.removesuffix("status"), timeout=30)
        assert root.status_code in (301, 302, 307)
        assert root.headers["location"] == link.removeprefix(fed.url), root.headers
        # The key is the capability: another one, or another cluster's, gets nothing.
        prefix, key = link.removesuffix("/status").rsplit("/", 1)
        wrong = httpx.get(f"{prefix}/{key[:-1]}x/status", timeout=30)
        assert wrong.status_code == 404
        assert wrong.json()["error"] == "unknown-dashboard"
        with FederatedCluster(fed.url, fed.user_tokens["carol"], dashboard=True) as other:
            swapped = other.broker_dashboard_link.replace(other.cluster_id, cluster.cluster_id)
            assert httpx.get(swapped, timeout=30).status_code == 404
        assert httpx.post(link, timeout=30).status_code == 405
        # The key is not in what the broker tells anyone later.
        listed = httpx.get(f"{fed.url}/api/v1/clusters/{cluster.cluster_id}", timeout=30,
                           headers={"Authorization": f"Bearer {fed.user_tokens['alice']}"})
        assert key not in listed.text and listed.json()["dashboard_path"] is None
        # In a browser: the page draws its live plots over the relayed websocket.
        with chromium() as browser:
            tab = browser.new_page()
            sockets: list[str] = []
            tab.on("websocket", lambda ws: sockets.append(ws.url))
            tab.goto(link)
            tab.wait_for_function("document.title.includes('Dask')", timeout=60_000)
            tab.locator(".bk-Canvas, canvas").first.wait_for(timeout=60_000)
            assert any(f"/clusters/{cluster.cluster_id}/dashboard/{key}/" in url
                       for url in sockets), sockets
    # An ended cluster's link is dead.
    assert httpx.get(link, timeout=30).status_code == 404


def test_schedulers_outside_the_allowed_networks_are_refused(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    user = {"Authorization": f"Bearer {fed.user_tokens['alice']}"}
    ca = ClusterAuthority().ca_pem
    before = fed.db_value("SELECT count(*) FROM cluster")
    for address, says in (("tls://8.8.8.8:8786", "outside the networks"),
                          ("tls://169.254.169.254:80", "outside the networks"),
                          ("tls://db.internal.example:5432", "must name an IP address")):
        refused = httpx.post(f"{fed.url}/api/v1/clusters", headers=user, timeout=30,
                             json={"scheduler_address": address, "ca_cert": ca})
        assert refused.status_code == 422, refused.text
        assert says in refused.json()["message"], refused.json()
    assert fed.db_value("SELECT count(*) FROM cluster") == before
    bad = subprocess.run(parallex("broker", "--db-url", f"sqlite:///{fed.tmp / 'x.db'}",
                                  "--scheduler-networks", "10.0.0.0/33"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert re.search(r"--scheduler-networks: '10.0.0.0/33' is not a network", bad.stderr)
    assert "Traceback" not in bad.stderr
