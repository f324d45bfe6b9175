"""Pruning usage records (`parallex db prune`): the records of leases that ended before the
horizon go, each lease's sums stay, and nothing a lab reads changes: job records, a cluster's
cost, whole-day reports, balances and the ledger are the same before and after; a report that
needs a pruned partial day is refused with the reason; a lease still running, or ended and not
yet charged, keeps its records."""

from __future__ import annotations

import datetime as dt
import shlex
import subprocess
from pathlib import Path

from sqlalchemy import func
from sqlmodel import select

from accounting.cloud import load_cloud_prices
from accounting.metering import UsageRecord
from accounting.models import as_utc
from accounting.retention import PrunedUsage, UsagePruning
from federation.broker import db
from federation.broker.models import END_NOT_CHARGED, EndReason, Lease, LeaseState
from federation.broker.retention import MIN_KEEP_DAYS, horizon, prune
from tests.utils.in_process import ADMIN_TOKEN, in_process_broker
from tests.utils.procs import parallex, wait_until

#: Ten-minute periods; lease ends charged at once; the default cloud prices (a cluster's cost
#: and the records' cloud equivalent).
SETTINGS = {"metering_interval": 600, "end_metering_spacing": 0,
            "cloud_prices": load_cloud_prices(None)}
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def history(b) -> dict[str, str]:
    """Three of alice's leases on her lab's box (self-use) and two on lab-b's machine
    (charged, with transfers), all started two hours ago; one of each ended and charged, the
    others running, charged up to now. The ids by role."""
    broker = b.app.state.broker
    assert b.call(ADMIN_TOKEN, "POST", "/labs", json={"name": "lab-b"}).status_code == 201
    agent_b = b.call(ADMIN_TOKEN, "POST", "/tokens", json={
        "kind": "provider", "lab": "lab-b"}).json()["token"]
    box_b = b.call(agent_b, "POST", "/agent/register", json={
        "name": "box-b", "cpus": 4, "memory": "8 GiB"}).json()["provider_id"]
    b.run_leases(["ls-peer0", "ls-peer1"])  # box is full: these go to box-b
    placed = {}
    with db.session(broker.engine) as s:
        for lease in s.exec(select(Lease)):
            lease.started_at -= 2 * HOUR
            lease.assigned_at -= 2 * HOUR
            placed[lease.id] = lease.provider_id
            s.add(lease)
        s.commit()
    assert placed["ls-peer0"] == placed["ls-peer1"] == box_b
    for lease, token, box in (("ls-inproc0", b.agent, b.box), ("ls-peer0", agent_b, box_b)):
        assert b.call(b.user, "POST", f"/clusters/{b.cid}/leases/release",
                      json={"lease_ids": [lease]}).status_code == 200
        assert b.call(token, "POST", f"/agent/{box}/leases/{lease}/state",
                      json={"state": "ended"}).status_code == 200
    out = {"ended": ["ls-inproc0", "ls-peer0"],
           "running": ["ls-inproc1", "ls-inproc2", "ls-peer1"]}

    def charged() -> bool:
        # Every period of the running leases, and the ended ones to their end. A pass that
        # meets the end meterer's batch (charging the ends just reported) leaves its leases
        # to the next.
        broker.meter()
        counted = records_of(broker.engine, out["ended"] + out["running"])
        with db.session(broker.engine) as s:
            uncharged = s.exec(select(func.count()).select_from(Lease).where(
                END_NOT_CHARGED)).one()
        return uncharged == 0 and len(counted) == 5 and min(counted.values()) >= 12

    wait_until(charged, 60, "every lease's periods to be charged")
    return out


def books(b) -> dict:
    """What a lab and an administrator read, as the API answers it."""
    today = dt.datetime.now(dt.UTC).date()
    whole_day = {"since": midnight(today).isoformat(), "until": midnight(today + DAY).isoformat()}
    out = {"records": b.call(b.user, "GET", "/usage/records").json()["records"],
           "cost": b.call(b.user, "GET", f"/clusters/{b.cid}/cost").json()["metered_pcu"],
           "balances": [b.call(ADMIN_TOKEN, "GET", f"/labs/{lab}/balance").json()["balance"]
                        for lab in ("lab-a", "lab-b")],
           "ledger": [(e["transfer_id"], e["amount"], e["memo"]) for e in b.call(
               ADMIN_TOKEN, "GET", "/labs/lab-a/ledger").json()["entries"]]}
    for by in ("user", "lab", "provider"):
        out[f"all by {by}"] = b.call(ADMIN_TOKEN, "GET", "/usage", params={"by": by}).json()
        out[f"today by {by}"] = b.call(ADMIN_TOKEN, "GET", "/usage",
                                       params={"by": by, **whole_day}).json()
    return out


def set_ends(engine, leases: list[str], at: dt.datetime,
             metered_until: dt.datetime | None = None) -> None:
    """Mark ``leases`` ended at ``at`` by hand (no report, no charge); ``metered_until``:
    charged up to then."""
    with db.session(engine) as s:
        for lease_id in leases:
            lease = s.get(Lease, lease_id)
            lease.state, lease.ended_at = LeaseState.ended, at
            lease.end_reason = lease.end_reason or EndReason.released
            if metered_until is not None:
                lease.metered_until = metered_until
            s.add(lease)
        s.commit()


def records_of(engine, leases: list[str]) -> dict[str, int]:
    with db.session(engine) as s:
        return dict(s.exec(select(UsageRecord.lease_id, func.count())
                           .where(UsageRecord.lease_id.in_(leases))
                           .group_by(UsageRecord.lease_id)).all())


def test_pruning_keeps_every_figure_a_lab_reads_and_refuses_a_pruned_partial_day(db_url):
    with in_process_broker(db_url, 3, **SETTINGS) as b:
        engine = b.app.state.broker.engine
        leases = history(b)
        before = books(b)
        counted = records_of(engine, leases["ended"] + leases["running"])
        assert min(counted.values()) >= 12  # 2 h in 10-minute periods
        assert len(before["records"]) == 2 and before["ledger"]
        # Forty days on, keeping 31: the two ended leases' records go.
        later = dt.datetime.now(dt.UTC) + 40 * DAY
        dry = prune(engine, 31, now=later, dry_run=True)
        assert (dry.leases, dry.records) == (2, sum(counted[x] for x in leases["ended"]))
        assert records_of(engine, leases["ended"]) == {x: counted[x] for x in leases["ended"]}
        done = prune(engine, 31, now=later, batch=1)
        assert (done.leases, done.records) == (dry.leases, dry.records)
        assert done.before == horizon(later, 31) == midnight(later.date() - 31 * DAY)
        assert records_of(engine, leases["ended"]) == {}
        assert records_of(engine, leases["running"]) == {x: counted[x]
                                                         for x in leases["running"]}
        with db.session(engine) as s:
            kept = {r.lease_id: r.records for r in s.exec(select(PrunedUsage))}
            mark = s.get(UsagePruning, "usage_records")
        assert kept == {x: counted[x] for x in leases["ended"]}
        assert (mark.leases, mark.records) == (2, done.records)

        after = books(b)
        assert after == before  # job records, cost, balances, ledger, whole-day reports
        # A partial day before the horizon is refused, saying why and what to ask instead.
        partial = b.call(ADMIN_TOKEN, "GET", "/usage", params={
            "since": (midnight(dt.datetime.now(dt.UTC).date()) + dt.timedelta(hours=1))
            .isoformat()})
        assert partial.status_code == 422, partial.text
        assert partial.json()["error"] == "pruned-period"
        assert f"ended before {done.before:%Y-%m-%d} were pruned" in partial.json()["message"]
        assert "midnight UTC" in partial.json()["message"]
        # A member's last use is then known to the day: the end of the day it was.
        members = b.call(ADMIN_TOKEN, "GET", "/labs/lab-a/members").json()
        alice = next(m for m in members["members"] if m["user"] == "alice")
        assert alice["last_used"].startswith(
            f"{dt.datetime.now(dt.UTC).date() + DAY:%Y-%m-%d}T00:00:00")
        # The ledger still lists the pruned charges and says their record is gone.
        page = b.call(ADMIN_TOKEN, "GET", "/labs/lab-b/ledger").json()["entries"]
        pruned = [e for e in page if e.get("usage_pruned")]
        assert pruned and all("ls-peer0" in e["memo"] for e in pruned)
        assert all("usage" in e for e in page if "ls-peer1" in e["memo"])
        told = b.call(b.user, "GET", f"/transfers/{pruned[0]['transfer_id']}").json()
        assert told["usage_pruned"] is True and len(told["entries"]) >= 2
        assert any(f"ended before {done.before:%Y-%m-%d}" in line
                   for line in told["explanation"])
        # Again: nothing more to do, and nothing changes.
        again = prune(engine, 31, now=later)
        assert (again.leases, again.records) == (0, 0)
        assert books(b) == before


def test_a_lease_whose_end_is_not_charged_holds_the_prune_back(db_url):
    with in_process_broker(db_url, 3, **SETTINGS) as b:
        engine = b.app.state.broker.engine
        leases = history(b)
        counted = records_of(engine, leases["ended"] + leases["running"])
        # One more lease ends, a second before the others, its last 5 minutes not charged.
        with db.session(engine) as s:
            first_end = s.exec(select(func.min(Lease.ended_at))).one()
        set_ends(engine, ["ls-inproc1"], as_utc(first_end) - dt.timedelta(seconds=1),
                 metered_until=as_utc(first_end) - dt.timedelta(minutes=5))
        report = prune(engine, 31, now=dt.datetime.now(dt.UTC) + 40 * DAY)
        assert (report.leases, report.records) == (0, 0)
        assert report.held_back_at == as_utc(first_end) - dt.timedelta(seconds=1)
        assert records_of(engine, leases["ended"] + ["ls-inproc1"]) == {
            x: counted[x] for x in leases["ended"] + ["ls-inproc1"]}


def test_the_prune_command_says_what_it_needs_and_what_it_did(tmp_path):
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    env = {"PARALLEX_DB_URL": url, "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(parallex("db", *args), capture_output=True, text=True, env=env,
                              timeout=60)

    missing = run("prune")
    assert missing.returncode == 2 and "needs --keep-days" in missing.stderr
    db.plain_engine(url).dispose()
    empty = run("prune", "--keep-days", "400")
    assert empty.returncode == 1 and "run `parallex db upgrade` first" in empty.stderr
    assert run("upgrade").returncode == 0
    short = run("prune", "--keep-days", str(MIN_KEEP_DAYS - 1))
    assert short.returncode == 2 and f"least a federation keeps, {MIN_KEEP_DAYS} days" in (
        short.stderr)
    assert "Traceback" not in short.stderr
    for bad, said in ((("--keep-days", "99999999"), "is over 36500 (a century)"),
                      (("--keep-days", "400", "--batch", "0"), "give 1 to 100,000 leases"),
                      (("--keep-days", "400", "--batch", "100001"), "give 1 to 100,000")):
        refused = run("prune", *bad)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    with in_process_broker(url, 3, **SETTINGS) as b:
        leases = history(b)
        before = books(b)
        engine = b.app.state.broker.engine
        counted = records_of(engine, leases["ended"])
        # The ended leases ended 60 days ago, as far as the prune can tell.
        set_ends(engine, leases["ended"], dt.datetime.now(dt.UTC) - 60 * DAY)
        dry = run("prune", "--keep-days", "31", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith(
            f"would prune the usage records of 2 leases that ended before "
            f"{horizon(dt.datetime.now(dt.UTC), 31):%Y-%m-%d} UTC "
            f"({sum(counted.values()):,} records")
        assert records_of(engine, leases["ended"]) == counted
        done = run("prune", "--keep-days", "31", "--batch", "1")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("pruned the usage records of 2 leases")
        assert done.stderr.count("leases' records") >= 2  # progress, a line a batch
        assert records_of(engine, leases["ended"]) == {}
        after = books(b)
        # The job records' end times moved with the test's update; their figures did not.
        for record in before["records"] + after["records"]:
            record.pop("end_time"), record.pop("wall_seconds")
        assert after == before


def test_the_shipped_prune_unit_runs_a_valid_command(tmp_path):
    """deploy/systemd/parallex-prune.service's command line is one `parallex db prune`
    accepts (dry here, on a fresh database)."""
    unit = (Path(__file__).resolve().parents[2] / "deploy" / "systemd"
            / "parallex-prune.service").read_text()
    command = next(line.split("=", 1)[1] for line in unit.splitlines()
                   if line.startswith("ExecStart="))
    program, *args = shlex.split(command)
    assert program.endswith("/parallex") and args[:2] == ["db", "prune"]
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    db.make_engine(url).dispose()
    done = subprocess.run(parallex(*args, "--dry-run"), capture_output=True, text=True,
                          env={"PARALLEX_DB_URL": url, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("would prune the usage records of 0 leases")
