"""dashboard: first server-side render of the administrators' overview with 1,000,000 usage
records across 50 labs (target under 2 s), against a peer that loads the period's usage
records into pandas and aggregates them there, as a dashboard without rollups would.

Run: python -m benchmarks.dashboard [--records 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import pandas as pd
from bokeh.document import Document
from sqlalchemy import func, insert
from sqlmodel import select

from accounting.ledger import grant
from accounting.metering import UsageRecord
from accounting.models import create_lab, create_user, utcnow
from accounting.pricing import PriceVersion, ensure_default_price
from accounting.rollups import add_to_rollups
from accounting.units import to_nano
from benchmarks.common import quiet_logging, report, summary
from dashboard import reports
from dashboard.app import Dashboard
from federation.broker import db

LABS, USERS_PER_LAB, DAYS = 50, 10, 30


def build(path: Path, records: int) -> object:
    engine = db.make_engine(f"sqlite:///{path}")
    rng = random.Random(7)
    with db.session(engine) as s:
        ensure_default_price(s)
        labs = [create_lab(s, name=f"lab{i:02d}", institution=f"uni{i % 5}")
                for i in range(LABS)]
        users = [create_user(s, name=f"user{i:03d}", lab=labs[i % LABS])
                 for i in range(LABS * USERS_PER_LAB)]
        for lab in labs:
            grant(s, lab=lab, amount=to_nano(1000))
        s.commit()
        price_id = s.exec(select(func.min(PriceVersion.id))).one()
        end = utcnow().replace(minute=0, second=0, microsecond=0)
        # Leases as metering writes them: consecutive one-minute periods, 1 to 8 hours long,
        # started at random times of the last 30 days by random users on random machines.
        batch, written, lease = [], 0, 0
        while written < records:
            user = users[rng.randrange(len(users))]
            provider_lab = labs[rng.randrange(LABS)].id
            periods = min(rng.randrange(60, 481), records - written)
            start = end - dt.timedelta(minutes=rng.randrange(periods, DAYS * 24 * 60))
            gpus = 1 if lease % 7 == 0 else 0
            charge = to_nano((1.1 + 8 * gpus) / 60)
            for k in range(periods):
                period_end = start + dt.timedelta(minutes=k + 1)
                batch.append({
                    "lease_id": f"ls-{lease:07d}", "period_start": period_end - dt.timedelta(
                        minutes=1), "period_end": period_end, "seconds": 60.0, "cpus": 1.0,
                    "memory": 2**30, "gpus": gpus, "gpu_model": "A100" if gpus else None,
                    "gpu_class": "a100" if gpus else None, "pcu_per_hour": 1.1 + 8 * gpus,
                    "charge": charge, "earned": charge, "cloud_cost": 0.04 + 4.1 * gpus / 60,
                    "consumer_lab_id": user.lab_id, "provider_lab_id": provider_lab,
                    "provider_id": f"prv-{provider_lab}", "user_id": user.id,
                    "self_use": provider_lab == user.lab_id, "reliability": 1.0,
                    "price_version_id": price_id, "transfer_id": None})
            written += periods
            lease += 1
            if len(batch) >= 50_000:
                s.connection().execute(insert(UsageRecord.__table__), batch)
                add_to_rollups(s, batch)
                s.commit()
                batch = []
        if batch:
            s.connection().execute(insert(UsageRecord.__table__), batch)
            add_to_rollups(s, batch)
            s.commit()
    return engine


def render_overview(engine) -> float:
    start = time.perf_counter()
    dashboard = Dashboard(partial(db.session, engine), reports.Viewer("admin", "admin"))
    dashboard.panel().get_root(Document())  # renders the active tab: the overview
    return time.perf_counter() - start


def pandas_peer(engine) -> float:
    start = time.perf_counter()
    since = utcnow() - dt.timedelta(days=DAYS)
    with engine.connect() as conn:
        df = pd.read_sql(
            "SELECT period_end, consumer_lab_id, provider_lab_id, user_id, gpu_class, charge, "
            "cpus, gpus, seconds, cloud_cost FROM usagerecord WHERE period_end >= ?", conn,
            params=(since.replace(tzinfo=None).isoformat(sep=" "),))
    df["day"] = pd.to_datetime(df["period_end"]).dt.date
    df.groupby(["day", "consumer_lab_id"])["charge"].sum()
    df.groupby(["consumer_lab_id", "provider_lab_id"])["charge"].sum()
    df["charge"].sum(), df["cloud_cost"].sum()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    quiet_logging()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine = build(Path(tmp) / "dash.db", args.records)
        with engine.connect() as conn:
            rolled = conn.exec_driver_sql("SELECT COUNT(*) FROM usagedaily").scalar()
        print(f"built {args.records:,} usage records ({rolled:,} daily rollup rows) in "
              f"{time.perf_counter() - t0:.0f} s")
        ours, peer = [], []
        for _ in range(args.repeat):
            ours.append(render_overview(engine))
            peer.append(pandas_peer(engine))
        engine.dispose()
    o, p = summary(ours), summary(peer)
    report("dashboard", [("admin overview from rollups (SQL), rendered", o),
                         ("period's records into pandas, aggregated only", p)], "s", ".3f",
           o["median"] / p["median"], "overview < 2 s", {"overview_s": o, "pandas_s": p,
                                                          "records": args.records})


if __name__ == "__main__":
    main()
