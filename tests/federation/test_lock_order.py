"""Writers of many lease rows lock them in id order, as the database sorts them, so two of
them never wait on each other in a circle. The reaper ended a lost provider's leases
provider by provider, in no order across providers; a metering unit charging the same leases
in id order then deadlocked with it (seen in a metering experiment on PostgreSQL: one of the
two aborted after a second, the pass's remaining units left to the next pass)."""

from __future__ import annotations

import datetime as dt

import psycopg

from federation.broker.timeouts import end_silent_providers
from federation.lease_states import LeaseState
from tests.utils.in_process import in_process_broker
from tests.utils.procs import in_thread, wait_until


def locked(watch: psycopg.Connection, lease_ids: list[str]) -> set[str]:
    """The leases another transaction holds (a NOWAIT lock fails at once on a held row)."""
    held = set()
    for lease_id in lease_ids:
        try:
            watch.execute("SELECT id FROM lease WHERE id = %s FOR UPDATE NOWAIT", (lease_id,))
        except psycopg.errors.LockNotAvailable:
            held.add(lease_id)
    return held


def test_the_reaper_locks_lost_providers_leases_in_id_order(postgres_url):
    """Two providers go silent together, their leases' ids interleaved; a lease in the middle
    is held (as a report would): while the reaper waits for it, it holds exactly the leases
    before it in id order, of both providers, and none after it."""
    with in_process_broker(postgres_url, 3) as b:  # ls-inproc0..2 fill "box" (3 CPUs)
        broker = b.app.state.broker
        other = b.call(b.agent, "POST", "/agent/register", json={
            "name": "box-2", "cpus": 3, "memory": "8 GiB"}).json()["provider_id"]
        later = [f"{i}x" for i in b.ids]  # ls-inproc0x..2x, on box-2
        assert b.call(b.user, "POST", f"/clusters/{b.cid}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": i} for i in later]}).status_code == 201

        def where() -> dict[str, tuple[str, str]]:
            with psycopg.connect(postgres_url) as c:
                return {i: (p, s) for i, p, s in c.execute(
                    "SELECT id, provider_id, state FROM lease").fetchall()}

        wait_until(lambda: all(where()[i][0] == other for i in later), 30,
                   "the second three leases placed on box-2")
        leases = sorted(where())
        assert {where()[i][0] for i in leases[::2]} == {b.box}, leases
        assert {where()[i][0] for i in leases[1::2]} == {other}, leases
        middle = leases[3]  # ls-inproc1x
        # An hour on, both machines are past the provider timeout (the broker's own reaper
        # runs on the clock and finds them alive).
        an_hour_on = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        with psycopg.connect(postgres_url) as hold, \
                psycopg.connect(postgres_url, autocommit=True) as watch:
            hold.execute("SELECT id FROM lease WHERE id = %s FOR UPDATE", (middle,))
            session = broker.session()
            reaping, out = in_thread(
                lambda: end_silent_providers(session, an_hour_on, broker.settings))
            try:
                wait_until(lambda: watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0,
                    30, "the reaper to wait for the held lease")
                assert locked(watch, [i for i in leases if i != middle]) == set(leases[:3])
            finally:
                hold.rollback()
            reaping.join(30)
            assert not reaping.is_alive()
            assert sorted(out["recorded"].leases) == leases, out
            session.commit()
            session.close()
        states = where()
        assert {states[i][1] for i in leases} == {LeaseState.ended.value}, states
