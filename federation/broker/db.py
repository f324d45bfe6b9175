"""Database engine and schema migrations: SQLite file by default, PostgreSQL URLs accepted.

The schema is owned by the Alembic revisions in ``migrations/versions``; every engine the
project opens is brought to the newest revision first, so a broker upgrade migrates its
database on start.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError
from sqlmodel import Session, create_engine

import accounting.fairshare  # noqa: F401  (registers the decayed-usage table)
import accounting.ledger  # noqa: F401  (registers the ledger tables)
import accounting.metering  # noqa: F401  (registers the usage table)
import accounting.models  # noqa: F401  (registers the identity tables)
import accounting.pricing  # noqa: F401  (registers the price table)
import accounting.reliability  # noqa: F401  (registers the provider standing table)
import accounting.retention  # noqa: F401  (registers the pruning tables)
import accounting.rollups  # noqa: F401  (registers the daily usage table)

from . import capacity, models  # noqa: F401  (registers the broker tables)

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
# Databases created before migrations existed hold exactly this revision's schema.
BASELINE_REVISION = "0001"
# Any constant works; it only has to be the same in every process that migrates.
_PG_MIGRATION_LOCK = 0x5041524C


def normalise_url(url: str) -> str:
    """Map plain postgresql:// URLs onto the psycopg 3 driver we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def default_url() -> str:
    """PARALLEX_DB_URL, else the SQLite file the broker uses by default."""
    home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "parallex"
    return os.environ.get("PARALLEX_DB_URL") or f"sqlite:///{home / 'broker.db'}"


#: Seconds a pooled PostgreSQL connection may sit unused before it is checked (one round
#: trip) as it is next handed out; ``BrokerSettings.db_ping_after_idle``.
PING_AFTER_IDLE = 5.0


#: Connections a broker process keeps open for its requests and passes, and how many more
#: it opens in bursts. With SQLAlchemy's default (5 kept, 10 more opened and closed again)
#: requests under load queued for a connection, and each extra one costs PostgreSQL a new
#: backend process.
REQUEST_POOL = (20, 16)
#: The same for the agents' batchers (heartbeats, reports, lease lists), which run one batch
#: at a time each: a pool of their own, so a batch never waits behind requests that hold every
#: connection of the other (issue 14's load: at start-up the request pool was 40 of 40
#: checked out for seconds, and every heartbeat over 0.5 s waited there). A replica keeps 40
#: connections at most in all: two fit PostgreSQL's default max_connections (100); more
#: replicas need it raised (README).
BATCH_POOL = (3, 1)


def plain_engine(url: str, ping_after_idle: float = PING_AFTER_IDLE,
                 pool: tuple[int, int] = REQUEST_POOL) -> Engine:
    """An engine with our connection settings, without touching the schema; ``pool``:
    connections kept open and opened in bursts (PostgreSQL; SQLite ignores it)."""
    url = normalise_url(url)
    if not url.startswith("sqlite"):
        kept, bursts = pool
        engine = create_engine(url, pool_size=kept, max_overflow=bursts)
        ping_when_idle(engine, ping_after_idle)
        return engine
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        # WAL keeps readers off the writer's back; foreign keys are off by default in SQLite.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


def ping_when_idle(engine: Engine, after: float) -> None:
    """Check a pooled connection with a round trip before handing it out, if it was unused
    for ``after`` seconds or more (0: every time); one that fails is replaced by a new one.

    SQLAlchemy's ``pool_pre_ping`` checks every checkout: on a busy broker that was a round
    trip in front of every unit of work (~5 ms each under issue 14's load), for connections
    used milliseconds before. A connection that breaks while in use (the database restarted
    under load) fails its unit of work, answered 503 (``error_responses``); SQLAlchemy then
    discards the pool's other connections, so the next unit of work gets a new one."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn, record) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_conn, record, _proxy) -> None:
        returned = record.info.get("returned_at")  # None: a new connection
        if returned is None or time.monotonic() - returned < after:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool drops this connection and hands out another (up to three tries).
            raise DisconnectionError(f"pooled connection is gone: {exc}") from exc


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for our migrations, optionally bound to ``connection``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision the code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for an empty or pre-migration database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, revision: str = "head", *, downgrade: bool = False) -> None:
    """Bring the schema up (or with ``downgrade``, down) to ``revision``.

    Safe when several processes start at once on PostgreSQL.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Held to the end of this transaction: the second process waits, then finds the
            # schema current and does nothing.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        cfg = alembic_config(conn)
        tables = inspect(conn).get_table_names()
        if "alembic_version" not in tables and "lab" in tables:
            log.info("database predates migrations; stamping it at %s", BASELINE_REVISION)
            command.stamp(cfg, BASELINE_REVISION)
        before = MigrationContext.configure(conn).get_current_revision()
        if downgrade:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
        if after != before:
            log.info("database schema migrated from %s to %s", before or "empty", after)


def make_engine(url: str, ping_after_idle: float = PING_AFTER_IDLE) -> Engine:
    """An engine over ``url`` whose schema is at the newest revision."""
    engine = plain_engine(url, ping_after_idle)
    if current_revision(engine) != head_revision():
        migrate(engine)
    return engine


def reader_engine(url: str, wait: float = 60.0) -> Engine:
    """An engine for a reader of the broker's database (the dashboards): it never migrates —
    the broker owns the schema — but waits up to ``wait`` seconds for the broker to bring a
    new or older database to the revision this code reads, then raises RuntimeError saying
    what to do."""
    import time

    engine = plain_engine(url)
    head = head_revision()
    deadline = time.monotonic() + wait
    told = False
    while (found := current_revision(engine)) != head:
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"the broker's database is at schema revision {found or 'none (empty)'}, and "
                f"this code reads revision {head}: start (or upgrade) the broker, which "
                f"migrates it (`parallex db upgrade` does it by hand), then start this again")
        if not told:
            log.info("waiting up to %g s for the broker to migrate its database to "
                        "revision %s (now %s)", wait, head, found)
            told = True
        time.sleep(0.5)
    return engine


def batch_engine(engine: Engine, ping_after_idle: float = PING_AFTER_IDLE) -> Engine:
    """An engine over ``engine``'s database with a pool of its own for the agents' batchers
    (``BATCH_POOL``); on SQLite ``engine`` itself, whose one writer gains nothing from a
    second pool. The caller disposes of it with ``engine``."""
    if engine.dialect.name == "sqlite":
        return engine
    return plain_engine(engine.url.render_as_string(hide_password=False), ping_after_idle,
                        pool=BATCH_POOL)


def session(engine: Engine) -> Session:
    """A session that keeps loaded objects usable after commit."""
    return Session(engine, expire_on_commit=False)


def autocommit(engine: Engine) -> Engine:
    """``engine`` (the same pool) with each statement a transaction of its own.

    For work whose statements need no transaction around them, on the hot path: on
    PostgreSQL a transaction costs two round trips of its own (psycopg sends BEGIN before
    the first statement, then COMMIT or ROLLBACK), and on a loaded broker a round trip costs
    ~5 ms, waiting for a core and for the interpreter on the way back (issue 14's load
    benchmark: a heartbeat batch made six round trips and took 33 ms on average, of which
    its own processing was 5 ms and PostgreSQL's execution under 1 ms)."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")
