"""The ledger on a real PostgreSQL server: several meterers (separate processes, each with its
own connections) meter the same leases at once while API clients post grants through a broker
on the same database. Every period is charged once and the balances come out exact."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from accounting.metering import LeaseUsage, meter
from accounting.pricing import GiB, Resources, default_price, pcu_per_hour
from accounting.units import NANO, to_nano
from federation.broker import db
from tests.utils.federation import make_federation

T0 = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
INTERVAL = 60.0
STEPS = 8
METERERS = 4
GRANT_WRITERS = 3
GRANTS_EACH = 15
GRANT = Decimal("1.25")
RELIABILITY = {"prv-0": 1.0, "prv-1": 0.9, "prv-2": 0.75}


def leases(users: dict[str, int], labs: dict[str, int]) -> list[LeaseUsage]:
    """24 leases between three labs (self-use included), all started at T0."""
    out = []
    for i in range(24):
        consumer, provider = i % 3, (i // 3) % 3
        out.append(LeaseUsage(
            f"ls-pg-{i:02d}", users[f"user{consumer}"], labs[f"lab{consumer}"],
            labs[f"lab{provider}"], f"prv-{provider}", T0, None,
            Resources(1 + i % 4, (1 + i % 3) * GiB, 0, None),
            reliability=RELIABILITY[f"prv-{provider}"]))
    return out


def run_meterer(url: str, users: dict, labs: dict, results, start, barrier) -> None:
    """One metering process: every step up to STEPS periods, retried until it goes through.
    All meterers start each step together, so they race for the same periods."""
    engine = db.make_engine(url)
    usages = leases(users, labs)
    collisions = 0
    start.wait(60)
    for step in range(1, STEPS + 1):
        barrier.wait(60)
        now = T0 + dt.timedelta(seconds=INTERVAL * step + 1)
        while True:
            with db.session(engine) as s:
                try:
                    meter(s, usages, now=now, interval=INTERVAL)
                    s.commit()
                    break
                except (IntegrityError, DBAPIError):
                    # Another meterer recorded these periods first (unique violation) or the
                    # server chose us as a deadlock victim; a retry finds what is left.
                    s.rollback()
                    collisions += 1
    engine.dispose()
    results.put(collisions)


@pytest.fixture
def pg_broker(tmp_path, postgres_url):
    fed = make_federation(tmp_path, db_url=postgres_url, broker_args=("--initial-grant", "500"))
    try:
        yield fed
    finally:
        fed.stop()


def test_concurrent_meterers_and_api_writers_end_with_exact_balances(pg_broker):
    fed = pg_broker
    for i in range(3):
        fed.add_lab(f"lab{i}", user=f"user{i}")
    engine = db.make_engine(fed.db_url)
    with engine.connect() as c:
        labs = dict(c.execute(text("SELECT name, id FROM lab")).all())
        users = dict(c.execute(text('SELECT name, id FROM "user"')).all())

    ctx = multiprocessing.get_context("spawn")
    results, barrier = ctx.Queue(), ctx.Barrier(METERERS)
    # Grant writers and meterers begin together, so grants land while metering runs.
    start = ctx.Barrier(METERERS + GRANT_WRITERS)
    meterers = [ctx.Process(target=run_meterer,
                            args=(fed.db_url, users, labs, results, start, barrier))
                for _ in range(METERERS)]
    granted = {name: 0 for name in labs}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def grant_writer(n: int) -> None:
        admin = fed.admin()
        try:
            start.wait(60)
            for k in range(GRANTS_EACH):
                lab = f"lab{(n + k) % 3}"
                admin.request("POST", "/grants", json={"lab": lab, "amount": str(GRANT),
                                                       "memo": f"writer {n} grant {k}"})
                with lock:
                    granted[lab] += 1
        except BaseException as exc:  # reported below, with the others
            failures.append(exc)
        finally:
            admin.close()

    writers = [threading.Thread(target=grant_writer, args=(n,)) for n in range(GRANT_WRITERS)]
    for p in meterers:
        p.start()
    for t in writers:
        t.start()
    try:
        for t in writers:
            t.join(120)
        for p in meterers:
            p.join(180)
        assert not failures, failures
        assert all(p.exitcode == 0 for p in meterers), [p.exitcode for p in meterers]
    finally:
        for p in meterers:
            if p.is_alive():
                p.kill()
    collisions = sum(results.get(timeout=10) for _ in meterers)

    usages = leases(users, labs)
    price = default_price(T0)
    expected = {name: Decimal(500) + granted[name] * GRANT for name in labs}
    name_of = {v: k for k, v in labs.items()}
    for u in usages:
        charge = to_nano(pcu_per_hour(price, u.resources) * INTERVAL / 3600)
        if u.consumer_lab_id == u.provider_lab_id:
            continue
        expected[name_of[u.consumer_lab_id]] -= Decimal(charge * STEPS) / NANO
        expected[name_of[u.provider_lab_id]] += Decimal(int(charge * u.reliability) * STEPS) / NANO

    with engine.connect() as c:
        periods = c.execute(text("SELECT COUNT(*), COUNT(DISTINCT (lease_id, period_start)) "
                                 "FROM usagerecord")).one()
        assert periods == (len(usages) * STEPS, len(usages) * STEPS)
        assert c.execute(text("SELECT SUM(amount) FROM ledgerentry")).scalar() == 0
        unbalanced = c.execute(text(
            "SELECT b.account_id FROM balance b LEFT JOIN (SELECT account_id, SUM(amount) s "
            "FROM ledgerentry GROUP BY account_id) e ON e.account_id = b.account_id "
            "WHERE b.amount <> COALESCE(e.s, 0)")).all()
        assert unbalanced == []
        assert c.execute(text("SELECT COUNT(*) FROM transfer WHERE kind = 'grant'")).scalar() \
            == 3 + GRANT_WRITERS * GRANTS_EACH
    engine.dispose()
    assert {name: fed.balance(name) for name in labs} == expected
    # The test is only worth something if the meterers really raced each other.
    assert collisions > 0
