"""Provider reliability: lost and failed leases lower the factor, clean metered time restores
it, it stays within 0.5..1.0, and metering pays providers by it."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlmodel import select

from accounting.metering import LeaseUsage, UsageRecord, meter
from accounting.models import create_lab, create_user
from accounting.pricing import GiB, Resources
from accounting.reliability import (
    ProviderReliability,
    factor,
    record_clean_time,
    record_incident,
    reliabilities,
)
from federation.broker import db

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
HOUR = 3600.0


@pytest.fixture
def session(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with db.session(engine) as s:
        yield s


def test_factor_bounds_and_steps():
    assert factor(0) == 1.0
    assert factor(1) == pytest.approx(0.8536, abs=1e-4)  # one lost lease
    assert factor(4) == pytest.approx(0.625)
    assert factor(1e9) >= 0.5
    steps = [factor(p / 2) for p in range(40)]
    assert steps == sorted(steps, reverse=True)


def test_incidents_lower_and_clean_time_restores(session):
    assert reliabilities(session, ["p1", "p2"]) == {"p1": 1.0, "p2": 1.0}
    record_incident(session, "p1", "lost", at=T0)
    record_incident(session, "p1", "failed", at=T0)
    record_incident(session, "p2", "failed", at=T0)
    session.commit()
    row = session.get(ProviderReliability, "p1")
    assert (row.penalty, row.lost_leases, row.failed_leases) == (1.5, 1, 1)
    before = reliabilities(session, ["p1", "p2"])
    assert before["p1"] == pytest.approx(factor(1.5))
    assert before["p2"] == pytest.approx(factor(0.5))
    assert before["p1"] < before["p2"] < 1.0

    # One half-life of clean lease time halves the penalty; p2 served nothing and stays.
    record_clean_time(session, {"p1": 24 * HOUR}, half_life=24 * HOUR)
    session.commit()
    session.expire_all()
    assert session.get(ProviderReliability, "p1").penalty == pytest.approx(0.75)
    assert reliabilities(session, ["p2"])["p2"] == pytest.approx(factor(0.5))
    record_clean_time(session, {"p1": 10 * 24 * HOUR}, half_life=24 * HOUR)
    session.commit()
    assert reliabilities(session, ["p1"])["p1"] == pytest.approx(1.0, abs=1e-3)


def test_metering_pays_by_reliability_and_counts_clean_time(session):
    consumer, provider = create_lab(session, name="c"), create_lab(session, name="p")
    user = create_user(session, name="u", lab=consumer)
    record_incident(session, "prv", "lost", at=T0)
    session.commit()
    r = reliabilities(session, ["prv"])["prv"]
    usage = LeaseUsage("ls-1", user.id, consumer.id, provider.id, "prv", T0,
                       T0 + dt.timedelta(hours=2), Resources(4, 8 * GiB), reliability=r)
    meter(session, [usage], now=T0 + dt.timedelta(hours=3), interval=HOUR,
          reliability_half_life=HOUR)
    session.commit()
    records = session.exec(select(UsageRecord)).all()
    assert len(records) == 2
    for rec in records:
        assert rec.reliability == r
        assert rec.earned == int(rec.charge * r)  # no fee by default
    # Two clean hours at a one-hour half-life: the penalty is a quarter of what it was.
    session.expire_all()
    assert session.get(ProviderReliability, "prv").penalty == pytest.approx(0.25)
