"""Database engine: SQLite file by default, PostgreSQL URLs accepted."""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

import accounting.fairshare  # noqa: F401  (registers the decayed-usage table)
import accounting.ledger  # noqa: F401  (registers the ledger tables)
import accounting.metering  # noqa: F401  (registers the usage table)
import accounting.models  # noqa: F401  (registers the identity tables)
import accounting.pricing  # noqa: F401  (registers the price table)

from . import models  # noqa: F401  (registers the broker tables)


def normalise_url(url: str) -> str:
    """Map plain postgresql:// URLs onto the psycopg 3 driver we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    """Create the engine and the tables it lacks."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            # WAL keeps readers off the writer's back; foreign keys are off by default in SQLite.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    SQLModel.metadata.create_all(engine)
    return engine


def session(engine: Engine) -> Session:
    """A session that keeps loaded objects usable after commit."""
    return Session(engine, expire_on_commit=False)
