"""Job records for a site's accounting collector: one per ended lease, with its resources,
times, user, lab, provider and PCU; paged by a cursor; each caller sees only what the usage
rules allow; CSV and JSON; the `parallex records` and `parallex usage --period` commands."""

from __future__ import annotations

import csv
import datetime as dt
import io
import subprocess
from decimal import Decimal

import httpx

from federation import FederatedCluster
from federation.broker.job_records import FIELDS
from tests.utils.procs import parallex, wait_until


def test_job_records_describe_each_ended_lease_to_whom_may_read_it(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    fed.add_lab("lab-b", user="bob")
    fed.add_agent("lab-b", "agent-b", cpus=2, memory="4 GiB")  # alice computes on lab-b
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2)
        client = cluster.get_client()
        assert client.submit(sum, range(10)).result() == 45
        cluster_id = cluster.cluster_id
    api = f"{fed.url}/api/v1/usage/records"
    alice = {"Authorization": f"Bearer {fed.user_tokens['alice']}"}
    # A record appears once its end is charged: the second end of the close may wait for the
    # broker's --end-metering-spacing (10 s) after the first's batch.
    def both_records() -> dict | None:
        page = httpx.get(api, headers=alice, timeout=30).json()
        return page if len(page["records"]) == 2 else None

    page = wait_until(both_records, 30, "both leases' records")
    records = page["records"]
    assert page["next"] is None
    for r in records:
        assert set(r) == set(FIELDS)
        assert (r["user"], r["lab"], r["provider"], r["provider_lab"], r["cluster_id"]) == (
            "alice", "lab-a", "agent-b", "lab-b", cluster_id)
        assert (r["cpus"], r["memory_bytes"], r["gpus"]) == (1.0, 2**30, 0)
        assert r["end_time"] >= r["start_time"] >= r["submit_time"]
        assert r["wall_seconds"] > 0 and r["charged_seconds"] > 0
        assert float(r["pcu"]) > 0 and r["self_use"] is False
        assert r["end_reason"] == "released"
    # Pages follow the order leases ended, by a cursor, and cover everything once.
    first = httpx.get(api, headers=alice, params={"limit": 1}, timeout=30).json()
    second = httpx.get(api, headers=alice, params={"limit": 1, "after": first["next"]},
                       timeout=30).json()
    assert first["next"] and second["next"] is None
    assert sorted(r["record_id"] for r in first["records"] + second["records"]) == sorted(
        r["record_id"] for r in records)
    # Another lab's member sees none of them; a bad cursor is a 422 saying what to pass.
    bob = {"Authorization": f"Bearer {fed.user_tokens['bob']}"}
    assert httpx.get(api, headers=bob, timeout=30).json()["records"] == []
    bad = httpx.get(api, headers=alice, params={"after": "yesterday"}, timeout=30)
    assert bad.status_code == 422 and "'next' cursor" in bad.json()["message"]
    assert httpx.get(api, timeout=30).status_code == 401
    # CSV for collectors, from the API and from the command line.
    as_csv = httpx.get(api, headers=alice, params={"format": "csv"}, timeout=30)
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["record_id"] for r in rows] == [r["record_id"] for r in records]
    env = {"PARALLEX_BROKER_URL": fed.url, "PARALLEX_TOKEN": fed.user_tokens["alice"],
           "PATH": "/usr/bin:/bin"}
    cli = subprocess.run(parallex("records"), capture_output=True, text=True, env=env,
                         timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines()[0] == ",".join(FIELDS)
    assert len(cli.stdout.splitlines()) == 3
    today = dt.datetime.now(dt.UTC).date()
    daily = subprocess.run(parallex("usage", "--period", "day", "--since",
                                    (today - dt.timedelta(days=1)).isoformat(), "--until",
                                    (today + dt.timedelta(days=1)).isoformat(),
                                    "--format", "csv"),
                           capture_output=True, text=True, env=env, timeout=60)
    assert daily.returncode == 0, daily.stderr
    by_day = list(csv.DictReader(io.StringIO(daily.stdout)))
    assert [(r["period_start"], r["lab"]) for r in by_day] == [(today.isoformat(), "lab-a")]
    assert Decimal(by_day[0]["pcu"]) == sum(Decimal(r["pcu"]) for r in records)
    # Without --until the days run through today (UTC), its use so far included.
    to_today = subprocess.run(parallex("usage", "--period", "day", "--since",
                                       (today - dt.timedelta(days=1)).isoformat(),
                                       "--format", "csv"),
                              capture_output=True, text=True, env=env, timeout=60)
    assert to_today.returncode == 0, to_today.stderr
    assert list(csv.DictReader(io.StringIO(to_today.stdout))) == by_day


def test_a_record_waits_for_its_charge_and_holds_back_later_ones(tmp_path):
    """An ended lease's charge is booked a moment after its agent's report is answered: until
    then neither its record nor any of a lease that ended later is given, so a collector's
    cursor never passes a record whose charge is still to come."""
    import datetime as dt

    from accounting.models import create_lab, create_user
    from federation.broker import db
    from federation.broker.job_records import job_records
    from federation.broker.metering_runs import meter_leases
    from federation.broker.models import (
        ApiToken,
        ClusterRecord,
        Lease,
        LeaseState,
        Provider,
        TokenKind,
    )
    from federation.broker.settings import BrokerSettings

    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'records.db'}")
    with db.session(engine) as s:
        lab, owner = create_lab(s, name="lab-a"), create_lab(s, name="lab-b")
        user = create_user(s, name="alice", lab=lab)
        s.add(ApiToken(id="tok_b", kind=TokenKind.provider, token_hash="-", lab_id=owner.id))
        s.add(Provider(id="prv_1", lab_id=owner.id, token_id="tok_b", name="box", cpus=8,
                       memory=2**34))
        s.add(ClusterRecord(id="cl_1", lab_id=lab.id, user_id=user.id,
                            scheduler_address="tls://127.0.0.1:1", ca_cert="-"))
        s.flush()  # no ORM relationships order these inserts before the leases'
        for n, minutes in ((1, 30), (2, 60)):
            s.add(Lease(id=f"ls-{n}", cluster_id="cl_1", provider_id="prv_1", cpus=1,
                        memory=2**30, state=LeaseState.ended, created_at=t0, started_at=t0,
                        ended_at=t0 + dt.timedelta(minutes=minutes)))
        s.commit()
        # ls-1 ended first and is not charged yet; ls-2 is charged alone (as a batch of
        # lease ends would): still nothing is given, ls-1 holds it back.
        assert meter_leases(s, BrokerSettings(), t0 + dt.timedelta(hours=2), {"ls-2"}) > 0
        s.commit()
        page, _ = job_records(s, lab_id=None, user_id=None, since=None, until=None,
                              after=None, limit=10)
        assert page == []
        assert meter_leases(s, BrokerSettings(), t0 + dt.timedelta(hours=2)) > 0
        s.commit()
        page, _ = job_records(s, lab_id=lab.id, user_id=None, since=None, until=None,
                              after=None, limit=10)
        assert [r["record_id"] for r in page] == ["ls-1", "ls-2"]
        assert all(float(r["pcu"]) > 0 for r in page)
