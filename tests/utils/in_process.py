"""A broker app in this process, through FastAPI's test client: its batches and passes can be
called directly and its engine observed, with the real database (SQLite or PostgreSQL)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class InProcess:
    """A broker app in this process (its batches callable directly) with lab-a, alice's
    cluster and one 3-CPU machine whose ``ids`` leases run."""

    app: Any
    client: Any
    user: str
    agent: str
    box: str
    cid: str
    ids: list[str]

    def call(self, token: str, method: str, path: str, **kw) -> httpx.Response:
        return self.client.request(method, f"/api/v1{path}", **kw,
                                   headers={"Authorization": f"Bearer {token}"})

    def run_leases(self, ids: list[str]) -> httpx.Response:
        """Ask for ``ids`` (1 CPU, 1 GiB each) on alice's cluster, 100 to a request, then
        confirm them joined in one cluster heartbeat; its answer (the cluster's view)."""
        for k in range(0, len(ids), 100):
            answer = self.call(self.user, "POST", f"/clusters/{self.cid}/leases", json={
                "spec": {"cpus": 1, "memory": "1 GiB"},
                "workers": [{"lease_id": i} for i in ids[k:k + 100]]})
            assert answer.status_code == 201, answer.text
        answer = self.call(self.user, "POST", f"/clusters/{self.cid}/heartbeat",
                           json={"connected": ids})
        assert answer.status_code == 200, answer.text
        return answer


def scraped(client: Any, name: str) -> float:
    """The value of the first sample called ``name`` in the app's /metrics (``client``: its
    TestClient)."""
    answer = client.get("/api/v1/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    answer.raise_for_status()
    return next(s.value for f in text_string_to_metric_families(answer.text)
                for s in f.samples if s.name == name)


@contextlib.contextmanager
def in_process_broker(db_url: str, leases: int, **settings: Any) -> Iterator[InProcess]:
    """``settings``: BrokerSettings fields beyond the defaults here (no cloud prices, no
    minimum between heartbeats)."""
    from fastapi.testclient import TestClient

    from federation.broker.app import create_app
    from federation.broker.settings import BrokerSettings
    from federation.tls import ClusterAuthority

    admin_token = ADMIN_TOKEN
    app = create_app(db_url, BrokerSettings(**{"cloud_prices": None,
                                               "min_heartbeat_interval": 0, **settings}),
                     admin_token=admin_token)
    with TestClient(app) as client:
        b = InProcess(app, client, "", "", "", "", [])
        assert b.call(admin_token, "POST", "/labs", json={"name": "lab-a"}).status_code == 201
        b.user = b.call(admin_token, "POST", "/tokens", json={
            "kind": "user", "lab": "lab-a", "user": "alice"}).json()["token"]
        b.agent = b.call(admin_token, "POST", "/tokens", json={
            "kind": "provider", "lab": "lab-a"}).json()["token"]
        b.box = b.call(b.agent, "POST", "/agent/register", json={
            "name": "box", "cpus": 3, "memory": "8 GiB"}).json()["provider_id"]
        b.cid = b.call(b.user, "POST", "/clusters", json={
            "scheduler_address": "tls://127.0.0.1:1",
            "ca_cert": ClusterAuthority().ca_pem}).json()["id"]
        b.ids = [f"ls-inproc{i}" for i in range(leases)]
        assert b.call(b.user, "POST", f"/clusters/{b.cid}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": i} for i in b.ids]}).status_code == 201
        b.call(b.user, "POST", f"/clusters/{b.cid}/heartbeat", json={"connected": b.ids})
        yield b
