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


@contextlib.contextmanager
def six_starting(postgres_url: str) -> Iterator[tuple]:
    """A broker with six leases starting on box-2, their workers not yet joined: (the
    in-process broker, the leases in id order)."""
    with in_process_broker(postgres_url, 3) as b:  # "box" is full
        other = b.call(b.agent, "POST", "/agent/register", json={
            "name": "box-2", "cpus": 6, "memory": "16 GiB"}).json()["provider_id"]
        leases = [f"ls-joining{i}" for i in range(6)]
        assert b.call(b.user, "POST", f"/clusters/{b.cid}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": i} for i in leases]}).status_code == 201
        wait_until(lambda: all(where(postgres_url)[i] == (other, LeaseState.starting.value)
                               for i in leases), 30, "the six leases starting on box-2")
        yield b, leases


def test_a_cluster_heartbeat_locks_the_leases_it_confirms_in_id_order(postgres_url):
    """The keeper says all six workers joined while a report holds the lease in the middle:
    the heartbeat holds the leases before it and none after, then moves all six."""
    with six_starting(postgres_url) as (b, leases):
        held, out = locked_while_blocked(
            postgres_url, leases, leases[3],
            lambda: b.call(b.user, "POST", f"/clusters/{b.cid}/heartbeat",
                           json={"connected": leases}))
        assert held == set(leases[:3])
        answer = out["recorded"]
        assert answer.status_code == 200, answer.text
        shown = {le["id"]: le["state"] for le in answer.json()["leases"]}
        assert {shown[i] for i in leases} == {"running"}, shown
        states = where(postgres_url)
        assert {states[i][1] for i in leases} == {LeaseState.running.value}, states


def test_a_release_at_the_same_moment_wins_over_the_heartbeat_that_confirms(postgres_url):
    """The user releases a starting lease while the keeper's heartbeat says its worker
    joined: the heartbeat waits for the release's transaction, then leaves that lease
    releasing (not running, never metered) and confirms the others."""
    with six_starting(postgres_url) as (b, leases):
        with psycopg.connect(postgres_url) as release, \
                psycopg.connect(postgres_url, autocommit=True) as watch:
            release.execute("UPDATE lease SET state = 'releasing', release_reason = "
                            "'released', releasing_at = now() WHERE id = %s", (leases[2],))
            running, out = in_thread(lambda: b.call(
                b.user, "POST", f"/clusters/{b.cid}/heartbeat", json={"connected": leases}))
            try:
                wait_until(lambda: watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0,
                    30, "the heartbeat to wait for the released lease")
            finally:
                release.commit()
            running.join(30)
            assert not running.is_alive()
        answer = out["recorded"]
        assert answer.status_code == 200, answer.text
        shown = {le["id"]: le["state"] for le in answer.json()["leases"]}
        assert shown[leases[2]] == "releasing", shown
        assert {shown[i] for i in leases if i != leases[2]} == {"running"}, shown
        with psycopg.connect(postgres_url) as check:
            rows = {i: (state, unstarted) for i, state, unstarted in check.execute(
                "SELECT id, state::text, started_at IS NULL FROM lease WHERE id = ANY(%s)",
                (leases,)).fetchall()}
        assert rows[leases[2]] == ("releasing", True), rows
        assert {rows[i] for i in leases if i != leases[2]} == {("running", False)}, rows
