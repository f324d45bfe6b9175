"""The cluster heartbeat's answer is the cluster's view: written by the broker from the rows
(``views.cluster_public_json``, not through the view's models), it must be byte for byte
what pydantic writes for ``ClusterPublic``, with leases in every state. Through the real
broker in this process, on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json

from federation.broker import db
from federation.broker.models import ClusterPublic, EndReason, Lease, LeaseState, utcnow
from federation.broker.views import cluster_head, clusters_public
from federation.tls import ClusterAuthority
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
        # What the cluster's own route shows (the same leases, through FastAPI's response model).
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


def test_cluster_views_show_leases_not_ended_and_lately_ended_and_the_newest_clusters(db_url):
    """`GET /clusters/{id}` and `GET /clusters` show a cluster's live leases and those ended in
    the last 10 minutes (as its heartbeat does), not every lease it ever had; the listing is
    the newest ``limit`` clusters (200 by default), oldest first."""
    with in_process_broker(db_url, 3) as b:
        broker = b.app.state.broker
        old, recent, running = b.ids
        now = utcnow()
        with db.session(broker.engine) as s:
            for lease_id, ended_at in ((old, now - dt.timedelta(hours=1)), (recent, now)):
                lease = s.get(Lease, lease_id)
                lease.state, lease.ended_at = LeaseState.ended, ended_at
                lease.end_reason = EndReason.released
                s.add(lease)
            s.commit()
        shown = {le["id"] for le in b.call(b.user, "GET", f"/clusters/{b.cid}").json()["leases"]}
        assert shown == {recent, running}
        listed = b.call(b.user, "GET", "/clusters").json()
        assert [{le["id"] for le in c["leases"]} for c in listed] == [{recent, running}]
        made = [b.call(b.user, "POST", "/clusters", json={
            "scheduler_address": "tls://127.0.0.1:1", "ca_cert": ClusterAuthority().ca_pem}
        ).json()["id"] for _ in range(3)]
        newest = b.call(b.user, "GET", "/clusters", params={"limit": 2}).json()
        assert [c["id"] for c in newest] == made[1:]
        assert [c["id"] for c in b.call(b.user, "GET", "/clusters").json()] == [b.cid, *made]
        for bad in (0, 1001, "x"):
            refused = b.call(b.user, "GET", "/clusters", params={"limit": bad})
            assert refused.status_code == 422 and "limit" in refused.json()["message"]
