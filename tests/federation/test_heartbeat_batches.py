"""A heartbeat batch judges only the held leases that may be overdue: the running and
suspended leases its machines' heartbeats list stay in the database (issue 14: reading all
of them, ten a machine, was a third of a batch's CPU), and what it must still find, it
finds."""

from __future__ import annotations

import sqlite3

from sqlalchemy import event

from federation.broker.agent_batches import Heartbeat, record_heartbeats
from federation.broker.models import utcnow
from tests.utils.in_process import in_process_broker


def late(broker, beats: list[Heartbeat]) -> list[str]:
    """The leases one batch of ``beats`` judges overdue (nothing is written)."""
    with broker.session() as s:
        out = record_heartbeats(s, beats, utcnow(), broker.settings)
        s.rollback()
    return out.late


def test_a_batch_judges_the_leases_their_machines_do_not_list(db_url):
    with in_process_broker(db_url, 3) as b:
        broker = b.app.state.broker
        kept, frozen, dead = b.ids
        assert b.call(b.agent, "POST", f"/agent/{b.box}/leases/{frozen}/state",
                      json={"state": "suspended"}).status_code == 200
        other = b.call(b.agent, "POST", "/agent/register", json={
            "name": "box2", "cpus": 2, "memory": "2 GiB"}).json()["provider_id"]

        # Every lease listed by its machine, the suspended one too: none is late.
        assert late(broker, [Heartbeat(b.box, [kept, frozen, dead]), Heartbeat(other, [])]) == []
        # Unlisted, running or suspended: gone.
        assert late(broker, [Heartbeat(b.box, [kept])]) == sorted([frozen, dead])
        # Another machine listing the lease in the same batch does not keep it alive (an
        # agent may list only its own machine's workers).
        assert late(broker, [Heartbeat(b.box, [kept, frozen]), Heartbeat(other, [dead])]) == [
            dead]
        # A lease that is not the machine's at all, listed, changes nothing either.
        assert late(broker, [Heartbeat(other, [kept, frozen, dead])]) == []
        # A batch may list more leases than SQLite takes placeholders in one statement
        # (32,766 where it is built with its default limit; Debian's takes 250,000):
        # machines running a hundred workers each, a few hundred to a batch.
        if broker.engine.dialect.name == "sqlite":
            event.listen(broker.engine, "connect", lambda conn, _record: conn.setlimit(
                sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32_766))
            broker.engine.dispose()  # connections made from now on have the limit
        many = [f"ls-elsewhere{i:06d}" for i in range(40_000)]
        assert late(broker, [Heartbeat(b.box, [kept, *many])]) == sorted([frozen, dead])
