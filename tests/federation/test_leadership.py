"""The leader lease (replicas.hold_leadership) is renewed apart from the reaper: the reaper's
tick waits for the leader's metering pass, which takes seconds under load, and a lease
renewed only between ticks ran out during passes, so the lead moved at nearly every pass
and each new leader ran a pass of its own at once (issue 14's load benchmark)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from sqlalchemy import text

from tests.utils.in_process import in_process_broker, scraped
from tests.utils.procs import wait_until


def lock_waits(conn: psycopg.Connection, table: str) -> int:
    return conn.execute("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                        "WHERE NOT l.granted AND c.relname = %s", (table,)).fetchone()[0]


@contextlib.contextmanager
def metering_pass_held(postgres_url: str, broker) -> Iterator[psycopg.Connection]:
    """The broker's next metering pass waits, as a long one would (it reads the periods
    charged so far), and its reaper tick with it, until the block ends; yields a connection
    to watch the database meanwhile."""
    with (psycopg.connect(postgres_url) as locker,
          psycopg.connect(postgres_url, autocommit=True) as watch):
        locker.execute("LOCK TABLE usagerecord IN ACCESS EXCLUSIVE MODE")
        wait_until(lambda: broker._reaping_since is not None
                   and lock_waits(watch, "usagerecord") > 0, 30,
                   "a metering pass to wait for the locked table")
        yield watch
        locker.rollback()


def test_the_leader_keeps_the_lead_while_its_metering_pass_runs(postgres_url):
    # A lease of 2 s (a third of the shortest timeout), a metering pass due every 2 s.
    with in_process_broker(postgres_url, 1, provider_timeout=6, cluster_timeout=6,
                           metering_interval=2) as b:
        broker = b.app.state.broker
        ttl = broker.leader_ttl
        assert broker.is_leader
        with metering_pass_held(postgres_url, broker) as watch:
            held_at = watch.execute("SELECT now()").fetchone()[0]

            def renewed_during_the_pass() -> bool:
                holder, expires_at = watch.execute(
                    "SELECT holder, expires_at FROM broker_leader").fetchone()
                assert holder == broker.boot_id, "another replica took the lead"
                return (expires_at - held_at).total_seconds() > 2 * ttl

            # Renewed at least once a whole lease after the pass began to wait: the reaper
            # could not have done it.
            wait_until(renewed_during_the_pass, 4 * ttl + 10, "the lease to be renewed")
            assert broker._reaping_since is not None and broker.is_leader
        wait_until(lambda: broker._reaping_since is None, 30, "the reaper's tick to end")
        assert broker.is_leader
        with broker.engine.connect() as c:
            assert c.execute(text("SELECT holder FROM broker_leader")).scalar_one() == \
                broker.boot_id


def test_a_leader_whose_reaper_hangs_leaves_the_lead_and_takes_it_back_after(postgres_url,
                                                                             caplog):
    """Past ``--reaper-stall`` in one tick the replica stops renewing: another replica (none
    here) may take the periodic passes and placement, and the lease runs out. Once the tick
    ends it leads again, there being no other replica."""
    import logging

    caplog.set_level(logging.WARNING, logger="parallex.broker")
    with in_process_broker(postgres_url, 1, provider_timeout=6, cluster_timeout=6,
                           metering_interval=2, reaper_stall=2) as b:
        broker = b.app.state.broker
        with metering_pass_held(postgres_url, broker) as watch:
            wait_until(lambda: not broker.is_leader, 30, "the stalled leader to step down")
            # Not renewed: the lease runs out (a replica that is not stalled takes it then).
            wait_until(lambda: watch.execute(
                "SELECT expires_at <= now() FROM broker_leader").fetchone()[0], 30,
                "the leader lease to run out")
            assert broker._reaping_since is not None  # still in the stalled tick
        wait_until(lambda: broker.is_leader, 30, "the replica to lead again")
    assert any("leaving the periodic passes and placement to another replica"
               in r.getMessage() for r in caplog.records)


def test_the_first_metering_pass_runs_at_start_whatever_the_machines_uptime(tmp_path):
    """The passes are timed on the monotonic clock, which counts from the machine's boot:
    with an interval longer than the machine has been up (here about 31,700 years, as an hour
    is on a server booted half an hour ago), the leader's first metering pass still runs at
    start, not once the machine has been up for an interval."""
    with in_process_broker(f"sqlite:///{tmp_path / 'broker.db'}", 1,
                           metering_interval=1e12, capacity_interval=1e12) as b:
        wait_until(lambda: scraped(b.client, "parallex_metering_pass_seconds_count") >= 1,
                   30, "the first periodic metering pass")
