"""Where the federation gateway routes a cluster's connections: its scheduler's host:port,
read from the brokers' database. The broker's in-process gateway and ``parallex gateway`` (a
process of its own) read the same clusters table, so either routes a cluster as soon as any
replica registered it and stops as soon as it ends."""

from __future__ import annotations

import logging

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from .broker.models import ClusterRecord
from .gateway import NotRoutable

logger = logging.getLogger("parallex.gateway")


def route_of(record: ClusterRecord | None) -> str | None:
    """An active cluster's scheduler as host:port, else None."""
    if record is None or not record.active:
        return None
    return record.scheduler_address.split("://", 1)[-1]


class DatabaseRoutes:
    """The gateway's routes for ``parallex gateway``: one short read per connection to a
    scheduler (parked connections to workers need none)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, cluster_id: str) -> str | None:
        try:
            with Session(self.engine) as s:
                return route_of(s.get(ClusterRecord, cluster_id))
        except SQLAlchemyError as exc:
            # Said once per refused connection; the worker dials again.
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            logger.warning("gateway: cannot read cluster %s from the brokers' database: %s",
                           cluster_id, reason)
            raise NotRoutable(f"the brokers' database cannot be read ({reason})") from exc
