"""Property: whatever happens — lease starts and ends, meterings, retried meterings, restarts —
every transfer sums to zero, every balance equals its entries, each lease's running time is
charged exactly once (its usage periods tile it without gap or overlap), and the daily rollups
hold exactly what the usage records hold."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import tempfile
from collections import defaultdict
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func
from sqlmodel import select

from accounting.ledger import Balance, LedgerEntry, Transfer, grant
from accounting.metering import LeaseUsage, UsageRecord, meter
from accounting.models import as_utc, create_lab, create_user
from accounting.pricing import Resources, ensure_default_price
from accounting.rollups import UsageDaily
from accounting.units import to_nano
from federation.broker import db
from tests.utils.postgres import fresh_database

INTERVAL = 60.0
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

op = st.one_of(
    st.tuples(st.just("start"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 8),
              st.integers(0, 2), st.sampled_from([None, "NVIDIA H100", "Tesla T4", "Mystery"])),
    st.tuples(st.just("advance"), st.integers(1, 400)),
    st.tuples(st.just("meter")),
    st.tuples(st.just("restart")),
    st.tuples(st.just("end"), st.integers(0, 50)),
)


def check_books(session) -> None:
    per_transfer = session.exec(select(LedgerEntry.transfer_id, func.sum(LedgerEntry.amount))
                                .group_by(LedgerEntry.transfer_id)).all()
    assert all(total == 0 for _, total in per_transfer), per_transfer
    sums = dict(session.exec(select(LedgerEntry.account_id, func.sum(LedgerEntry.amount))
                             .group_by(LedgerEntry.account_id)).all())
    for row in session.exec(select(Balance)):
        assert row.amount == sums.get(row.account_id, 0), (row, sums)
    # Each charged period's transfer is its own: named for its lease and period, moving its
    # charge (metering gives transfers their ids before it writes them, in bulk).
    paid = dict(session.exec(select(LedgerEntry.transfer_id, func.min(LedgerEntry.amount))
                              .group_by(LedgerEntry.transfer_id)).all())
    memos = dict(session.exec(select(Transfer.id, Transfer.memo)).all())
    for r in session.exec(select(UsageRecord).where(UsageRecord.transfer_id != None)):  # noqa: E711
        assert memos[r.transfer_id].startswith(
            f"lease {r.lease_id} {as_utc(r.period_start):%Y-%m-%d %H:%M:%S}"), (r, memos)
        assert paid[r.transfer_id] == -r.charge, (r, paid[r.transfer_id])
    # The daily rollups the dashboards read hold exactly what the usage records hold, row
    # by row (day, labs, machine, user, GPU class, self-use) and column by column.
    expected: dict[tuple, list] = defaultdict(lambda: [0, 0, 0.0, 0.0, 0.0, 0.0])
    for r in session.exec(select(UsageRecord)):
        sums = expected[(as_utc(r.period_end).date(), r.consumer_lab_id, r.provider_lab_id,
                         r.provider_id, r.user_id, r.gpu_class or "", r.self_use)]
        for i, value in enumerate((r.charge, r.earned, r.cpus * r.seconds,
                                   r.gpus * r.seconds, r.seconds, r.cloud_cost)):
            sums[i] += value
    rolled = {(d.day, d.consumer_lab_id, d.provider_lab_id, d.provider_id, d.user_id,
               d.gpu_class, d.self_use): [d.charge, d.earned, d.cpu_seconds, d.gpu_seconds,
                                          d.seconds, d.cloud_cost]
              for d in session.exec(select(UsageDaily))}
    assert rolled.keys() == expected.keys()
    for key, sums in expected.items():
        assert rolled[key][:2] == sums[:2], key  # nano-PCU: exact
        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
                   for a, b in zip(rolled[key][2:], sums[2:], strict=True)), (key, rolled[key])


def check_coverage(session, leases: dict[str, LeaseUsage], now: dt.datetime) -> None:
    by_lease = defaultdict(list)
    for r in session.exec(select(UsageRecord).order_by(UsageRecord.period_start)):
        by_lease[r.lease_id].append(r)
    for lid, usage in leases.items():
        recs = by_lease.get(lid, [])
        cursor = usage.started_at
        for r in recs:
            assert as_utc(r.period_start) == cursor, f"gap or overlap in lease {lid}"
            cursor = as_utc(r.period_end)
        # Everything that could be metered was: the rest is less than one period, or nothing
        # once the lease has ended.
        limit = min(usage.ended_at, now) if usage.ended_at else now
        if usage.ended_at and usage.ended_at <= now:
            assert cursor == usage.ended_at
        else:
            assert (limit - cursor).total_seconds() < INTERVAL


def run_history(url: str, ops: list) -> None:
    """Play ``ops`` against a fresh database at ``url``, checking the books after each."""
    engine = db.make_engine(url)
    with db.session(engine) as s:
        labs = [create_lab(s, name=f"lab{i}") for i in range(3)]
        users = [create_user(s, name=f"user{i}", lab=labs[i]) for i in range(3)]
        ensure_default_price(s)
        for lab in labs:
            grant(s, lab=lab, amount=to_nano(1000))
        s.commit()
        lab_ids = [lab.id for lab in labs]
        user_ids = [u.id for u in users]
    now = T0
    leases: dict[str, LeaseUsage] = {}
    for step in ops:
        kind = step[0]
        if kind == "start":
            _, consumer, provider, cpus, gpus, model = step
            lid = f"ls-{len(leases):04d}"
            leases[lid] = LeaseUsage(lid, user_ids[consumer], lab_ids[consumer],
                                     lab_ids[provider], f"prv-{provider}", now, None,
                                     Resources(cpus, cpus * 2**30, gpus, model),
                                     reliability=0.5 + 0.25 * provider)
        elif kind == "advance":
            now += dt.timedelta(seconds=step[1])
        elif kind == "end":
            running = [u for u in leases.values() if u.ended_at is None]
            if running:
                u = running[step[1] % len(running)]
                leases[u.lease_id] = LeaseUsage(**{**u.__dict__, "ended_at": now})
        elif kind == "restart":
            engine.dispose()
            engine = db.make_engine(url)
        else:
            for _attempt in range(2):  # a retried metering must add nothing
                with db.session(engine) as s:
                    meter(s, list(leases.values()), now=now, interval=INTERVAL)
                    s.commit()
        with db.session(engine) as s:
            check_books(s)
            if kind == "meter":
                check_coverage(s, leases, now)
    engine.dispose()


#: Two meterings of one lease on one day: its periods add up in one daily row (an upsert that
#: overwrote instead of adding passed every history hypothesis happened to draw).
SAME_DAY_TWICE = [("start", 0, 1, 2, 1, "Tesla T4"), ("advance", 200), ("meter",),
                  ("advance", 200), ("meter",)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=25))
@example(SAME_DAY_TWICE)
def test_ledger_invariants_hold_for_any_history(ops):
    with tempfile.TemporaryDirectory() as tmp:
        run_history(f"sqlite:///{Path(tmp) / 'books.db'}", ops)


_pg_databases = itertools.count()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=25))
@example(ops=SAME_DAY_TWICE)
def test_ledger_invariants_hold_on_postgresql(postgres_server_url, ops):
    run_history(fresh_database(postgres_server_url, f"prop_{next(_pg_databases)}"), ops)


def test_suspended_spans_are_neither_charged_nor_earned():
    """A period with a span suspended for the machine's owner charges only the rest."""
    from accounting.metering import _paused_seconds

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    s = dt.timedelta(seconds=1)
    spans = ((t0 + 10 * s, t0 + 20 * s), (t0 + 50 * s, None))
    assert _paused_seconds(spans, t0, t0 + 60 * s) == 20  # 10 closed + 10 still open
    assert _paused_seconds(spans, t0 + 15 * s, t0 + 30 * s) == 5
    assert _paused_seconds(spans, t0 + 20 * s, t0 + 50 * s) == 0
    assert _paused_seconds(((t0, None),), t0 + 5 * s, t0 + 8 * s) == 3
