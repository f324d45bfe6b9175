"""The frequent reads (the agents' batches, the cluster heartbeat's view, a metering pass's
due leases, the job-record feed, a metrics scrape) read only the leases they need on
PostgreSQL, whatever else the federation holds or once held: a plan that reads every held
lease, or the whole lease table, or every lease a machine or cluster ever had, costs each
read milliseconds of the server's CPU per thousand rows, more every day the federation runs,
and under issue 14's load there are thousands of batches a minute."""

from __future__ import annotations

import contextlib
import datetime as dt

import orjson
import pytest
from sqlalchemy import event, text

from accounting.ledger import ledger_page
from federation.broker import db
from federation.broker.agent_batches import Heartbeat, record_heartbeats
from federation.broker.job_records import job_records
from federation.broker.metering_runs import due_lease_ids
from federation.broker.metrics import FederationCollector
from federation.broker.models import utcnow
from federation.broker.service import CLUSTERS_LISTED
from federation.broker.settings import BrokerSettings
from federation.broker.timeouts import end_silent_providers
from federation.broker.views import (
    agent_leases_of,
    cluster_head,
    cluster_heads,
    cluster_public_json,
    clusters_public,
)
from tests.utils.postgres import rows_read

MACHINES = 1000
HELD = 10_000
ENDED = 50_000
CLOSED = 10_000

#: A federation as issue 14's load leaves it, with some history: a thousand machines, 10,000
#: running leases (ten a machine) and 50,000 that ended a day or more ago, charged (fifty a
#: machine), spread over 100 open clusters, silent for an hour; 10,000 clusters closed a week
#: ago.
FEDERATION = f"""
INSERT INTO lab (id, name, site, share, credit_limit, created_at) VALUES (1, 'a', '', 1, 0, now());
INSERT INTO "user" (id, name, lab_id, created_at) VALUES (1, 'u', 1, now());
INSERT INTO apitoken (id, kind, token_hash, lab_id, created_at)
  VALUES ('tk1', 'provider', 'h', 1, now());
INSERT INTO provider (id, lab_id, token_id, name, site, cpus, memory, gpus_json, online,
                      offering, offer_note, last_seen, registered_at, accepts_peers,
                      environment_json, environments_json)
  SELECT 'prv_' || g, 1, 'tk1', 'box' || g, '', 16, 1, '[]', true, true, '', now(), now(),
         true, '{{}}', '[]' FROM generate_series(1, {MACHINES}) g;
INSERT INTO cluster (id, user_id, lab_id, name, scheduler_address, ca_cert, active,
                     created_at, last_seen)
  SELECT 'cl_' || g, 1, 1, 'c', 'x', 'x', true, now(), now() - interval '1 hour'
  FROM generate_series(1, 100) g;
INSERT INTO cluster (id, user_id, lab_id, name, scheduler_address, ca_cert, active,
                     created_at, last_seen, closed_at)
  SELECT 'old_' || g, 1, 1, 'c', 'x', 'x', false, now() - interval '9 days',
         now() - interval '8 days', now() - interval '8 days'
  FROM generate_series(1, {CLOSED}) g;
INSERT INTO lease (id, cluster_id, provider_id, "group", cpus, memory, gpus, gpu_indices_json,
                   state, message, worker_cert, worker_csr, created_at, started_at,
                   ended_at, metered_until, suspensions_json)
  SELECT 'ls_' || g, 'cl_' || (1 + mod(g, 100)), 'prv_' || (1 + mod(g * 7919, {MACHINES})),
         'default', 1, 1073741824, 0, '[]',
         CASE WHEN g <= {ENDED} THEN 'ended'::leasestate ELSE 'running'::leasestate END,
         '', '', '', now() - interval '3 days', now() - interval '3 days', ended,
         COALESCE(ended, now()), '[]'
  FROM generate_series(1, {ENDED + HELD}) g,
       LATERAL (SELECT CASE WHEN g <= {ENDED} THEN now() - interval '1 day' - g * interval '1 s'
                       END AS ended) AS e;
"""


@pytest.fixture
def federation(postgres_url):
    """An engine on a database holding ``FEDERATION``, with its statistics."""
    engine = db.make_engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(FEDERATION)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    yield engine
    engine.dispose()


def test_a_heartbeat_batch_reads_only_its_machines_leases(federation):
    engine = federation
    machines = [f"prv_{i}" for i in range(1, MACHINES + 1, MACHINES // 20)]  # a burst's batch
    with engine.connect() as conn:
        held = {pid: [lid for (lid,) in conn.execute(text(
            "SELECT id FROM lease WHERE provider_id = :p AND state = 'running'"), {"p": pid})]
            for pid in machines}
    theirs = sum(len(leases) for leases in held.values())
    assert 100 <= theirs <= 400  # ~10 a machine

    returned: list[int] = []

    def count_returned(_conn, cursor, statement, *_args) -> None:
        if statement.startswith("SELECT provider.id, provider.online"):
            returned.append(cursor.rowcount)

    event.listen(engine, "after_cursor_execute", count_returned)
    with db.session(engine) as s:
        before = rows_read(s)
        recorded = record_heartbeats(s, [Heartbeat(pid, held[pid]) for pid in machines],
                                     utcnow(), BrokerSettings())
        heartbeat_reads = rows_read(s) - before
        s.rollback()
    event.remove(engine, "after_cursor_execute", count_returned)
    assert recorded.late == []  # every held lease was seen, as listed
    # Listed running leases are never overdue: a row a machine, none of their leases.
    assert returned == [len(machines)], (returned, theirs)
    with db.session(engine) as s:
        before = rows_read(s)
        lists = agent_leases_of(s, machines)
        list_reads = rows_read(s) - before
    assert {pid: sorted(le["id"] for le in leases) for pid, leases in lists.items()} == {
        pid: sorted(leases) for pid, leases in held.items()}
    # Each read touches its batch's leases, not the federation's 10,000 held leases, nor the
    # machines' 1,000 ended ones (11 times their held ones, read by the machine index alone).
    assert heartbeat_reads <= 1.5 * theirs, (heartbeat_reads, theirs)
    assert list_reads <= 1.5 * theirs, (list_reads, theirs)


def test_a_cluster_heartbeats_view_reads_only_the_leases_it_shows(federation):
    engine = federation
    with db.session(engine) as s:
        head = cluster_head(s, "cl_7")
        before = rows_read(s)
        view, _starting = cluster_public_json(s, head, utcnow() - dt.timedelta(minutes=10))
        reads = rows_read(s) - before
    shown = [lease["id"] for lease in orjson.loads(view)["leases"]]
    assert len(shown) == HELD // 100  # its held leases; the ones ended a day ago left out
    # Not the 500 it once had beside them (six times as many rows, by the cluster index).
    assert reads <= 1.5 * len(shown), (reads, len(shown))


def test_a_metering_pass_and_the_record_feed_skip_the_charged_history(federation):
    engine = federation
    with db.session(engine) as s:
        # Counted by this backend alone: a parallel scan's workers count apart.
        s.connection().exec_driver_sql("SET max_parallel_workers_per_gather = 0")
        before = rows_read(s)
        due = due_lease_ids(s)
        due_reads = rows_read(s) - before
        before = rows_read(s)
        records, cursor = job_records(s, lab_id=None, user_id=None, since=None, until=None,
                                      after=None, limit=100)
        record_reads = rows_read(s) - before
    assert len(due) == HELD  # the running leases; every ended one is charged
    assert [r["record_id"] for r in records] == [f"ls_{g}" for g in range(ENDED, ENDED - 100, -1)]
    assert cursor
    # Not the 50,000 ended leases (a scan of the lease table before their indexes).
    assert due_reads <= 1.5 * HELD, due_reads
    assert record_reads <= 300, record_reads


def test_a_metrics_scrape_reads_the_leases_not_ended_only(federation):
    with db.session(federation) as s:
        s.connection().exec_driver_sql("SET max_parallel_workers_per_gather = 0")
        before = rows_read(s)
        gauges = {family.name: family for family in
                  FederationCollector(lambda: contextlib.nullcontext(s)).collect()}
        reads = rows_read(s) - before
    assert [(sample.labels, sample.value) for sample in gauges["parallex_leases"].samples] == [
        ({"state": "running", "lab": "a"}, HELD)]
    # The gauges of leases and of PCU/h read the running ones (twice), not the 50,000 ended
    # beside them (a scan of the lease table at every scrape, each replica every 15 s).
    assert reads <= 2.5 * HELD, reads


def test_the_reapers_look_for_silent_clusters_reads_the_open_ones_only(federation):
    with db.session(federation) as s:
        before = rows_read(s, "cluster")
        silent = end_silent_providers(s, utcnow(), BrokerSettings())
        reads = rows_read(s, "cluster") - before
        s.rollback()
    assert sorted(silent.clusters) == sorted(f"cl_{g}" for g in range(1, 101))
    # Every second on the leader: the 100 open clusters, not the 10,000 closed ones.
    assert reads <= 150, reads



def test_the_clusters_views_read_the_leases_they_show_and_the_newest_clusters(federation):
    """`GET /clusters/{id}` and `GET /clusters` (views.clusters_public with the window the
    broker gives them) read a cluster's live and lately ended leases, not the 500 that ended
    a day ago; an administrator's `?all=true` lists the newest 200 clusters, not all 10,100."""
    ended_after = utcnow() - dt.timedelta(minutes=10)
    with db.session(federation) as s:
        before = rows_read(s)
        one = clusters_public(s, [cluster_head(s, "cl_7")], ended_after)[0]
        reads = rows_read(s) - before
    assert len(one.leases) == HELD // 100
    assert reads <= 1.5 * len(one.leases), (reads, len(one.leases))
    with db.session(federation) as s:
        before = rows_read(s), rows_read(s, "cluster")
        listed = clusters_public(s, cluster_heads(s, newest=CLUSTERS_LISTED), ended_after)
        reads = rows_read(s) - before[0], rows_read(s, "cluster") - before[1]
    assert len(listed) == CLUSTERS_LISTED
    assert {c.id for c in listed} >= {f"cl_{g}" for g in range(1, 101)}  # the newest
    shown = sum(len(c.leases) for c in listed)
    assert shown == HELD
    assert reads[0] <= 1.5 * shown, reads
    assert reads[1] <= 2 * CLUSTERS_LISTED, reads


#: A ledger after a year: 400,000 entries of 100 labs' accounts, one of them (account 7) a
#: lab that computes rarely (one entry in a hundred), the others in turn.
LEDGER = """
INSERT INTO transfer (id, kind, memo, created_at)
  SELECT g, 'usage', 'lease x', now() - (400000 - g) * interval '1 min'
  FROM generate_series(1, 400000) g;
INSERT INTO ledgerentry (transfer_id, account_id, amount, created_at)
  SELECT g, CASE WHEN mod(g, 100) = 0 THEN 7 ELSE 100 + mod(g, 99) END, -1000,
         now() - (400000 - g) * interval '1 min'
  FROM generate_series(1, 400000) g;
"""


def test_a_labs_ledger_page_reads_its_newest_entries_only(postgres_url):
    """`GET /labs/{lab}/ledger` (the newest 200 entries of one account, or those since a
    time) reads those entries, not the account's whole year nor every lab's entries of its
    period."""
    engine = db.make_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(LEDGER)
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
        for account, since in ((7, None), (150, None), (7, utcnow() - dt.timedelta(days=30))):
            with db.session(engine) as s:
                s.connection().exec_driver_sql("SET max_parallel_workers_per_gather = 0")
                before = rows_read(s, "ledgerentry")
                rows = ledger_page(s, account, since, 200)
                reads = rows_read(s, "ledgerentry") - before
            assert len(rows) == 200
            assert reads <= 1.5 * len(rows), (account, since, reads)
    finally:
        engine.dispose()
