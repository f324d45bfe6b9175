"""The cluster heartbeat's answer is the cluster's view: written by the broker from the rows
(``views.cluster_public_json``, not through the view's models), it must be byte for byte
what pydantic writes for ``ClusterPublic``, with leases in every state. Through the real
broker in this process, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json

from federation.broker.models import ClusterPublic
from federation.broker.views import cluster_head, clusters_public
from tests.utils.in_process import in_process_broker


def test_cluster_heartbeat_answer_is_the_cluster_view(db_url):
    with in_process_broker(db_url, 3) as b:  # "box": 3 CPUs, three 1-CPU leases running
        broker = b.app.state.broker
        released, ended, running = b.ids
        assert b.call(b.user, "POST", f"/clusters/{b.cid}/leases/release",
                      json={"lease_ids": [released, ended]}).status_code == 200
        assert b.call(b.agent, "POST", f"/agent/{b.box}/leases/{ended}/state", json={
            "state": "ended", "reason": "released", "message": "stopped: ünïcode \"quoted\""}
                      ).status_code == 200
        # The box holds two (running, releasing): one of these starts, the others wait.
        asked = [f"ls-view{i}" for i in range(3)]
        assert b.call(b.user, "POST", f"/clusters/{b.cid}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": i} for i in asked]}).status_code == 201

        answer = b.call(b.user, "POST", f"/clusters/{b.cid}/heartbeat", json={"connected": []})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        view = json.loads(answer.content)
        states = {le["id"]: le["state"] for le in view["leases"]}
        assert states[running] == "running" and states[released] == "releasing"
        assert states[ended] == "ended"
        assert "ünïcode" in next(le["message"] for le in view["leases"] if le["id"] == ended)
        assert sorted(states[i] for i in asked) == ["pending", "pending", "starting"]
        with broker.reading() as s:
            pydantic_json = clusters_public(s, [cluster_head(s, b.cid)])[0].model_dump_json()
        assert answer.content == pydantic_json.encode()
        assert ClusterPublic.model_validate_json(answer.content).id == b.cid
        # What the cluster's own route shows (every lease, through FastAPI's response model).
        assert view == b.call(b.user, "GET", f"/clusters/{b.cid}").json()

        # A heartbeat that confirms its starting lease answers from the transaction that
        # made it running.
        starting = next(i for i in asked if states[i] == "starting")
        confirmed = b.call(b.user, "POST", f"/clusters/{b.cid}/heartbeat",
                           json={"connected": [starting]})
        assert confirmed.status_code == 200, confirmed.text
        after = json.loads(confirmed.content)
        assert {le["id"]: le["state"] for le in after["leases"]}[starting] == "running"
        assert after == b.call(b.user, "GET", f"/clusters/{b.cid}").json()
