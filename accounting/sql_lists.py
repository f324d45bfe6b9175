"""A column matched against a long list of values, as one statement text whatever the list.

``column.in_(values)`` renders a bound parameter per value. On PostgreSQL psycopg then
parses and converts that query text anew for every list (it caches only short queries),
and the server parses a thousand placeholders: in a metering pass over 10,000 leases,
units of 1,000 ids each, that was 0.8 s of the pass's 3 s of CPU. ``= ANY(array)`` is one
parameter, so the text is the same every time. SQLite has no arrays; there the list stays."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import ColumnElement, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlmodel import Session


def one_of(bind: Session | Connection, column: Any, values: Collection[Any]) -> ColumnElement[bool]:
    """``column`` IN ``values``, written for ``bind``'s database (a session or connection)."""
    dialect = bind.get_bind().dialect if isinstance(bind, Session) else bind.dialect
    if dialect.name != "postgresql":
        return column.in_(list(values))
    return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))


def one_of_param(column: Any, name: str, postgresql: bool) -> ColumnElement[bool]:
    """``one_of`` for a statement built once and run many times: ``column`` IN the list
    bound to ``name`` at each execution, written for PostgreSQL or for SQLite."""
    if postgresql:
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))
