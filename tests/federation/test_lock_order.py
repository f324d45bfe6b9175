"""Writers of many lease rows lock them in id order, as the database sorts them, so two of
them never wait on each other in a circle. The reaper ended a lost provider's leases
provider by provider, in no order across providers; a metering unit charging the same leases
in id order then deadlocked with it (seen in a metering experiment on PostgreSQL: one of the
two aborted after a second, the pass's remaining units left to the next pass)."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator

import psycopg

from federation.broker.metering_runs import meter_unit
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


@contextlib.contextmanager
def two_machines(postgres_url: str) -> Iterator[tuple]:
    """A broker whose six running leases alternate, in id order, between two machines:
    (the in-process broker, the leases in id order)."""
    with in_process_broker(postgres_url, 3) as b:  # ls-inproc0..2 fill "box" (3 CPUs)
        other = b.call(b.agent, "POST", "/agent/register", json={
            "name": "box-2", "cpus": 3, "memory": "8 GiB"}).json()["provider_id"]
        later = [f"{i}x" for i in b.ids]  # ls-inproc0x..2x, on box-2
        assert b.call(b.user, "POST", f"/clusters/{b.cid}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": i} for i in later]}).status_code == 201
        wait_until(lambda: all(where(postgres_url)[i][0] == other for i in later), 30,
                   "the second three leases placed on box-2")
        b.call(b.user, "POST", f"/clusters/{b.cid}/heartbeat", json={"connected": later})
        placed = where(postgres_url)
        leases = sorted(placed)
        assert [placed[i][0] for i in leases] == [b.box, other] * 3, placed
        assert {placed[i][1] for i in leases} == {LeaseState.running.value}, placed
        yield b, leases


def where(postgres_url: str) -> dict[str, tuple[str, str]]:
    """Each lease's provider and state."""
    with psycopg.connect(postgres_url) as c:
        return {i: (p, s) for i, p, s in c.execute(
            "SELECT id, provider_id, state FROM lease").fetchall()}


def locked_while_blocked(postgres_url: str, leases: list[str], middle: str,
                         call: Callable[[], object]) -> tuple[set[str], dict]:
    """Run ``call`` with ``middle`` held (as a report would): the leases it holds while it
    waits for that one, and its outcome once the hold is let go."""
    with psycopg.connect(postgres_url) as hold, \
            psycopg.connect(postgres_url, autocommit=True) as watch:
        hold.execute("SELECT id FROM lease WHERE id = %s FOR UPDATE", (middle,))
        running, out = in_thread(call)
        try:
            wait_until(lambda: watch.execute(
                "SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0,
                30, "the writer to wait for the held lease")
            held = locked(watch, [i for i in leases if i != middle])
        finally:
            hold.rollback()
        running.join(30)
        assert not running.is_alive()
    return held, out


def test_the_reaper_locks_lost_providers_leases_in_id_order(postgres_url):
    """Both machines go silent together: while the reaper waits for a lease in the middle,
    it holds exactly the leases before it in id order, of both machines, and none after."""
    with two_machines(postgres_url) as (b, leases):
        broker = b.app.state.broker
        # An hour on, both machines are past the provider timeout (the broker's own reaper
        # runs on the clock and finds them alive).
        an_hour_on = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        session = broker.session()
        held, out = locked_while_blocked(
            postgres_url, leases, leases[3],
            lambda: end_silent_providers(session, an_hour_on, broker.settings))
        assert held == set(leases[:3])
        assert sorted(out["recorded"].leases) == leases, out
        session.commit()
        session.close()
        states = where(postgres_url)
        assert {states[i][1] for i in leases} == {LeaseState.ended.value}, states


def test_a_metering_unit_locks_its_leases_in_id_order(postgres_url):
    """A unit charging all six leases two hours on: while it waits for the lease in the
    middle, it holds the leases before it and none after; then it charges all six."""
    with two_machines(postgres_url) as (b, leases):
        broker = b.app.state.broker
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
        held, out = locked_while_blocked(
            postgres_url, leases, leases[3],
            lambda: meter_unit(broker.engine, broker.settings, later, set(leases)))
        assert held == set(leases[:3])
        assert out.get("recorded", 0) >= len(leases), out
    with psycopg.connect(postgres_url) as check:
        assert check.execute("SELECT count(*) FROM lease WHERE id = ANY(%s) AND "
                             "metered_until IS NOT NULL", (leases,)).fetchone()[0] == 6
