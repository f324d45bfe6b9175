"""Schema migrations: the revisions build exactly the models' schema, on SQLite and PostgreSQL,
databases from before migrations are adopted with their rows, and a downgrade undoes it all."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from federation.broker import db


def schema_differences(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, SQLModel.metadata)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("postgres_url")


def test_migrations_build_the_models_schema(empty_db_url):
    engine = db.make_engine(empty_db_url)
    assert db.current_revision(engine) == db.head_revision()
    # A model changed without a new revision shows up here.
    assert schema_differences(engine) == []


def test_downgrade_to_nothing_and_back(empty_db_url):
    engine = db.make_engine(empty_db_url)
    db.migrate(engine, "base", downgrade=True)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    db.migrate(engine)
    assert schema_differences(engine) == []


def test_pre_migration_database_is_adopted_with_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.plain_engine(url)
    # What an earlier build left behind: the baseline schema and rows, but no alembic_version.
    db.migrate(engine, db.BASELINE_REVISION)
    with engine.begin() as conn:
        # Raw SQL: today's models have columns the baseline schema lacks.
        conn.execute(text("INSERT INTO lab (name, site, share, credit_limit, created_at) "
                          "VALUES ('old-lab', '', 1.0, 0.0, '2026-01-01 00:00:00')"))
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()

    engine = db.make_engine(url)
    assert db.current_revision(engine) == db.head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM lab")).scalars().all() == ["old-lab"]
    assert schema_differences(engine) == []


def test_db_command_shows_and_applies_migrations(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"

    def parallex_db(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "federation.cli", "db", *args],
                              capture_output=True, text=True, timeout=60)

    before = parallex_db("current", "--db-url", url)
    assert before.returncode == 0 and "needs `parallex db upgrade`" in before.stdout
    up = parallex_db("upgrade", "--db-url", url)
    assert up.returncode == 0, up.stderr
    assert f"at revision {db.head_revision()} (was empty)" in up.stdout
    assert "(current)" in parallex_db("current", "--db-url", url).stdout

    unreachable = parallex_db("current", "--db-url", "postgresql://nobody@127.0.0.1:9/none")
    assert unreachable.returncode == 1
    assert "error: cannot open the database" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_upgrade_to_0002_recovers_earnings_of_earlier_usage_from_the_ledger(empty_db_url):
    engine = db.plain_engine(empty_db_url)
    db.migrate(engine, "0001")
    t = "2026-01-01 00:00:00"
    with engine.begin() as c:
        for lab_id, name in [(1, "consumer"), (2, "provider")]:
            c.execute(text("INSERT INTO lab (id, name, site, share, credit_limit, created_at) "
                           "VALUES (:i, :n, '', 1, 0, :t)"), {"i": lab_id, "n": name, "t": t})
            c.execute(text("INSERT INTO account (id, kind, name, lab_id) "
                           "VALUES (:i, 'lab', :n, :i)"), {"i": lab_id, "n": name})
        c.execute(text("INSERT INTO account (id, kind, name) VALUES (3, 'federation', 'fed')"))
        c.execute(text("INSERT INTO \"user\" (id, name, lab_id, created_at) "
                       "VALUES (1, 'u', 1, :t)"), {"t": t})
        c.execute(text("INSERT INTO priceversion (id, effective_from, w_cpu, w_mem_gib, "
                       "gpu_classes_json, default_gpu_weight, fee_fraction, created_at) "
                       "VALUES (1, :t, 1, 0, '[]', 3, 0, :t)"), {"t": t})
        c.execute(text("INSERT INTO transfer (id, kind, memo, created_at) "
                       "VALUES (1, 'usage', '', :t)"), {"t": t})
        for account, amount in [(1, -1000), (2, 700), (3, 300)]:
            c.execute(text("INSERT INTO ledgerentry (transfer_id, account_id, amount, "
                           "created_at) VALUES (1, :a, :m, :t)"),
                      {"a": account, "m": amount, "t": t})
        c.execute(text(
            "INSERT INTO usagerecord (lease_id, period_start, period_end, seconds, cpus, memory, "
            "gpus, pcu_per_hour, charge, consumer_lab_id, provider_lab_id, provider_id, "
            "user_id, self_use, reliability, price_version_id, transfer_id) VALUES "
            "('ls1', :t, :t, 60, 1, 0, 0, 1, 1000, 1, 2, 'p1', 1, false, 0.7, 1, 1)"), {"t": t})
    db.migrate(engine)
    with engine.connect() as c:
        assert c.execute(text("SELECT earned, cloud_cost FROM usagerecord")).one() == (700, 0.0)
    assert schema_differences(engine) == []


def test_0008_adds_suspensions_and_offering_and_downgrades_suspended_leases(tmp_path):
    """Upgrading keeps existing providers and leases (provider is referenced by leases: no
    table copy), and a downgrade runs suspended leases again."""
    from tests.utils.schema import insert_lab_user_cluster, insert_provider

    engine = db.plain_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(engine, "0007")
    t = "2026-01-01 00:00:00"
    with engine.begin() as c:
        insert_lab_user_cluster(c, t)
        insert_provider(c, t)
        c.execute(text("INSERT INTO lease (id, cluster_id, provider_id, \"group\", cpus, "
                       "memory, gpus, gpu_indices_json, state, message, worker_csr, "
                       "worker_cert, created_at) VALUES ('ls-1', 'c1', 'p1', 'default', 1, 1, "
                       "0, '[]', 'running', '', '', '', :t)"), {"t": t})
    db.migrate(engine)
    with engine.begin() as c:
        assert tuple(c.execute(text("SELECT offering, offer_note FROM provider")).one()) == (
            1, "")
        assert c.execute(text("SELECT suspensions_json FROM lease")).scalar() == "[]"
        c.execute(text("UPDATE lease SET state = 'suspended'"))
    db.migrate(engine, "0007", downgrade=True)
    with engine.connect() as c:
        assert c.execute(text("SELECT state FROM lease")).scalar() == "running"
        assert "offering" not in {col["name"] for col in inspect(engine).get_columns(
            "provider")}


def test_0013_drops_the_accounting_rows_foreign_keys_and_keeps_the_rows(empty_db_url):
    """Usage records and ledger entries lose their foreign keys (metering writes them in bulk),
    keep every row, and a downgrade puts the keys back (and an upgrade after it drops them)."""
    from tests.accounting.test_ledger_properties import SAME_DAY_TWICE, run_history

    run_history(empty_db_url, SAME_DAY_TWICE)  # records, entries and a daily row, at head
    engine = db.plain_engine(empty_db_url)
    tables = ("usagerecord", "ledgerentry")

    def rows() -> list[int]:
        with engine.connect() as c:
            return [c.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables]

    def keyed() -> dict[str, list[str]]:
        return {t: sorted(fk["constrained_columns"][0]
                          for fk in inspect(engine).get_foreign_keys(t)) for t in tables}

    before = rows()
    assert before[0] > 0 and before[1] > 0
    assert keyed() == {"usagerecord": [], "ledgerentry": []}
    db.migrate(engine, "0012", downgrade=True)
    assert keyed() == {"usagerecord": ["consumer_lab_id", "price_version_id", "provider_lab_id",
                                       "transfer_id", "user_id"],
                       "ledgerentry": ["account_id", "transfer_id"]}
    assert rows() == before
    db.migrate(engine)
    assert keyed() == {"usagerecord": [], "ledgerentry": []}
    assert rows() == before
    assert schema_differences(engine) == []


def test_0017_and_0018_keep_an_index_a_site_built_beforehand_and_rebuild_a_failed_one(
        postgres_url):
    """A site builds the new indexes with CREATE INDEX CONCURRENTLY while its brokers run (the
    README's schema note); the upgrade keeps a valid one and builds again one whose concurrent
    build failed (PostgreSQL leaves it invalid)."""
    import psycopg

    engine = db.plain_engine(postgres_url)
    db.migrate(engine, "0016")
    record = ("INSERT INTO usagerecord (lease_id, period_start, period_end, seconds, cpus, "
              "memory, gpus, pcu_per_hour, charge, earned, cloud_cost, consumer_lab_id, "
              "provider_lab_id, provider_id, user_id, self_use, reliability, "
              "price_version_id) VALUES (%s, '2026-01-01 00:00+00', '2026-01-01 00:01+00', "
              "60, 1, 1, 0, 1, 1, 1, 0, 1, 1, 'box', 7, false, 1, 1)")
    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute("CREATE INDEX CONCURRENTLY ix_lease_created_at ON lease (created_at)")
        # Two records of one user and period end: a unique build fails, leaving it invalid.
        for lease in ("a", "b"):
            c.execute(record, (lease,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("CREATE UNIQUE INDEX CONCURRENTLY ix_usagerecord_user_id_period_end "
                      "ON usagerecord (user_id, period_end)")

        def index(name: str) -> tuple:
            return c.execute("SELECT i.indexrelid, i.indisvalid, i.indisunique FROM pg_index "
                             "i WHERE i.indexrelid = to_regclass(%s)", (name,)).fetchone()

        lease_index = index("ix_lease_created_at")
        assert index("ix_usagerecord_user_id_period_end")[1:] == (False, True)
        db.migrate(engine)
        assert index("ix_lease_created_at") == lease_index  # kept, not built again
        assert index("ix_usagerecord_user_id_period_end")[1:] == (True, False)
    assert schema_differences(engine) == []
    engine.dispose()
