"""Rows written with plain SQL into a database at an older schema revision, for migration
tests (the models describe only the newest schema)."""

from __future__ import annotations

from sqlalchemy import Connection, text


def insert_lab_user_cluster(c: Connection, at: str) -> None:
    """Lab 1 'a', its user 1 'u', and u's active cluster 'c1', all made at ``at``."""
    c.execute(text("INSERT INTO lab (id, name, site, share, credit_limit, created_at) "
                   "VALUES (1, 'a', '', 1, 0, :t)"), {"t": at})
    c.execute(text("INSERT INTO \"user\" (id, name, lab_id, created_at) "
                   "VALUES (1, 'u', 1, :t)"), {"t": at})
    c.execute(text(
        "INSERT INTO cluster (id, user_id, lab_id, name, scheduler_address, ca_cert, "
        "active, created_at, last_seen) VALUES ('c1', 1, 1, 'c', 'x', 'x', true, :t, :t)"),
        {"t": at})


def insert_provider(c: Connection, at: str, gpus_json: str = "[]") -> None:
    """Provider 'p1' ('box', 8 CPUs) of lab 1 with its provider token 'tk1', made at ``at``
    (after insert_lab_user_cluster)."""
    c.execute(text("INSERT INTO apitoken (id, kind, token_hash, lab_id, created_at) "
                   "VALUES ('tk1', 'PROVIDER', 'h', 1, :t)"), {"t": at})
    c.execute(text(
        "INSERT INTO provider (id, lab_id, token_id, name, site, cpus, memory, gpus_json, "
        "online, last_seen, registered_at) "
        "VALUES ('p1', 1, 'tk1', 'box', '', 8, 1, :g, true, :t, :t)"), {"t": at, "g": gpus_json})
