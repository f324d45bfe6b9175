"""Lease ends are charged in batches (the end meterer) beside the leader's periodic metering
pass, on PostgreSQL in other processes, and both charge ended leases. Each takes the metering
lock before it reads what is charged, so whichever comes second charges what the first left:
neither fails on a period the other recorded (under load a replica's batch did at nearly
every pass, and now and then a whole periodic pass did), and each period is charged once."""

from __future__ import annotations

import datetime as dt
import logging

import psycopg
import pytest
from sqlalchemy import text

from federation.broker import db
from federation.broker.metering_runs import (
    MAX_UNIT_PAUSE,
    lock_metering,
    meter_leases,
    meter_pass,
    unit_pause,
)
from federation.broker.settings import BrokerSettings
from tests.utils.in_process import in_process_broker, scraped
from tests.utils.procs import in_thread, wait_until


def end_by_hand(engine, lease_id: str, at: dt.datetime) -> None:
    """End a lease as a report would, without the report's own ask for its charge."""
    with engine.begin() as c:
        c.execute(text("UPDATE lease SET state = 'ended', ended_at = :at WHERE id = :id"),
                  {"at": at, "id": lease_id})


@pytest.mark.parametrize("first_unit", ["periodic pass", "lease-end batch"])
def test_a_metering_unit_that_meets_another_charges_what_it_left(postgres_url, caplog,
                                                                 first_unit):
    """One unit charges the first lease's end and has not committed when the second lease
    ends and the other unit starts: that one waits, then charges the second lease only."""
    caplog.set_level(logging.INFO, logger="parallex.broker")
    # Periods of an hour: in this test's seconds only an ended lease's remainder is charged.
    with in_process_broker(postgres_url, 2, metering_interval=3600) as b:
        broker = b.app.state.broker
        first, second = b.ids
        # The leader's first periodic pass (at start) is over, so none runs meanwhile.
        wait_until(lambda: scraped(b.client, "parallex_metering_pass_seconds_count") >= 1,
                   60, "the first periodic metering pass")
        now = dt.datetime.now(dt.UTC)
        end_by_hand(broker.engine, first, now)
        # The first unit, as the broker runs it (the lock, then its read and inserts), held
        # before its commit: the whole pass, or a batch of the first lease alone.
        held = db.session(broker.engine)
        try:
            lock_metering(held)
            assert meter_leases(held, broker.settings, now, None if first_unit ==
                                "periodic pass" else {first}) == 1
            held.flush()
            end_by_hand(broker.engine, second, now)
            # The other unit: the broker's own (the periodic one in its child process).
            other, out = in_thread(
                (lambda: broker.meter(lease_ids={first, second}))
                if first_unit == "periodic pass" else broker.meter)
            with psycopg.connect(postgres_url, autocommit=True) as watch:
                wait_until(lambda: watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0,
                    60, "the other unit to wait for the first")
            held.commit()
        finally:
            held.close()
        other.join(60)
        assert not other.is_alive()
        assert out == {"recorded": 1}, out  # the second lease's remainder

    with psycopg.connect(postgres_url) as check:
        charged = dict(check.execute(
            "SELECT lease_id, count(*) FROM usagerecord WHERE lease_id = ANY(%s) "
            "GROUP BY lease_id", ([first, second],)).fetchall())
        until = dict(check.execute(
            "SELECT id, metered_until = ended_at FROM lease WHERE id = ANY(%s)",
            ([first, second],)).fetchall())
    assert charged == {first: 1, second: 1}
    assert until == {first: True, second: True}
    assert not [r for r in caplog.records if "collided" in r.getMessage()]


def test_a_periodic_pass_commits_unit_by_unit_so_a_lease_waits_for_one_unit_at_most(
        postgres_url):
    """The periodic pass charges its leases in units of work committed one by one: while one
    unit waits (here for a lease row the test holds, as a lease report would), the leases of
    the units before it are charged and free to lock. In one transaction, every running
    lease's row stayed locked until the whole pass committed (5-20 s under issue 14's
    load), and every report and release of any lease waited for it."""
    with in_process_broker(postgres_url, 3, metering_interval=3600) as b:
        broker = b.app.state.broker
        wait_until(lambda: scraped(b.client, "parallex_metering_pass_seconds_count") >= 1,
                   60, "the first periodic metering pass")
        first, second, third = sorted(b.ids)
        # Two hours on: two whole periods of each lease are due.
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
        with psycopg.connect(postgres_url) as held, \
                psycopg.connect(postgres_url, autocommit=True) as watch:
            held.execute("SELECT 1 FROM lease WHERE id = %s FOR UPDATE", (third,))
            passing, out = in_thread(lambda: meter_pass(broker.engine, broker.settings, later,
                                                        chunk=1))
            try:
                wait_until(lambda: watch.execute(
                    "SELECT count(DISTINCT lease_id) FROM usagerecord WHERE lease_id = ANY(%s)",
                    ([first, second],)).fetchone()[0] == 2, 30,
                    "the first two units' charges to be committed")
                # Free to lock now (NOWAIT fails at once on a held row), with the pass under
                # way: its last unit waits for the held row.
                assert len(watch.execute("SELECT id FROM lease WHERE id = ANY(%s) FOR UPDATE "
                                         "NOWAIT", ([first, second],)).fetchall()) == 2
                assert passing.is_alive()
            finally:
                held.rollback()
            passing.join(60)
        assert not passing.is_alive()
        assert out == {"recorded": 6}, out

    with psycopg.connect(postgres_url) as check:
        charged = dict(check.execute(
            "SELECT lease_id, count(*) FROM usagerecord WHERE lease_id = ANY(%s) "
            "GROUP BY lease_id", ([first, second, third],)).fetchall())
    assert charged == {first: 2, second: 2, third: 2}


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_the_periodic_pass_pauses_between_units_with_each_units_charges_committed(
        postgres_url, ratio):
    """Between two units the pass pauses (``metering_pause`` times the unit's time, at most
    ``MAX_UNIT_PAUSE``) with the last unit committed and the metering lock released, so the
    requests have the machine and the rows; there is no pause after the last unit."""
    with in_process_broker(postgres_url, 3, metering_interval=3600,
                           metering_pause=ratio) as b:
        broker = b.app.state.broker
        wait_until(lambda: scraped(b.client, "parallex_metering_pass_seconds_count") >= 1,
                   60, "the first periodic metering pass")
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
        seen: list[tuple[float, int, int]] = []
        with psycopg.connect(postgres_url, autocommit=True) as watch:
            def pause(seconds: float) -> None:
                charged = watch.execute(
                    "SELECT count(DISTINCT lease_id) FROM usagerecord WHERE lease_id = ANY(%s)",
                    (b.ids,)).fetchone()[0]
                locks = watch.execute("SELECT count(*) FROM pg_locks WHERE locktype = "
                                      "'advisory'").fetchone()[0]
                seen.append((seconds, charged, locks))

            assert meter_pass(broker.engine, broker.settings, later, chunk=1,
                              pause=pause) == 6
    assert [(charged, locks) for _s, charged, locks in seen] == [(1, 0), (2, 0)]
    if ratio:
        assert all(0 < s <= MAX_UNIT_PAUSE for s, _c, _l in seen), seen
    else:
        assert [s for s, _c, _l in seen] == [0.0, 0.0]


def test_a_units_pause_is_its_time_times_the_setting_and_at_most_a_second():
    settings = BrokerSettings(cloud_prices=None, metering_pause=2.0)
    assert unit_pause(settings, 0.2) == pytest.approx(0.4)
    assert unit_pause(settings, 3.0) == MAX_UNIT_PAUSE
    assert unit_pause(BrokerSettings(cloud_prices=None, metering_pause=0.0), 3.0) == 0.0
