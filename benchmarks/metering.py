"""metering: one metering pass over 10,000 running leases on SQLite (target under 1 s), and
balance: reading a lab's balance with 1,000,000 ledger entries in the database (target 5 ms).

Run: python -m benchmarks.metering [--leases 10000] [--entries 1000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert

from accounting.ledger import LedgerEntry, Transfer, TransferKind, balance, lab_account
from accounting.metering import LeaseUsage, meter
from accounting.models import create_lab, create_user
from accounting.pricing import Resources, ensure_default_price
from benchmarks.common import summary, table, write
from federation.broker import db

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def metering_pass(tmp: Path, leases: int) -> float:
    engine = db.make_engine(f"sqlite:///{tmp / 'meter.db'}")
    with db.session(engine) as s:
        labs = [create_lab(s, name=f"lab{i}") for i in range(20)]
        users = [create_user(s, name=f"user{i}", lab=labs[i % 20]) for i in range(200)]
        ensure_default_price(s)
        s.commit()
        usages = [LeaseUsage(f"ls-{i:06d}", users[i % 200].id, users[i % 200].lab_id,
                             labs[(i + 1) % 20].id, f"prv-{i % 500}", T0, None,
                             Resources(1 + i % 4, 2**31, i % 2, "NVIDIA A100" if i % 2 else None))
                  for i in range(leases)]
        start = time.perf_counter()
        records = meter(s, usages, now=T0 + dt.timedelta(seconds=61), interval=60)
        s.commit()
        elapsed = time.perf_counter() - start
        assert len(records) == leases
    engine.dispose()
    return elapsed


def balance_reads(tmp: Path, entries: int, reads: int = 200) -> list[float]:
    engine = db.make_engine(f"sqlite:///{tmp / 'balance.db'}")
    with db.session(engine) as s:
        lab = create_lab(s, name="big")
        other = create_lab(s, name="other")
        a, b = lab_account(s, lab).id, lab_account(s, other).id
        s.commit()
        batch = 50_000
        for start in range(0, entries // 2, batch):
            n = min(batch, entries // 2 - start)
            s.execute(insert(Transfer), [{"kind": TransferKind.adjustment, "memo": "",
                                          "created_at": T0}] * n)
            first = s.exec(Transfer.__table__.select().order_by(
                Transfer.__table__.c.id.desc()).limit(1)).first()[0] - n + 1
            rows = []
            for t in range(first, first + n):
                rows += [{"transfer_id": t, "account_id": a, "amount": -1, "created_at": T0},
                         {"transfer_id": t, "account_id": b, "amount": 1, "created_at": T0}]
            s.execute(insert(LedgerEntry), rows)
        s.commit()
    times = []
    with db.session(engine) as s:
        for _ in range(reads):
            start = time.perf_counter()
            balance(s, a)
            times.append(time.perf_counter() - start)
    engine.dispose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leases", type=int, default=10_000, help="Running leases (10000).")
    parser.add_argument("--entries", type=int, default=1_000_000,
                        help="Ledger entries in the database (1000000).")
    parser.add_argument("--repeat", type=int, default=3, help="Metering passes (3).")
    args = parser.parse_args()
    passes = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            passes.append(metering_pass(Path(tmp), args.leases))
    with tempfile.TemporaryDirectory() as tmp:
        reads = balance_reads(Path(tmp), args.entries)
    ms = summary(passes)
    bs = summary([t * 1000 for t in reads])
    print(table([("benchmark", "median", "min", "max", "target"),
                 (f"metering pass, {args.leases:,} running leases", f"{ms['median']:.3f} s",
                  f"{ms['min']:.3f} s", f"{ms['max']:.3f} s", "< 1 s"),
                 (f"balance read, {args.entries:,} ledger entries",
                  f"{bs['median']:.3f} ms", f"{bs['min']:.3f} ms", f"{bs['max']:.3f} ms",
                  "< 5 ms")]))
    print(f"wrote {write('metering', {'leases': args.leases, 'pass_s': ms})}")
    p95 = statistics.quantiles(bs["samples"], n=20)[-1]
    print(f"wrote {write('balance', {'entries': args.entries, 'read_ms': bs, 'p95_ms': p95})}")


if __name__ == "__main__":
    main()
