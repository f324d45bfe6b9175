"""The dashboards' figures: SQL aggregations over the daily rollups, capacity samples and the
broker's live tables, each scoped to what the viewer may see.

Nothing here loads a whole table: every query groups in the database and returns at most one
row per day and key. Results are pandas DataFrames, ready for tables, plots and CSV.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

import pandas as pd
from sqlalchemy import BigInteger, Float, and_, case, cast, func, or_
from sqlmodel import Session, col, select

from accounting.fairshare import Claim, fair_order, lab_priority, usage_now
from accounting.ledger import Account, Balance
from accounting.models import Institution, Lab, User, names_by_id, utcnow
from accounting.reliability import ProviderReliability, factor
from accounting.rollups import UsageDaily
from accounting.units import NANO
from federation.broker.access import Scope
from federation.broker.capacity import CapacitySample
from federation.broker.models import HELD_STATES, ClusterRecord, Lease, LeaseState, Provider
from federation.broker.preemption import preemption_rates


@dataclass(frozen=True)
class Filters:
    """The period (UTC days, ``until`` exclusive) and, for admins, institutions and labs."""

    since: dt.date
    until: dt.date
    lab_ids: tuple[int, ...] = ()
    institution_ids: tuple[int, ...] = field(default=())


def _table(rows, columns: list[str]) -> pd.DataFrame:
    """A frame of query result rows: each taken as a plain tuple, since pandas asks each row
    for ``_fields``, which a SQLAlchemy row answers by a failed key lookup (most of the time
    of a frame of 100,000 rows)."""
    return pd.DataFrame([tuple(r) for r in rows], columns=columns)


def _labs(session: Session) -> pd.DataFrame:
    rows = session.exec(select(Lab.id, Lab.name, Lab.institution_id, Institution.name)
                        .join(Institution, Institution.id == Lab.institution_id, isouter=True))
    return _table(rows, ["lab_id", "lab", "institution_id", "institution"]
                  ).fillna({"institution": "—"})


def lab_choices(session: Session, viewer: Scope) -> dict[str, int]:
    """Lab name → id of the labs the viewer may filter on."""
    labs = _labs(session)
    if not viewer.is_admin:
        labs = labs[labs.lab_id == viewer.lab_id]
    return dict(zip(labs.lab, labs.lab_id, strict=True))


def institution_choices(session: Session) -> dict[str, int]:
    return dict(session.exec(select(Institution.name, Institution.id)).all())


def _scoped(query, viewer: Scope, filters: Filters, side: str = "consumer"):
    """Restrict a UsageDaily query to the period, the filters and what the viewer may see."""
    lab_col = UsageDaily.consumer_lab_id if side == "consumer" else UsageDaily.provider_lab_id
    query = query.where(UsageDaily.day >= filters.since, UsageDaily.day < filters.until)
    if viewer.role == "member":
        query = query.where(UsageDaily.user_id == viewer.user_id)
    elif viewer.role == "pi":
        query = query.where(lab_col == viewer.lab_id)
    else:
        if filters.lab_ids:
            query = query.where(col(lab_col).in_(filters.lab_ids))
        if filters.institution_ids:
            query = query.where(col(lab_col).in_(
                select(Lab.id).where(col(Lab.institution_id).in_(filters.institution_ids))))
    return query


_MEASURES = (func.sum(UsageDaily.charge), func.sum(UsageDaily.cpu_seconds),
             func.sum(UsageDaily.gpu_seconds), func.sum(UsageDaily.cloud_cost),
             func.sum(UsageDaily.earned))
_MEASURE_NAMES = ["pcu", "core_hours", "gpu_hours", "cloud_cost", "earned_pcu"]


def _frame(rows, keys: list[str]) -> pd.DataFrame:
    df = _table(rows, keys + _MEASURE_NAMES)
    if df.empty:
        return df
    df["pcu"] = df["pcu"].astype(float) / NANO
    df["earned_pcu"] = df["earned_pcu"].astype(float) / NANO
    df["core_hours"] = df["core_hours"].astype(float) / 3600
    df["gpu_hours"] = df["gpu_hours"].astype(float) / 3600
    return df


def usage_by(session: Session, viewer: Scope, filters: Filters, by: str) -> pd.DataFrame:
    """PCU (all use, own machines included), core-hours, GPU-hours, cloud cost and what the
    providers earned, per institution, lab, user, GPU class or provider machine."""
    key = {"lab": UsageDaily.consumer_lab_id, "institution": UsageDaily.consumer_lab_id,
           "user": UsageDaily.user_id, "gpu_class": UsageDaily.gpu_class,
           "provider": UsageDaily.provider_id}[by]
    df = _frame(session.exec(_scoped(select(key, *_MEASURES).group_by(key), viewer, filters)),
                ["key"])
    if df.empty:
        return pd.DataFrame(columns=[by] + _MEASURE_NAMES)
    if by in ("lab", "institution"):
        labs = _labs(session).set_index("lab_id")
        df[by] = df["key"].map(labs["lab" if by == "lab" else "institution"])
    elif by == "user":
        df[by] = df["key"].map(names_by_id(session, User, df["key"]))
    elif by == "provider":
        names = names_by_id(session, Provider, df["key"])
        df[by] = df["key"].map(lambda k: names.get(k, k))
    else:
        df[by] = df["key"].replace("", "CPU only")
    df = df.drop(columns="key").groupby(by, as_index=False).sum(numeric_only=True)
    return df[[by] + _MEASURE_NAMES].sort_values("pcu", ascending=False, ignore_index=True)


def usage_over_time(session: Session, viewer: Scope, filters: Filters) -> pd.DataFrame:
    """PCU per day and consuming lab (for a member: their own, under their lab)."""
    q = select(UsageDaily.day, UsageDaily.consumer_lab_id, *_MEASURES).group_by(
        UsageDaily.day, UsageDaily.consumer_lab_id)
    df = _frame(session.exec(_scoped(q, viewer, filters)), ["day", "lab_id"])
    if df.empty:
        return pd.DataFrame(columns=["day", "lab"] + _MEASURE_NAMES)
    df["lab"] = df["lab_id"].map(_labs(session).set_index("lab_id")["lab"])
    return df.drop(columns="lab_id").sort_values(["day", "lab"], ignore_index=True)


def credit_flows(session: Session, viewer: Scope, filters: Filters) -> pd.DataFrame:
    """PCU moved from consuming to providing labs (self-use excluded)."""
    q = (select(UsageDaily.consumer_lab_id, UsageDaily.provider_lab_id,
                func.sum(UsageDaily.charge), func.sum(UsageDaily.earned))
         .where(UsageDaily.self_use == False)  # noqa: E712
         .group_by(UsageDaily.consumer_lab_id, UsageDaily.provider_lab_id))
    rows = list(session.exec(_scoped(q, viewer, filters)))
    labs = _labs(session).set_index("lab_id")["lab"]
    df = _table(rows, ["from_lab", "to_lab", "pcu", "earned_pcu"])
    if df.empty:
        return df
    df["from_lab"], df["to_lab"] = df["from_lab"].map(labs), df["to_lab"].map(labs)
    df["pcu"] = df["pcu"].astype(float) / NANO
    df["earned_pcu"] = df["earned_pcu"].astype(float) / NANO
    return df.sort_values("pcu", ascending=False, ignore_index=True)


def balances(session: Session, viewer: Scope) -> pd.DataFrame:
    """Each visible lab's balance, credit limit and how close it is to the limit."""
    q = (select(Lab.name, Balance.amount, Lab.credit_limit)
         .join(Account, Account.lab_id == Lab.id).join(Balance, Balance.account_id == Account.id))
    if not viewer.is_admin:
        q = q.where(Lab.id == viewer.lab_id)
    df = _table(session.exec(q), ["lab", "balance", "credit_limit"])
    df["balance"] = df["balance"].astype(float) / NANO
    df["status"] = [("over the credit limit: new workers refused" if b < -lim else
                     "below zero, within credit" if b < 0 else
                     "low" if b < 0.1 * max(1.0, lim) + 10 else "ok")
                    for b, lim in zip(df["balance"], df["credit_limit"], strict=True)]
    return df.sort_values("balance", ignore_index=True)


#: Most points a capacity chart draws per lab: 30 days of a sample a minute are 43,200 a lab,
#: which took 6.4 s to read for 20 labs and more for the browser to draw.
CAPACITY_POINTS = 720


def _epoch_seconds(session: Session, column):
    """SQL for ``column`` (a timestamp) as whole seconds since 1970 (UTC), on either database."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", column)), BigInteger)
    return cast(func.strftime("%s", column), BigInteger)


def capacity(session: Session, viewer: Scope, filters: Filters) -> pd.DataFrame:
    """CPUs and GPUs online and leased over time, per lab (samples of the broker), as the
    mean of each lab's samples in at most ``CAPACITY_POINTS`` equal steps of the period."""
    start = dt.datetime.combine(filters.since, dt.time(), dt.UTC)
    end = dt.datetime.combine(filters.until, dt.time(), dt.UTC)
    step = max(1, math.ceil((end - start).total_seconds() / CAPACITY_POINTS))
    bucket = (_epoch_seconds(session, CapacitySample.at) // step * step).label("bucket")
    q = (select(bucket, Lab.name, func.avg(CapacitySample.cpus_online),
                func.avg(CapacitySample.cpus_leased), func.avg(CapacitySample.gpus_online),
                func.avg(CapacitySample.gpus_leased))
         .join(Lab, Lab.id == CapacitySample.lab_id)
         .where(CapacitySample.at >= start, CapacitySample.at < end)
         .group_by(bucket, Lab.name))
    if not viewer.is_admin:
        q = q.where(CapacitySample.lab_id == viewer.lab_id)
    elif filters.lab_ids:
        q = q.where(col(CapacitySample.lab_id).in_(filters.lab_ids))
    df = _table(session.exec(q.order_by(bucket, Lab.name)),
                ["at", "lab", "cpus_online", "cpus_leased", "gpus_online", "gpus_leased"])
    df["at"] = pd.to_datetime(df["at"].astype("int64"), unit="s", utc=True)
    for name in ("cpus_online", "cpus_leased", "gpus_online", "gpus_leased"):
        df[name] = df[name].astype(float)
    df["cpus_idle"] = df["cpus_online"] - df["cpus_leased"]
    return df


def live_leases(session: Session, viewer: Scope) -> pd.DataFrame:
    """Leases held or waiting now, with their cluster's user and lab and the providing lab."""
    provider_lab = Lab.__table__.alias("provider_lab")
    q = (select(Lease.id, User.name, Lab.name, provider_lab.c.name, Lease.cpus, Lease.gpus,
                Lease.state, Lease.created_at)
         .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
         .join(User, User.id == ClusterRecord.user_id)
         .join(Lab, Lab.id == ClusterRecord.lab_id)
         .join(Provider, Provider.id == Lease.provider_id, isouter=True)
         .join(provider_lab, provider_lab.c.id == Provider.lab_id, isouter=True)
         .where(col(Lease.state).in_([LeaseState.pending, *HELD_STATES])))
    if viewer.role == "member":
        q = q.where(ClusterRecord.user_id == viewer.user_id)
    elif viewer.role == "pi":
        q = q.where(ClusterRecord.lab_id == viewer.lab_id)
    df = _table(session.exec(q.order_by(Lease.created_at)),
                ["lease", "user", "lab", "provider_lab", "cpus", "gpus", "state", "since"])
    df["state"] = df["state"].map(lambda s: getattr(s, "value", s))
    return df


def my_clusters(session: Session, viewer: Scope, filters: Filters) -> pd.DataFrame:
    """A viewer's own clusters in the period, with how many leases each had."""
    start = dt.datetime.combine(filters.since, dt.time(), dt.UTC)
    end = dt.datetime.combine(filters.until, dt.time(), dt.UTC)
    q = (select(ClusterRecord.id, ClusterRecord.name, ClusterRecord.active,
                ClusterRecord.created_at, ClusterRecord.closed_at, func.count(Lease.id))
         .join(Lease, Lease.cluster_id == ClusterRecord.id, isouter=True)
         .where(ClusterRecord.user_id == viewer.user_id, ClusterRecord.created_at >= start,
                ClusterRecord.created_at < end)
         .group_by(ClusterRecord.id))
    return _table(session.exec(q.order_by(col(ClusterRecord.created_at).desc())),
                  ["cluster", "name", "active", "created", "closed", "leases"])


def _seconds_between(session: Session, start, end):
    """SQL for the seconds from ``start`` to ``end`` (timestamp columns), on either database."""
    if session.get_bind().dialect.name == "postgresql":
        # As a double: EXTRACT gives numeric, which the driver turns into a Decimal a row.
        return cast(func.extract("epoch", end - start), Float)
    # Julian days: good to ~40 microseconds, plenty for a wait.
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def wait_times(session: Session, viewer: Scope, filters: Filters) -> pd.DataFrame:
    """Seconds from asking for a worker to its start, per consuming lab: mean, max, count."""
    start = dt.datetime.combine(filters.since, dt.time(), dt.UTC)
    end = dt.datetime.combine(filters.until, dt.time(), dt.UTC)
    # The database subtracts: a month of a busy federation is ~100,000 started leases, and
    # two timestamps a lease turned into Python and pandas datetimes were most of the view's
    # time (0.78 s for 82,000; a float a lease, 0.2 s).
    q = (select(ClusterRecord.lab_id, _seconds_between(session, Lease.created_at,
                                                       Lease.started_at))
         .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
         .where(Lease.started_at != None, Lease.created_at >= start,  # noqa: E711
                Lease.created_at < end))
    if viewer.role == "member":
        q = q.where(ClusterRecord.user_id == viewer.user_id)
    elif viewer.role == "pi":
        q = q.where(ClusterRecord.lab_id == viewer.lab_id)
    df = _table(session.exec(q), ["lab_id", "wait"])
    if df.empty:
        return pd.DataFrame(columns=["lab", "leases", "mean_wait_s", "p90_wait_s", "max_wait_s"])
    waits = df.astype({"wait": float}).groupby("lab_id")["wait"]
    out = pd.DataFrame({"leases": waits.count(), "mean_wait_s": waits.mean(),
                        "p90_wait_s": waits.quantile(0.9),
                        "max_wait_s": waits.max()}).reset_index()
    out["lab"] = out["lab_id"].map(_labs(session).set_index("lab_id")["lab"])
    return out[["lab", "leases", "mean_wait_s", "p90_wait_s", "max_wait_s"]]


def provider_reliability(session: Session, viewer: Scope) -> pd.DataFrame:
    """Each visible machine: its lab, whether online and offered (its owner policy may keep
    it for its owner), reliability, lost and failed leases, and how often its owner took it
    back (preemption rate over 7 days)."""
    q = (select(Provider.id, Provider.name, Lab.name, Provider.online, Provider.offering,
                Provider.cpus,
                ProviderReliability.penalty, ProviderReliability.lost_leases,
                ProviderReliability.failed_leases)
         .join(Lab, Lab.id == Provider.lab_id)
         .join(ProviderReliability, ProviderReliability.provider_id == Provider.id,
               isouter=True))
    if not viewer.is_admin:
        q = q.where(Provider.lab_id == viewer.lab_id)
    df = _table(session.exec(q), ["id", "machine", "lab", "online", "offered", "cpus",
                                  "penalty", "lost", "failed"])
    df[["penalty", "lost", "failed"]] = df[["penalty", "lost", "failed"]].fillna(0)
    df["reliability"] = df["penalty"].map(factor).round(4)
    rates = preemption_rates(session, list(df["id"]))
    df["preempted_share"] = df["id"].map(lambda p: round(rates.get(p, 0.0), 4))
    return df.drop(columns=["penalty", "id"]).sort_values("reliability", ignore_index=True)


def contribution_vs_consumption(session: Session, lab_id: int,
                                filters: Filters) -> pd.DataFrame:
    """Per day: what the lab's machines earned from others, what its members were charged by
    others, and their own-machine use (free)."""
    def when(condition, value):
        return func.sum(case((condition, value), else_=0))

    others = UsageDaily.self_use == False  # noqa: E712
    rows = session.exec(
        select(UsageDaily.day,
               when(and_(UsageDaily.provider_lab_id == lab_id, others), UsageDaily.earned),
               when(and_(UsageDaily.consumer_lab_id == lab_id, others), UsageDaily.charge),
               when(and_(UsageDaily.consumer_lab_id == lab_id, ~others), UsageDaily.charge))
        .where(or_(UsageDaily.provider_lab_id == lab_id, UsageDaily.consumer_lab_id == lab_id),
               UsageDaily.day >= filters.since, UsageDaily.day < filters.until)
        .group_by(UsageDaily.day).order_by(UsageDaily.day)).all()
    return pd.DataFrame({"day": [r[0] for r in rows],
                         "earned_pcu": [(r[1] or 0) / NANO for r in rows],
                         "charged_pcu": [(r[2] or 0) / NANO for r in rows],
                         "own_machine_pcu": [(r[3] or 0) / NANO for r in rows]})


def served_by_machines(session: Session, lab_id: int, filters: Filters) -> pd.DataFrame:
    """What each of the lab's machines served (to anyone, own lab included) in the period."""
    q = (select(UsageDaily.provider_id, *_MEASURES)
         .where(UsageDaily.provider_lab_id == lab_id, UsageDaily.day >= filters.since,
                UsageDaily.day < filters.until)
         .group_by(UsageDaily.provider_id))
    df = _frame(session.exec(q), ["machine"])
    if df.empty:
        return pd.DataFrame(columns=["machine"] + _MEASURE_NAMES)
    names = names_by_id(session, Provider, df["machine"])
    df["machine"] = df["machine"].map(lambda k: names.get(k, k))
    return df.sort_values("pcu", ascending=False, ignore_index=True)


def balance_outlook(session: Session, lab_id: int, days: int = 7) -> dict:
    """The lab's balance and where it is heading at the net rate of the last ``days`` days."""
    lab = session.get(Lab, lab_id)
    today = utcnow().date()
    window = contribution_vs_consumption(
        session, lab_id, Filters(today - dt.timedelta(days=days - 1),
                                 today + dt.timedelta(days=1)))
    net_per_day = float((window["earned_pcu"] - window["charged_pcu"]).sum()) / days
    account = session.exec(select(Account).where(Account.lab_id == lab_id)).first()
    bal = (session.get(Balance, account.id).amount / NANO) if account else 0.0
    days_to_limit = None
    if net_per_day < 0:
        days_to_limit = max(0.0, (bal + lab.credit_limit) / -net_per_day)
    return {"lab": lab.name, "balance": bal, "credit_limit": lab.credit_limit,
            "net_pcu_per_day": net_per_day, "days_until_limit": days_to_limit}


def fair_share_position(session: Session, lab_id: int, half_life: float,
                        reveal_names: bool = False) -> pd.DataFrame:
    """Labs with waiting workers, in the order fair share serves them (the broker's own
    ``fair_order``), and this lab's place ("why are my members waiting"). Other labs are
    named only when ``reveal_names`` (administrators)."""
    now = utcnow()
    pending = dict(session.exec(
        select(ClusterRecord.lab_id, func.count(Lease.id))
        .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
        .where(Lease.state == LeaseState.pending).group_by(ClusterRecord.lab_id)).all())
    labs = {lab.id: lab for lab in session.exec(select(Lab))}
    keys = set(pending) | {lab_id}
    usage = usage_now(session, "lab", keys, now, half_life)
    shares = {k: labs[k].share for k in keys}
    # One claim per lab, all equally old: the order is then the labs' order alone.
    claims = [Claim(str(k), k, 0, now) for k in keys]
    ordered = [c.lab for c in fair_order(claims, shares, usage, {})]
    rows = [{"served": i, "lab": labs[k].name if reveal_names or k == lab_id else "another lab",
             "share": labs[k].share, "recent_pcu": round(usage[k], 4),
             "priority": lab_priority(labs[k].share, usage[k]),
             "waiting_workers": pending.get(k, 0), "you": k == lab_id}
            for i, k in enumerate(ordered, start=1)]
    return pd.DataFrame(rows)


def savings(session: Session, viewer: Scope, filters: Filters) -> dict:
    """Total PCU used and what the same resources would have cost in the cloud."""
    row = session.exec(_scoped(select(func.sum(UsageDaily.charge),
                                      func.sum(UsageDaily.cloud_cost)), viewer, filters)).one()
    return {"pcu": float(row[0] or 0) / NANO, "cloud_cost": float(row[1] or 0)}

