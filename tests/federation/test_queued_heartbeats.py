"""Agents' heartbeats that repeat the last one are answered once queued (issue 14: the wait
for a batch was most of a slow heartbeat's time under load); what may not be lost or
reordered still waits for its batch."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from sqlmodel import select

from accounting.models import as_utc, utcnow
from federation.broker import agent_batches, service
from federation.broker.agent_batches import Heartbeat, record_heartbeats
from federation.broker.models import Lease, Provider
from tests.utils.in_process import in_process_broker
from tests.utils.procs import wait_until


def answered(broker, when: str) -> float:
    return broker.metrics.heartbeats_answered.labels(when)._value.get()


def test_a_repeat_is_answered_while_its_batch_cannot_write_and_a_change_waits(
        postgres_url, monkeypatch):
    """The machine's row is held by another session, so no heartbeat batch can commit: a
    heartbeat that repeats the last one is answered all the same (and recorded once the row
    is free); one that changes the offer waits for its batch, answered 503 when the batch
    cannot finish, as before."""
    import psycopg

    monkeypatch.setattr(service, "HEARTBEAT_WAIT", 1.0)
    with in_process_broker(postgres_url, 1) as b:
        broker = b.app.state.broker
        beat = f"/agent/{b.box}/heartbeat"
        # The first this replica sees of the machine waits for its batch.
        assert b.call(b.agent, "POST", beat, json={"running": b.ids}).status_code == 200
        assert answered(broker, "recorded") == 1 and answered(broker, "queued") == 0
        with psycopg.connect(postgres_url) as holder:
            (before,) = holder.execute("SELECT last_seen FROM provider WHERE id = %s FOR UPDATE",
                                       (b.box,)).fetchone()
            repeat = b.call(b.agent, "POST", beat, json={"running": b.ids})
            assert repeat.status_code == 200, repeat.text
            assert answered(broker, "queued") == 1
            holder.rollback()
        wait_until(lambda: broker.session().get(Provider, b.box).last_seen > before, 30,
                   "the queued heartbeat to be recorded")

        with psycopg.connect(postgres_url) as holder:
            holder.execute("SELECT id FROM provider WHERE id = %s FOR UPDATE", (b.box,))
            change = b.call(b.agent, "POST", beat, json={
                "running": b.ids, "offering": False, "offer_note": "owner typing"})
            assert change.status_code == 503, change.text
            assert change.json()["error"] == "heartbeat-not-recorded"
            holder.rollback()
        assert answered(broker, "queued") == 1
        # Its batch finishes once the row is free; the next change waits and is recorded.
        wait_until(lambda: not broker.heartbeat_batch_stalled, 30, "the batch to finish")
        back = b.call(b.agent, "POST", beat, json={"running": b.ids, "offering": True})
        assert back.status_code == 200, back.text
        with broker.session() as s:
            assert s.get(Provider, b.box).offering is True


def test_with_the_setting_off_every_heartbeat_waits(db_url):
    with in_process_broker(db_url, 1, queued_heartbeat_answers=0) as b:
        broker = b.app.state.broker
        for _ in range(3):
            assert b.call(b.agent, "POST", f"/agent/{b.box}/heartbeat",
                          json={"running": b.ids}).status_code == 200
        assert answered(broker, "queued") == 0 and answered(broker, "recorded") == 3


def test_a_repeat_after_half_a_provider_timeout_of_silence_waits(db_url):
    """A machine silent that long may have been taken offline meanwhile (by any replica's
    reaper): its return, which places leases on it again, is recorded before the answer."""
    with in_process_broker(db_url, 1, provider_timeout=1.0) as b:
        broker = b.app.state.broker
        beat = f"/agent/{b.box}/heartbeat"
        assert b.call(b.agent, "POST", beat, json={"running": b.ids}).status_code == 200
        assert b.call(b.agent, "POST", beat, json={"running": b.ids}).status_code == 200
        assert (answered(broker, "recorded"), answered(broker, "queued")) == (1, 1)
        time.sleep(0.6)  # the machine silent past half its 1 s timeout: what is tested
        assert b.call(b.agent, "POST", beat, json={"running": b.ids}).status_code == 200
        assert (answered(broker, "recorded"), answered(broker, "queued")) == (2, 1)
        with broker.session() as s:
            assert s.get(Provider, b.box).online is True


def lease_started(broker, lease_id: str) -> dt.datetime:
    with broker.session() as s:
        lease = s.exec(select(Lease).where(Lease.id == lease_id)).one()
        assert lease.state == "running"
        return as_utc(lease.started_at)


@pytest.mark.parametrize("answered_queued, arrived_after_start, gone", [
    # Waited for its batch: no report of the agent's can come between (it holds them back).
    (False, 0.0, True),
    # Answered once queued: a report sent after the answer may be recorded first, starting
    # a lease the heartbeat could not list; gone only once it started the margin before.
    (True, 0.0, False),
    (True, agent_batches.QUEUED_ORDER_MARGIN - 0.5, False),
    (True, agent_batches.QUEUED_ORDER_MARGIN + 0.5, True),
])
def test_a_queued_heartbeat_counts_a_lease_gone_only_if_it_could_have_listed_it(
        db_url, answered_queued, arrived_after_start, gone):
    with in_process_broker(db_url, 1) as b:
        broker = b.app.state.broker
        (lease_id,) = b.ids
        arrived = lease_started(broker, lease_id) + dt.timedelta(seconds=arrived_after_start)
        beat = Heartbeat(b.box, [], arrived_at=arrived, answered_queued=answered_queued)
        with broker.session() as s:
            out = record_heartbeats(s, [beat], utcnow(), broker.settings)
            s.commit()
        assert out.late == ([lease_id] if gone else [])


def test_a_heartbeat_recorded_late_does_not_undo_a_later_one(db_url):
    """Two replicas: the agent's later heartbeat (the owner is back: not offering) recorded
    by one before the other records the earlier one (offering). The row keeps the later."""
    with in_process_broker(db_url, 1) as b:
        broker = b.app.state.broker
        now = utcnow()
        earlier = Heartbeat(b.box, [], offering=True, arrived_at=now - dt.timedelta(seconds=1),
                            answered_queued=True)
        later = Heartbeat(b.box, [], offering=False, offer_note="owner typing", arrived_at=now)
        for beat in (later, earlier):
            with broker.session() as s:
                record_heartbeats(s, [beat], utcnow(), broker.settings)
                s.commit()
        with broker.session() as s:
            row = s.get(Provider, b.box)
            assert (row.offering, row.offer_note) == (False, "owner typing")
            assert as_utc(row.last_seen) == now
