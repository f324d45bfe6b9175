"""Fair share and owner priority, from a table of cases."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter

import pytest

from accounting.fairshare import Claim, add_usage, decayed, fair_order, usage_now
from federation.broker import db
from federation.placement import LeaseRequest, ProviderCapacity, place_with_owner_priority

T = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
DAY = 24 * 3600.0
A, B, C = 1, 2, 3  # lab ids
CASES = [
    # (name, shares, lab usage, user usage, claims as (id, lab, user, minutes), expected order)
    ("equal shares, lab A used heavily: B first", {A: 1, B: 1}, {A: 500.0, B: 10.0}, {},
     [("a1", A, 10, 0), ("b1", B, 20, 1)], ["b1", "a1"]),
    ("no usage anywhere: oldest first", {A: 1, B: 1}, {}, {},
     [("b1", B, 20, 1), ("a1", A, 10, 0)], ["a1", "b1"]),
    ("bigger share buys priority at equal use", {A: 3, B: 1}, {A: 100.0, B: 100.0}, {},
     [("b1", B, 20, 0), ("a1", A, 10, 5)], ["a1", "b1"]),
    ("share proportional to use: the lab below its share first", {A: 2, B: 1},
     {A: 300.0, B: 100.0}, {}, [("a1", A, 10, 0), ("b1", B, 20, 1)], ["b1", "a1"]),
    ("within a lab, the user who used less first", {A: 1}, {A: 50.0}, {10: 40.0, 11: 1.0},
     [("x", A, 10, 0), ("y", A, 11, 3)], ["y", "x"]),
    ("labs before users: a light user of a heavy lab waits", {A: 1, B: 1},
     {A: 900.0, B: 100.0}, {10: 0.0, 20: 80.0},
     [("a-light", A, 10, 0), ("b-heavy", B, 20, 0)], ["b-heavy", "a-light"]),
]


@pytest.mark.parametrize(("name", "shares", "lab_usage", "user_usage", "claims", "expected"),
                         CASES, ids=[c[0] for c in CASES])
def test_fair_order(name, shares, lab_usage, user_usage, claims, expected):
    objs = [Claim(i, lab, user, T + dt.timedelta(minutes=m)) for i, lab, user, m in claims]
    assert [c.request_id for c in fair_order(objs, shares, lab_usage, user_usage)] == expected


def test_owner_priority_on_own_machines_beats_fair_share():
    # Lab B is ahead on fair share, but the only machine belongs to lab A: A's member first.
    providers = [ProviderCapacity("pa", "A", "A", 1, 2**31)]
    requests = [LeaseRequest("b1", "cb", 1, 2**30, lab="B"),
                LeaseRequest("a1", "ca", 1, 2**30, lab="A")]
    placed = place_with_owner_priority(requests, providers, {}, random.Random(0))
    assert [(p.lease_id, p.provider_id) for p in placed] == [("a1", "pa")]


def test_others_use_what_owners_leave():
    providers = [ProviderCapacity("pa", "A", "A", 2, 4 * 2**30),
                 ProviderCapacity("pb", "B", "B", 1, 4 * 2**30)]
    requests = [LeaseRequest("b1", "cb", 1, 2**30, lab="B"),
                LeaseRequest("b2", "cb", 1, 2**30, lab="B"),
                LeaseRequest("a1", "ca", 1, 2**30, lab="A")]
    placed = {p.lease_id: p.provider_id
              for p in place_with_owner_priority(requests, providers, {}, random.Random(0))}
    assert placed == {"b1": "pb", "a1": "pa", "b2": "pa"}
    assert Counter(placed.values()) == {"pa": 2, "pb": 1}


def test_usage_decays_with_the_half_life(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'fs.db'}")
    with db.session(engine) as s:
        add_usage(s, [("lab", A, 100.0, T)], half_life=7 * DAY)
        add_usage(s, [("lab", A, 50.0, T + dt.timedelta(days=7))], half_life=7 * DAY)
        # A period metered late (older than the row) still counts, decayed to the row's time.
        add_usage(s, [("lab", A, 8.0, T - dt.timedelta(days=7))], half_life=7 * DAY)
        s.commit()
        now = T + dt.timedelta(days=14)
        got = usage_now(s, "lab", [A, B], now, half_life=7 * DAY)
    assert got[A] == pytest.approx((100 / 2 + 50 + 8 / 4) / 2)
    assert got[B] == 0.0
    assert decayed(10.0, T, T + dt.timedelta(days=21), 7 * DAY) == pytest.approx(1.25)
    engine.dispose()
