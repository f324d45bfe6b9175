"""Usage reports (``GET /usage``, a lab's members and machines) sum the daily rollups for a
period's whole days and the usage records only for its partial days: the sums equal the
records' own for any period, and over a month of history a report reads a day of records at
most, where summing the records read every one of them."""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict

import pytest
from sqlalchemy import text
from sqlmodel import select

from accounting.cloud import CloudPrices
from accounting.metering import LeaseUsage, UsageRecord, meter
from accounting.models import as_utc, create_lab, create_user
from accounting.pricing import Resources
from accounting.usage_totals import KEYS, last_used, split_period, usage_totals
from federation.broker import db
from tests.utils.in_process import ADMIN_TOKEN, in_process_broker
from tests.utils.postgres import rows_read

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
GiB = 2**30


def make_history(session, *, leases: int, days: float, interval: float,
                 passes: int) -> dict[str, int]:
    """Three labs and four users; ``leases`` leases of varied sizes, lab pairs (self-use
    among them), machines, starts and ends over ``days`` days, metered in ``passes`` passes;
    the ids by name."""
    labs = [create_lab(session, name=f"lab-{c}") for c in "abc"]
    users = [create_user(session, name=n, lab=lab) for n, lab in
             (("ann", labs[0]), ("amy", labs[0]), ("bob", labs[1]), ("cat", labs[2]))]
    session.commit()
    usages = []
    for i in range(leases):
        user = users[i % 4]
        start = T0 + dt.timedelta(hours=7 * i % (24 * days), minutes=13)
        usages.append(LeaseUsage(
            lease_id=f"ls{i}", user_id=user.id, consumer_lab_id=user.lab_id,
            provider_lab_id=labs[(i // 3) % 3].id, provider_id=f"box{i % 5}",
            started_at=start,
            ended_at=None if i % 3 == 0 else start + dt.timedelta(hours=20 + 5 * i, minutes=7),
            resources=Resources(1 + i % 3, GiB * (1 + i % 2), i % 2,
                                "NVIDIA H100" if i % 2 else None)))
    for k in range(1, passes + 1):
        meter(session, usages, now=T0 + days * DAY * k / passes, interval=interval)
        session.commit()
    return {**{lab.name: lab.id for lab in labs}, **{u.name: u.id for u in users}}


def oracle(session, by: str, since, until, where: dict) -> dict:
    """The records' own sums, in Python."""
    out: dict = defaultdict(lambda: [0, 0, 0, 0.0, 0.0, 0.0, 0.0])
    for r in session.exec(select(UsageRecord)):
        end = as_utc(r.period_end)
        if (since is not None and end < since) or (until is not None and end >= until):
            continue
        if any(getattr(r, k) != v for k, v in where.items()):
            continue
        sums = out[getattr(r, by)]
        for i, value in enumerate((0 if r.self_use else r.charge, r.charge if r.self_use else 0,
                                   r.earned, r.cpus * r.seconds, r.gpus * r.seconds, r.seconds,
                                   r.cloud_cost)):
            sums[i] += value
    return dict(out)


@pytest.fixture(params=["sqlite", "postgresql"])
def history(request, tmp_path):
    url = (request.getfixturevalue("postgres_url") if request.param == "postgresql"
           else f"sqlite:///{tmp_path / 'broker.db'}")
    engine = db.make_engine(url)
    with db.session(engine) as s:
        ids = make_history(s, leases=12, days=6, interval=1800, passes=7)
    yield engine, ids
    engine.dispose()


UTC5 = dt.timezone(dt.timedelta(hours=5))
PERIODS = [
    (None, None),
    (T0 + 2 * DAY, None),                                       # from a midnight
    (T0 + DAY + dt.timedelta(minutes=13), None),               # from a period's end
    (None, T0 + 4 * DAY + dt.timedelta(hours=3)),              # to inside a day
    (T0 + DAY + dt.timedelta(hours=10, minutes=17), T0 + 3 * DAY + dt.timedelta(minutes=43)),
    (T0 + 2 * DAY + dt.timedelta(hours=1), T0 + 2 * DAY + dt.timedelta(hours=9)),  # one day
    (T0 + 2 * DAY + dt.timedelta(hours=20), T0 + 3 * DAY + dt.timedelta(hours=2)),  # no day
    (T0 + 2 * DAY, T0 + 4 * DAY),                                # whole days only
    (dt.datetime(2026, 3, 3, 2, 0, tzinfo=UTC5), dt.datetime(2026, 3, 5, 1, 0, tzinfo=UTC5)),
    (T0 + 3 * DAY, T0 + 3 * DAY),                                # empty
    (T0 + 30 * DAY, None),                                       # after everything
    # The ends of time, where UTC days run out (a query may name them).
    (dt.datetime(9999, 12, 31, 23, 0, tzinfo=dt.UTC), None),
    (dt.datetime(1, 1, 1, 0, 30, tzinfo=UTC5), None),
    (None, dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.timezone(-dt.timedelta(hours=5)))),
]


def test_usage_totals_equal_the_records_sums_for_any_period(history):
    engine, ids = history
    wheres = [{}, {"consumer_lab_id": ids["lab-a"]}, {"provider_lab_id": ids["lab-b"]},
              {"user_id": ids["amy"]}, {"consumer_lab_id": ids["lab-c"], "user_id": ids["cat"]}]
    with db.session(engine) as s:
        # The history has what the periods below cut: records on each of its days, charged
        # use and self-use.
        records = s.exec(select(UsageRecord)).all()
        assert {as_utc(r.period_end).date() for r in records} >= {
            (T0 + k * DAY).date() for k in range(6)}
        assert {r.self_use for r in records} == {True, False}
        for since, until in PERIODS:
            for by in KEYS:
                for where in wheres:
                    got = usage_totals(s, by=by, since=since, until=until, **where)
                    want = oracle(s, by, since, until, where)
                    case = (since, until, by, where)
                    assert got.keys() == want.keys(), case
                    for key, total in got.items():
                        sums = want[key]
                        assert [total.charged, total.self_use, total.earned] == sums[:3], case
                        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(
                            (total.cpu_seconds, total.gpu_seconds, total.seconds,
                             total.cloud_cost), sums[3:], strict=True)), case
            for lab in ("lab-a", "lab-b", "lab-c"):
                got = last_used(s, ids[lab], since)
                want: dict[int, dt.datetime] = {}
                for r in s.exec(select(UsageRecord).where(
                        UsageRecord.consumer_lab_id == ids[lab])):
                    end = as_utc(r.period_end)
                    if since is None or end >= since:
                        want[r.user_id] = max(want.get(r.user_id, end), end)
                assert got == want, (lab, since)


def test_a_period_splits_into_whole_utc_days_and_its_edges():
    d = T0.date()
    assert split_period(None, None) == ((None, None), [])
    assert split_period(T0, T0 + 2 * DAY) == ((d, d + 2 * DAY), [])
    noon = T0 + dt.timedelta(hours=12)
    assert split_period(noon, noon + 2 * DAY) == (
        (d + DAY, d + 2 * DAY), [(noon, T0 + DAY), (T0 + 2 * DAY, noon + 2 * DAY)])
    assert split_period(noon, noon + dt.timedelta(hours=13)) == (
        None, [(noon, noon + dt.timedelta(hours=13))])
    # 02:00 at UTC+5 is 21:00 UTC the day before: days are UTC days, as the rollups'.
    local = dt.datetime(2026, 3, 3, 2, 0, tzinfo=UTC5)
    assert split_period(local, None) == (
        (dt.date(2026, 3, 3), None), [(T0 + DAY + dt.timedelta(hours=21), T0 + 2 * DAY)])
    # Where UTC runs out: the last day's inside has no whole day after it, and a time before
    # the first instant of UTC is that instant.
    last = dt.datetime(9999, 12, 31, 23, 0, tzinfo=dt.UTC)
    assert split_period(last, None) == (None, [(last, None)])
    first = dt.datetime.min.replace(tzinfo=dt.UTC)
    assert split_period(dt.datetime(1, 1, 1, 0, 30, tzinfo=UTC5), None) == (
        (first.date(), None), [])


def test_reports_over_a_month_read_a_day_of_records_at_most(postgres_url):
    """40 leases metered hourly over 30 days (11,236 records): a lab's members with their
    last use, its machines' earnings and a usage report from inside a day 10 days ago read
    a day of records at most; summing the records read all of the lab's."""
    engine = db.make_engine(postgres_url)
    try:
        with db.session(engine) as s:
            ids = make_history(s, leases=40, days=30, interval=3600, passes=1)
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
            (total,) = conn.execute(text("SELECT count(*) FROM usagerecord")).one()
            (lab_a,) = conn.execute(text(
                "SELECT count(*) FROM usagerecord WHERE consumer_lab_id = :a"),
                {"a": ids["lab-a"]}).one()
            (a_day,) = conn.execute(text(
                "SELECT count(*) FROM usagerecord WHERE period_end >= :lo AND period_end < :hi"),
                {"lo": T0 + 20 * DAY, "hi": T0 + 21 * DAY}).one()
        assert total >= 10_000 and lab_a >= 5_000, (total, lab_a)
        since = T0 + 20 * DAY + dt.timedelta(hours=9, minutes=30)
        with db.session(engine) as s:
            before = rows_read(s, "usagerecord")
            members = usage_totals(s, by="user_id", consumer_lab_id=ids["lab-a"])
            machines = usage_totals(s, by="provider_id", provider_lab_id=ids["lab-a"])
            whole = rows_read(s, "usagerecord") - before
            before = rows_read(s, "usagerecord")
            recent = usage_totals(s, by="user_id", since=since, consumer_lab_id=ids["lab-a"])
            edge = rows_read(s, "usagerecord") - before
            before = rows_read(s, "usagerecord")
            last = last_used(s, ids["lab-a"])
            last_reads = rows_read(s, "usagerecord") - before
            before = rows_read(s, "usagerecord")
            summed = s.connection().execute(text(
                "SELECT user_id, sum(charge) FROM usagerecord WHERE consumer_lab_id = :a "
                "GROUP BY user_id"), {"a": ids["lab-a"]}).all()
            summing = rows_read(s, "usagerecord") - before
        assert set(members) == set(last) == {ids["ann"], ids["amy"]}
        assert {u: t.charged + t.self_use for u, t in members.items()} == dict(summed)
        assert machines and recent
        assert whole == 0, whole  # the rollups alone
        assert edge <= a_day, (edge, a_day)  # the records of since's day after since
        assert last_reads <= 2 * 24, last_reads  # each member's last record, by the index
        assert summing >= lab_a  # what the reports read before
    finally:
        engine.dispose()


@pytest.mark.parametrize("query", [
    {"since": "9999-12-31T23:00:00Z"}, {"since": "0001-01-01T00:30:00+05:00"},
    {"until": "9999-12-31T23:59:00-05:00"},
    {"since": "2026-03-02T10:00:00+02:00", "until": "2026-03-01T00:00:00Z"}])
def test_reports_answer_any_period_a_query_can_name(tmp_path, query):
    """The ends of time and a period ending before it starts are answered, not a 500."""
    with in_process_broker(f"sqlite:///{tmp_path / 'broker.db'}", leases=1,
                           cloud_prices=CloudPrices()) as b:
        answer = b.call(ADMIN_TOKEN, "GET", "/usage", params=query)
        assert answer.status_code == 200, answer.text
        assert answer.json()["rows"] == []
        if "since" in query:
            answer = b.call(ADMIN_TOKEN, "GET", "/labs/lab-a/members",
                            params={"since": query["since"]})
            assert answer.status_code == 200, answer.text
            assert [m["last_used"] for m in answer.json()["members"]] == [None]
