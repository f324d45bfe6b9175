"""A GPU lease is priced by the GPU it was placed on, not by the model asked for (issue 11):
a lease that asks for "any GPU" and lands on an H200 pays the H200 class."""

from __future__ import annotations

from sqlalchemy import text

from federation.broker import db
from federation.tls import ClusterAuthority
from tests.utils.federation import api_client as api
from tests.utils.schema import insert_lab_user_cluster, insert_provider

GiB = 2**30


def test_a_lease_placed_on_an_h200_is_charged_the_h200_class(federation):
    fed = federation
    fed.add_lab("lab-a")
    fed.add_lab("lab-b", user="alice")  # alice's work on lab-a's machine is charged
    with api(fed, fed.provider_tokens["lab-a"]) as agent, \
            api(fed, fed.user_tokens["alice"]) as user:
        registered = agent.post("/agent/register", json={
            "name": "gpu-box", "cpus": 8, "memory": "64 GiB",
            "gpus": [{"index": 0, "model": "NVIDIA H200", "memory": 141 * GiB}]})
        assert registered.status_code == 201, registered.text
        provider = registered.json()["provider_id"]
        cluster = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                               "ca_cert": ClusterAuthority().ca_pem}).json()["id"]
        spec = {"cpus": 1, "memory": "4 GiB", "gpus": 1}
        asked = user.post(f"/clusters/{cluster}/leases", json={
            "spec": spec, "workers": [{"lease_id": "ls-0123456789abcdef"}]})
        assert asked.status_code == 201, asked.text
        (lease,) = user.get(f"/clusters/{cluster}").json()["leases"]
        assert lease["state"] == "starting" and lease["gpu_model"] is None
        assert lease["placed_gpu_model"] == "NVIDIA H200"
        # The worker starts and joins: the lease runs and accrues.
        assert agent.post(f"/agent/{provider}/leases/{lease['id']}/state",
                          json={"state": "running"}).status_code == 200
        beat = user.post(f"/clusters/{cluster}/heartbeat", json={"connected": [lease["id"]]})
        assert beat.status_code == 200, beat.text
        cost = user.get(f"/clusters/{cluster}/cost").json()
        h200 = user.post("/prices/quote", json={"spec": {**spec, "gpu_model": "h200"},
                                                "workers": 1}).json()
        anything = user.post("/prices/quote", json={"spec": spec, "workers": 1}).json()
        assert h200["gpu_class"] == "h200" and anything["gpu_class"] == "default"
        assert cost["list_pcu_per_hour"] == h200["pcu_per_hour_per_worker"]
        assert cost["list_pcu_per_hour"] > anything["pcu_per_hour_per_worker"]


def test_upgrade_backfills_the_placed_gpu_model_from_the_provider(tmp_path):
    engine = db.plain_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(engine, "0005")
    t = "2026-01-01 00:00:00"
    with engine.begin() as c:
        insert_lab_user_cluster(c, t)
        insert_provider(c, t, '[{"index": 0, "model": "NVIDIA T4", "memory": 1}, '
                              '{"index": 1, "model": "NVIDIA H200", "memory": 1}]')
        for lease_id, gpus, indices in (("ls-gpu", 1, "[1]"), ("ls-cpu", 0, "[]")):
            c.execute(text(
                "INSERT INTO lease (id, cluster_id, provider_id, \"group\", cpus, memory, gpus, "
                "gpu_indices_json, state, message, worker_csr, worker_cert, created_at) VALUES "
                "(:i, 'c1', 'p1', 'default', 1, 1, :g, :x, 'running', '', '', '', :t)"),
                {"i": lease_id, "g": gpus, "x": indices, "t": t})
    db.migrate(engine)
    with engine.connect() as c:
        placed = dict(c.execute(text("SELECT id, placed_gpu_model FROM lease")).all())
    assert placed == {"ls-gpu": "NVIDIA H200", "ls-cpu": None}


def test_an_administrator_adds_a_gpu_class_to_a_running_federation(federation):
    """`parallex admin price set --gpu-class b200=b200:20`: from then on a lease on a B200
    pays 20 PCU/h for its GPU, not the default class; a bad class is a 422 naming the fault,
    and nothing is written."""
    import subprocess

    from tests.utils.procs import parallex

    fed = federation
    fed.add_lab("lab-a")
    fed.add_lab("lab-b", user="alice")
    env = {"PARALLEX_BROKER_URL": fed.url, "PARALLEX_ADMIN_TOKEN": fed.admin_token}

    def price_set(*extra: str) -> subprocess.CompletedProcess:
        import os
        return subprocess.run(parallex("admin", "price", "set", "--cpu", "1", "--mem", "0.1",
                                       *extra), env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60)

    refused = price_set("--gpu-class", "b200=([:20")
    assert refused.returncode != 0 and "not a regular expression" in refused.stderr, \
        refused.stderr
    refused = price_set("--gpu-class", "h100=h100:5")
    assert refused.returncode != 0 and "exists already" in refused.stderr, refused.stderr
    with api(fed, fed.admin_token) as admin:
        before = admin.get("/prices").json()
        assert before["upcoming"] == [] and "b200" not in str(before["current"])
    added = price_set("--gpu-class", "b200=b200:20")
    assert added.returncode == 0, added.stderr
    with api(fed, fed.provider_tokens["lab-a"]) as agent, \
            api(fed, fed.user_tokens["alice"]) as user:
        provider = agent.post("/agent/register", json={
            "name": "new-box", "cpus": 8, "memory": "64 GiB",
            "gpus": [{"index": 0, "model": "NVIDIA B200", "memory": 180 * GiB}]}).json()[
            "provider_id"]
        cluster = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                               "ca_cert": ClusterAuthority().ca_pem}).json()["id"]
        spec = {"cpus": 1, "memory": "4 GiB", "gpus": 1}
        assert user.post(f"/clusters/{cluster}/leases", json={
            "spec": spec, "workers": [{"lease_id": "ls-00000000000000b2"}]}).status_code == 201
        assert agent.post(f"/agent/{provider}/leases/ls-00000000000000b2/state",
                          json={"state": "running"}).status_code == 200
        user.post(f"/clusters/{cluster}/heartbeat", json={"connected": ["ls-00000000000000b2"]})
        cost = user.get(f"/clusters/{cluster}/cost").json()
        cpu_only = user.post("/prices/quote", json={"spec": {**spec, "gpus": 0},
                                                    "workers": 1}).json()
        assert cost["list_pcu_per_hour"] == cpu_only["pcu_per_hour_per_worker"] + 20
