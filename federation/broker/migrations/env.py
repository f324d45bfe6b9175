"""Alembic environment: migrations run on the connection that db.migrate hands over."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from federation.broker import db

config = context.config
target_metadata = SQLModel.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        # Plain `alembic` command line: open the database named in the ini or environment.
        engine = db.plain_engine(config.get_main_option("sqlalchemy.url") or db.default_url())
        with engine.begin() as connection:
            _migrate(connection)
        return
    _migrate(connection)


def _migrate(connection) -> None:
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run()
