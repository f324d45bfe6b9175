"""Lease ends are charged in batches (the end meterer) beside the leader's periodic metering
pass, on PostgreSQL in other processes. When both charge the same ended lease, the unique
period lets one through; the batch that collided is read again at once, so the other leases
it held are charged now, each period once."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from federation.broker import db
from federation.broker.metering_runs import meter_leases
from tests.utils.in_process import ADMIN_TOKEN, in_process_broker
from tests.utils.procs import wait_until


def metering_passes(b) -> float:
    answer = b.call(ADMIN_TOKEN, "GET", "/metrics")
    return sum(s.value for family in text_string_to_metric_families(answer.text)
               for s in family.samples if s.name == "parallex_metering_pass_seconds_count")


def end_by_hand(engine, lease_id: str, at: dt.datetime) -> None:
    """End a lease as a report would, without the report's own ask for its charge."""
    with engine.begin() as c:
        c.execute(text("UPDATE lease SET state = 'ended', ended_at = :at WHERE id = :id"),
                  {"at": at, "id": lease_id})


def test_a_lease_end_batch_that_meets_the_periodic_pass_charges_the_rest_at_once(
        postgres_url, caplog):
    # Periods of an hour: in this test's seconds only an ended lease's remainder is charged.
    with in_process_broker(postgres_url, 2, metering_interval=3600) as b:
        broker = b.app.state.broker
        first, second = b.ids
        # The leader's first periodic pass (at start) is over, so none runs meanwhile.
        wait_until(lambda: metering_passes(b) >= 1, 60, "the first periodic metering pass")
        now = dt.datetime.now(dt.UTC)
        end_by_hand(broker.engine, first, now)
        # A periodic pass charges the first lease's end and has not committed yet ...
        periodic = db.session(broker.engine)
        try:
            assert meter_leases(periodic, broker.settings, now) == 1
            periodic.flush()
            # ... when the second lease ends, and a lease-end batch charges both.
            end_by_hand(broker.engine, second, now)
            batch: dict[str, object] = {}

            def end_meterer() -> None:
                try:
                    batch["recorded"] = broker.meter(lease_ids={first, second})
                except BaseException as exc:  # reported by the assertion below
                    batch["failed"] = exc

            caplog.set_level(logging.INFO, logger="parallex.broker")
            meterer = threading.Thread(target=end_meterer)
            meterer.start()
            with psycopg.connect(postgres_url, autocommit=True) as watch:
                # Its insert of the first lease's period waits for the periodic pass.
                wait_until(lambda: watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0,
                    30, "the lease-end batch to wait for the periodic pass")
            periodic.commit()
        finally:
            periodic.close()
        meterer.join(60)
        assert not meterer.is_alive()
        assert batch == {"recorded": 1}, batch  # the second lease's remainder

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
