"""With several replicas on PostgreSQL only the leader places (placement_asks.py): a scale
request on another replica is placed by the leader's pass and answered with its leases
placed; when the leader steps down the other places from then on; when a leader holds the
lease but never answers, the replica asked places itself after its bound."""

from __future__ import annotations

import contextlib

from fastapi.testclient import TestClient
from sqlalchemy import text

from federation.broker.app import create_app
from federation.broker.settings import BrokerSettings
from tests.utils.in_process import ADMIN_TOKEN, InProcess, in_process_broker, scraped


def scale_one(b: InProcess, client: TestClient, lease_id: str) -> dict:
    answer = client.post(f"/api/v1/clusters/{b.cid}/leases",
                         headers={"Authorization": f"Bearer {b.user}"},
                         json={"spec": {"cpus": 1, "memory": "1 GiB"},
                               "workers": [{"lease_id": lease_id}]})
    assert answer.status_code == 201, answer.text
    [lease] = answer.json()
    return lease


def test_the_leader_places_for_a_replica_that_does_not_lead(postgres_url):
    settings = BrokerSettings(cloud_prices=None, min_heartbeat_interval=0)
    with contextlib.ExitStack() as second_stack, contextlib.ExitStack() as first_stack:
        b = first_stack.enter_context(in_process_broker(postgres_url, 1))  # leads
        first = b.app.state.broker
        second_app = create_app(postgres_url, settings, admin_token=ADMIN_TOKEN)
        second_client = second_stack.enter_context(TestClient(second_app))
        second = second_app.state.broker
        assert first.is_leader and not second.is_leader

        passes_before = first.placing_thread.passes
        lease = scale_one(b, second_client, "ls-asked-of-the-leader")
        # Placed before the answer, by the leader's pass: the second replica ran none.
        assert lease["provider_id"] == b.box and lease["state"] == "starting"
        assert second.placing_thread.passes == 0
        assert first.placing_thread.passes > passes_before
        assert second.placer.sent >= 1 and first.placer.answers_sent >= 1
        assert second.placer.fallbacks == 0
        assert scraped(second_client, "parallex_placement_asks_to_leader") == second.placer.sent
        assert scraped(second_client, "parallex_broker_leader") == 0

        # The leader stops (an orderly shutdown gives the lease up): the second leads and
        # places its own asks from then on.
        first_stack.close()
        assert second.renew_leadership()
        sent = second.placer.sent
        lease = scale_one(b, second_client, "ls-placed-by-the-new-leader")
        assert lease["provider_id"] == b.box
        assert second.placer.sent == sent and second.placing_thread.passes >= 1
        assert second.placer.fallbacks == 0


def test_a_replica_places_itself_when_the_leader_does_not_answer(postgres_url):
    with in_process_broker(postgres_url, 1) as b:
        broker = b.app.state.broker
        # A leader that holds the lease but hears nothing (its listener is down, say): the
        # lease belongs to a replica that does not exist.
        with broker.engine.begin() as c:
            c.execute(text("UPDATE broker_leader SET holder = 'ghost', "
                           "expires_at = now() + interval '1 hour'"))
        assert not broker.renew_leadership()
        lease = scale_one(b, b.client, "ls-placed-after-the-bound")
        assert lease["provider_id"] == b.box
        assert broker.placer.sent == 1 and broker.placer.fallbacks == 1
