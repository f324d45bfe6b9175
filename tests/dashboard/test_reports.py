"""The dashboards' aggregations over a real database: each viewer sees the right rows, filters
change the figures, and the rollups agree with the usage records."""

from __future__ import annotations

import datetime as dt

import pytest

from accounting.ledger import grant
from accounting.metering import LeaseUsage, meter
from accounting.models import Role, create_lab, create_user
from accounting.pricing import GiB, Resources, ensure_default_price
from accounting.units import to_nano
from dashboard import reports
from federation.broker import db
from federation.broker.access import Scope, scope_of_user
from federation.broker.capacity import CapacitySample
from federation.broker.models import ClusterRecord, Lease, LeaseState

DAY1 = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)


@pytest.fixture
def books(tmp_path):
    """physics (ada member, pia PI) and chemistry (carl); two days of cross-lab use."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'books.db'}")
    with db.session(engine) as s:
        ensure_default_price(s)
        physics = create_lab(s, name="physics", institution="North")
        chemistry = create_lab(s, name="chemistry", institution="South")
        ada = create_user(s, name="ada", lab=physics)
        pia = create_user(s, name="pia", lab=physics, role=Role.pi)
        carl = create_user(s, name="carl", lab=chemistry)
        for lab in (physics, chemistry):
            grant(s, lab=lab, amount=to_nano(100))
        s.commit()
        usages = [
            # ada on chemistry's machine for 2 h on day 1 (4 CPUs)
            LeaseUsage("l1", ada.id, physics.id, chemistry.id, "m-chem", DAY1,
                       DAY1 + dt.timedelta(hours=2), Resources(4, 8 * GiB)),
            # carl on physics' machine for 1 h on day 2 with an A100
            LeaseUsage("l2", carl.id, chemistry.id, physics.id, "m-phys",
                       DAY1 + dt.timedelta(days=1), DAY1 + dt.timedelta(days=1, hours=1),
                       Resources(2, 4 * GiB, 1, "NVIDIA A100")),
            # pia on her own lab's machine, day 2 (free)
            LeaseUsage("l3", pia.id, physics.id, physics.id, "m-phys",
                       DAY1 + dt.timedelta(days=1), DAY1 + dt.timedelta(days=1, hours=1),
                       Resources(1, 2 * GiB)),
        ]
        meter(s, usages, now=DAY1 + dt.timedelta(days=3), interval=3600)
        s.commit()
        yield s, {"ada": ada, "pia": pia, "carl": carl, "physics": physics,
                  "chemistry": chemistry}
    engine.dispose()


def test_each_viewer_sees_their_scope(books):
    s, who = books
    period = reports.Filters(DAY1.date(), DAY1.date() + dt.timedelta(days=3))
    admin = Scope("root", "admin")
    pi = scope_of_user(s, "pia")
    ada = scope_of_user(s, "ada")
    assert (pi.role, pi.lab_name, ada.role) == ("pi", "physics", "member")

    by_user = reports.usage_by(s, admin, period, "user").set_index("user")
    assert set(by_user.index) == {"ada", "carl", "pia"}
    # 4 CPUs x 1 PCU + 8 GiB x 0.1 = 4.8 PCU/h for 2 h
    assert by_user.loc["ada", "pcu"] == pytest.approx(9.6)
    assert by_user.loc["ada", "core_hours"] == pytest.approx(8)
    assert by_user.loc["carl", "gpu_hours"] == pytest.approx(1)

    assert set(reports.usage_by(s, pi, period, "user")["user"]) == {"ada", "pia"}
    assert list(reports.usage_by(s, ada, period, "user")["user"]) == ["ada"]
    assert set(reports.balances(s, pi, )["lab"]) == {"physics"}
    assert set(reports.balances(s, admin)["lab"]) == {"physics", "chemistry"}

    flows = reports.credit_flows(s, admin, period).set_index(["from_lab", "to_lab"])
    assert flows.loc[("physics", "chemistry"), "pcu"] == pytest.approx(9.6)
    assert ("physics", "physics") not in flows.index  # self-use moves no credits
    by_gpu = reports.usage_by(s, admin, period, "gpu_class").set_index("gpu_class")
    assert by_gpu.loc["a100", "gpu_hours"] == pytest.approx(1)
    assert by_gpu.loc["CPU only", "gpu_hours"] == 0


def test_filters_change_the_figures(books):
    s, who = books
    admin = Scope("root", "admin")
    day1 = reports.Filters(DAY1.date(), DAY1.date() + dt.timedelta(days=1))
    both = reports.Filters(DAY1.date(), DAY1.date() + dt.timedelta(days=2))
    assert list(reports.usage_by(s, admin, day1, "user")["user"]) == ["ada"]
    assert len(reports.usage_by(s, admin, both, "user")) == 3
    south = reports.Filters(both.since, both.until,
                            institution_ids=(who["chemistry"].institution_id,))
    assert list(reports.usage_by(s, admin, south, "lab")["lab"]) == ["chemistry"]
    only_physics = reports.Filters(both.since, both.until, lab_ids=(who["physics"].id,))
    assert list(reports.usage_by(s, admin, only_physics, "institution")["institution"]) \
        == ["North"]

    daily = reports.contribution_vs_consumption(s, who["physics"].id, both).set_index("day")
    assert daily.loc[DAY1.date(), "charged_pcu"] == pytest.approx(9.6)
    assert daily.loc[DAY1.date() + dt.timedelta(days=1), "earned_pcu"] > 0
    assert daily.loc[DAY1.date() + dt.timedelta(days=1), "own_machine_pcu"] > 0
    assert reports.savings(s, admin, both)["cloud_cost"] == 0  # no reference table given


def test_machines_of_a_lab_and_its_outlook(books):
    s, who = books
    period = reports.Filters(DAY1.date(), DAY1.date() + dt.timedelta(days=3))
    served = reports.served_by_machines(s, who["physics"].id, period).set_index("machine")
    # m-phys served carl (1 h, 2 CPUs + 4 GiB + an A100 = 10.4 PCU) and pia (free, 1.2 PCU).
    assert served.loc["m-phys", "pcu"] == pytest.approx(10.4 + 1.2)
    assert served.loc["m-phys", "earned_pcu"] == pytest.approx(10.4)
    outlook = reports.balance_outlook(s, who["physics"].id)
    assert outlook["lab"] == "physics" and outlook["credit_limit"] == 0
    assert outlook["balance"] == pytest.approx(100 - 9.6 + 10.4)


def test_fair_share_position_names_other_labs_for_admins_only(books):
    s, who = books
    from accounting.models import utcnow
    from federation.broker.models import ClusterRecord, Lease

    # chemistry has a worker waiting; physics (the PI's lab) none.
    s.add(ClusterRecord(id="c1", user_id=who["carl"].id, lab_id=who["chemistry"].id,
                        scheduler_address="tls://x:1", ca_cert="-"))
    s.add(Lease(id="ls-wait", cluster_id="c1", cpus=1, memory=GiB, created_at=utcnow()))
    s.commit()
    hidden = reports.fair_share_position(s, who["physics"].id, 7 * 86400)
    assert set(hidden["lab"]) == {"physics", "another lab"}
    assert hidden.set_index("lab").loc["another lab", "waiting_workers"] == 1
    shown = reports.fair_share_position(s, who["physics"].id, 7 * 86400, reveal_names=True)
    assert set(shown["lab"]) == {"physics", "chemistry"}


def test_the_dashboards_and_the_api_read_one_scope(books):
    """The role comes from the lab membership for both; a name the federation does not know
    (e.g. a JupyterHub administrator with no lab) reads nothing."""
    from accounting.models import Membership
    from federation.broker.access import scope_of
    from federation.broker.auth import Principal, TokenKind

    s, who = books
    assert scope_of_user(s, "pia").role == "pi"
    assert scope_of_user(s, "ada").role == "member"
    assert scope_of_user(s, "ada").user_id == who["ada"].id
    assert scope_of_user(s, "hub-admin-without-a-lab") is None
    member = s.get(Membership, (who["carl"].id, who["chemistry"].id))
    member.role = Role.admin
    s.add(member)
    s.commit()
    assert scope_of_user(s, "carl").is_admin
    token = Principal(kind=TokenKind.admin, token_id="tok_admin", lab_id=None, lab_name=None,
                      user_id=None, user_name=None)
    assert scope_of(token).is_admin and scope_of(token).is_pi


def test_the_fair_share_order_is_the_brokers(books):
    """The dashboard's order is fair_order's: a lab that used less for its share comes
    first, whatever the order the labs were made in."""
    s, who = books
    from accounting import fairshare
    from accounting.models import utcnow
    from federation.broker.models import ClusterRecord, Lease

    for lab, user in (("chemistry", "carl"), ("physics", "ada")):
        s.add(ClusterRecord(id=f"c-{lab}", user_id=who[user].id, lab_id=who[lab].id,
                            scheduler_address="tls://x:1", ca_cert="-"))
        s.add(Lease(id=f"ls-{lab}", cluster_id=f"c-{lab}", cpus=1, memory=GiB,
                    created_at=utcnow()))
    s.commit()
    df = reports.fair_share_position(s, who["physics"].id, 7 * 86400, reveal_names=True)
    usage = fairshare.usage_now(s, "lab", [who["physics"].id, who["chemistry"].id], utcnow(),
                                7 * 86400)
    # Equal shares: the lab that used less recently is served first.
    expected = sorted(["physics", "chemistry"], key=lambda n: usage[who[n].id])
    assert list(df["lab"]) == expected
    assert list(df["served"]) == [1, 2]
    assert usage[who["physics"].id] != usage[who["chemistry"].id]


@pytest.fixture
def pool(db_url):
    """physics (pia PI) and chemistry (carl) on SQLite or PostgreSQL, with no usage yet."""
    engine = db.make_engine(db_url)
    with db.session(engine) as s:
        physics = create_lab(s, name="physics")
        chemistry = create_lab(s, name="chemistry")
        pia = create_user(s, name="pia", lab=physics, role=Role.pi)
        carl = create_user(s, name="carl", lab=chemistry)
        s.commit()
        yield s, {"pia": pia, "carl": carl, "physics": physics, "chemistry": chemistry}
    engine.dispose()


def test_capacity_is_each_steps_mean_in_at_most_so_many_points(pool):
    """Two days of a sample a minute (2,880 a lab) are drawn as 720 steps of 4 minutes, each
    the mean of its samples; a lab that sampled only on the first day has only those steps."""
    s, who = pool
    rows = []
    for minute in range(2 * 1440):
        at = DAY1 + dt.timedelta(minutes=minute, seconds=7)
        rows.append(CapacitySample(at=at, lab_id=who["physics"].id, providers_online=2,
                                   cpus_online=16, cpus_leased=minute % 10,
                                   gpus_online=2, gpus_leased=minute % 3))
        if minute < 1440:
            rows.append(CapacitySample(at=at, lab_id=who["chemistry"].id, providers_online=1,
                                       cpus_online=8 + minute % 2, cpus_leased=0))
    s.add_all(rows)
    s.commit()
    period = reports.Filters(DAY1.date(), DAY1.date() + dt.timedelta(days=2))
    df = reports.capacity(s, Scope("root", "admin"), period)
    assert len(df) == reports.CAPACITY_POINTS + reports.CAPACITY_POINTS // 2
    physics = df[df.lab == "physics"].reset_index(drop=True)
    assert len(physics) == reports.CAPACITY_POINTS
    step = dt.timedelta(minutes=4)
    assert list(physics["at"].iloc[:2]) == [DAY1, DAY1 + step]
    for k in (0, 1, 357, 719):
        minutes = range(4 * k, 4 * k + 4)
        assert physics.loc[k, "cpus_leased"] == pytest.approx(sum(m % 10 for m in minutes) / 4)
        assert physics.loc[k, "gpus_leased"] == pytest.approx(sum(m % 3 for m in minutes) / 4)
        assert physics.loc[k, "cpus_idle"] == pytest.approx(16 - physics.loc[k, "cpus_leased"])
    chemistry = df[df.lab == "chemistry"]
    assert chemistry["at"].max() == DAY1 + dt.timedelta(days=1) - step
    assert set(chemistry["cpus_online"]) == {8.5}
    # A PI sees their lab's capacity only; one day is drawn in steps of 2 minutes.
    one_day = reports.Filters(DAY1.date(), DAY1.date() + dt.timedelta(days=1))
    pi = reports.capacity(s, scope_of_user(s, "pia"), one_day)
    assert set(pi["lab"]) == {"physics"} and len(pi) == 720
    assert pi["cpus_leased"].iloc[0] == pytest.approx(0.5)


def test_wait_times_per_lab_in_the_period_and_scope(pool):
    s, who = pool
    asked = DAY1 + dt.timedelta(hours=3)
    waits = {"physics": [1.5, 2.0, 4.0, 30.25], "chemistry": [0.5, 7.0]}
    for lab, user in (("physics", "pia"), ("chemistry", "carl")):
        s.add(ClusterRecord(id=f"cl-{lab}", user_id=who[user].id, lab_id=who[lab].id,
                            scheduler_address="tls://127.0.0.1:1", ca_cert="x"))
        s.flush()
        for i, wait in enumerate(waits[lab]):
            s.add(Lease(id=f"ls-{lab}-{i}", cluster_id=f"cl-{lab}", cpus=1, memory=GiB,
                        state=LeaseState.running, created_at=asked,
                        started_at=asked + dt.timedelta(seconds=wait)))
        # Not counted: a lease still waiting, and one asked for before the period.
        s.add(Lease(id=f"ls-{lab}-pending", cluster_id=f"cl-{lab}", cpus=1, memory=GiB,
                    created_at=asked))
        s.add(Lease(id=f"ls-{lab}-old", cluster_id=f"cl-{lab}", cpus=1, memory=GiB,
                    state=LeaseState.running, created_at=DAY1 - dt.timedelta(hours=1),
                    started_at=DAY1 + dt.timedelta(hours=1)))
    s.commit()
    period = reports.Filters(DAY1.date(), DAY1.date() + dt.timedelta(days=1))
    table = reports.wait_times(s, Scope("root", "admin"), period).set_index("lab")
    assert set(table.index) == {"physics", "chemistry"}
    assert table.loc["physics", "leases"] == 4
    # To a millisecond: SQLite subtracts Julian days, good to ~40 microseconds.
    ms = {"abs": 1e-3}
    assert table.loc["physics", "mean_wait_s"] == pytest.approx(37.75 / 4, **ms)
    assert table.loc["physics", "max_wait_s"] == pytest.approx(30.25, **ms)
    assert table.loc["physics", "p90_wait_s"] == pytest.approx(4.0 + 0.7 * 26.25, **ms)
    assert table.loc["chemistry", "mean_wait_s"] == pytest.approx(3.75, **ms)
    assert list(reports.wait_times(s, scope_of_user(s, "pia"), period)["lab"]) == ["physics"]
    later = reports.Filters(DAY1.date() + dt.timedelta(days=1),
                            DAY1.date() + dt.timedelta(days=2))
    assert reports.wait_times(s, Scope("root", "admin"), later).empty


def test_my_clusters_are_the_viewers_own_made_in_the_period(pool):
    s, who = pool
    made = {"before": DAY1 - dt.timedelta(hours=2), "first": DAY1 + dt.timedelta(hours=1),
            "second": DAY1 + dt.timedelta(hours=5), "after": DAY1 + dt.timedelta(days=1)}
    for name, at in made.items():
        s.add(ClusterRecord(id=f"cl-{name}", name=name, user_id=who["pia"].id,
                            lab_id=who["physics"].id, scheduler_address="tls://127.0.0.1:1",
                            ca_cert="x", created_at=at))
    s.add(ClusterRecord(id="cl-carl", name="carl's", user_id=who["carl"].id,
                        lab_id=who["chemistry"].id, scheduler_address="tls://127.0.0.1:1",
                        ca_cert="x", created_at=DAY1 + dt.timedelta(hours=3)))
    s.flush()
    for i in range(3):
        s.add(Lease(id=f"ls-second-{i}", cluster_id="cl-second", cpus=1, memory=GiB))
    s.commit()
    period = reports.Filters(DAY1.date(), DAY1.date() + dt.timedelta(days=1))
    mine = reports.my_clusters(s, scope_of_user(s, "pia"), period)
    assert list(mine["name"]) == ["second", "first"]  # newest first
    assert list(mine["leases"]) == [3, 0]
    assert list(reports.my_clusters(s, scope_of_user(s, "carl"), period)["name"]) == ["carl's"]
