"""Who a token belongs to, remembered for a few seconds by each broker replica.

Authenticating a request read the token's row, its lab, its user and their membership: four
queries before the request did anything, for every heartbeat of every agent (issue 14's load
benchmark). A replica now keeps each API token's Principal for ``--token-cache`` seconds.
What could make a remembered Principal wrong is a change to a token (revoked), a membership
(role), a user or a lab: any unit of work that writes one of those clears every replica's
cache once it commits (here at once; the others through the wake-up relay's NOTIFY). The age
limit bounds the rest: a replica that missed the notification (its listener reconnecting)
forgets within the limit anyway. JupyterHub tokens are not kept here (the hub's own cache
answers for them, as HubAuth does).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, UOWTransaction

from accounting.models import Lab, Membership, User

from .memo import ExpiringMap
from .models import ApiToken

#: Rows whose change may change a token's Principal.
IDENTITY_ROWS = (ApiToken, Membership, User, Lab)
#: Tokens remembered at most per replica.
TOKENS_KEPT = 100_000

#: Per engine, what to call after a commit that changed identity rows.
_on_change: weakref.WeakKeyDictionary[Engine, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary())
_FLAG = "parallex_identity_changed"


def on_identity_change(engine: Engine, callback: Callable[[], None]) -> None:
    """Call ``callback`` after every commit on ``engine`` that wrote a token, membership,
    user or lab row."""
    _on_change.setdefault(engine, []).append(callback)


class PrincipalCache(ExpiringMap):
    """Principals by token hash, for ``ttl`` seconds (0: none kept)."""

    def __init__(self, ttl: float):
        super().__init__(ttl, TOKENS_KEPT)


def _touches_identity(session: Session) -> bool:
    return any(isinstance(obj, IDENTITY_ROWS)
               for obj in (*session.new, *session.dirty, *session.deleted))


@event.listens_for(Session, "before_flush")
def _note_identity_writes(session: Session, _flush: UOWTransaction, _instances) -> None:
    if _touches_identity(session):
        session.info[_FLAG] = True


@event.listens_for(Session, "do_orm_execute")
def _note_bulk_identity_writes(state) -> None:
    # update()/delete() statements bypass the flush.
    if (state.is_update or state.is_delete) and state.bind_mapper is not None \
            and state.bind_mapper.class_ in IDENTITY_ROWS:
        state.session.info[_FLAG] = True


@event.listens_for(Session, "after_commit")
def _identity_committed(session: Session) -> None:
    if not session.info.pop(_FLAG, False):
        return
    engine = session.get_bind()
    for callback in _on_change.get(engine, ()):
        callback()


@event.listens_for(Session, "after_rollback")
def _identity_rolled_back(session: Session) -> None:
    session.info.pop(_FLAG, None)
