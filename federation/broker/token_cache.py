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

A lab's machines share one provider token, so when its Principal expires, every heartbeat of
the lab's fifty machines that arrives before the database answered would read it again: in
issue 14's load benchmark a sixth of a replica's threads' time went to such reads. A token
is read once at a time (``read_once``): requests that arrive meanwhile wait for that read.
And a token in use is read again before it expires (``get_renewing``): once its Principal is
half the age limit old, the next request starts a read in the background and is answered
from memory, so no request waits for the read as the Principal expires (every ten seconds,
each lab's agents' requests arriving during that read waited for it, as many as a lab has
machines; a quarter of a loaded broker's slowest heartbeats came in those moments).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

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
#: Share of the age limit after which a Principal in use is read again in the background.
RENEW_AFTER = 0.5

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
        #: Token hash -> (generation it was started in, the read under way); touched only
        #: on the event loop.
        self._reads: dict[str, tuple[int, asyncio.Future]] = {}

    def get_renewing(self, digest: str,
                     read: Callable[[], Awaitable[tuple[Any, bool]]]) -> Any | None:
        """The remembered Principal of the token hashed ``digest``, or None; when it is past
        ``RENEW_AFTER`` of the age limit, a read of it (``read``, as ``read_once`` takes it)
        starts in the background, unless one is under way. Until that read has put the
        Principal again, it is answered as it was, never beyond the age limit; a read that
        fails leaves it to expire. Call on the event loop."""
        found = self.get_aged(digest)
        if found is None:
            return None
        principal, age = found
        if age >= self.ttl * RENEW_AFTER:
            self._read(digest, read)
        return principal

    async def read_once(self, digest: str,
                        read: Callable[[], Awaitable[tuple[Any, bool]]]) -> Any:
        """The Principal of the token hashed ``digest``, read by ``read`` (which returns it
        and whether to keep it) unless a read of it started since the last ``clear`` is
        under way, whose answer (or refusal) this then is. Call on the event loop."""
        # Shielded: a caller that gives up (its client went away) leaves the read to the rest.
        return await asyncio.shield(self._read(digest, read))

    def _read(self, digest: str,
              read: Callable[[], Awaitable[tuple[Any, bool]]]) -> asyncio.Future:
        """The read of ``digest`` under way since the last ``clear``, started if none is."""
        generation = self.generation
        under_way = self._reads.get(digest)
        if under_way is None or under_way[0] != generation:
            task = asyncio.ensure_future(self._read_and_keep(digest, read, generation))
            task.add_done_callback(lambda done: self._read_done(digest, done))
            under_way = self._reads[digest] = (generation, task)
        return under_way[1]

    async def _read_and_keep(self, digest: str,
                             read: Callable[[], Awaitable[tuple[Any, bool]]],
                             generation: int) -> Any:
        principal, remember = await read()
        if remember:
            # Not if a token or membership changed while it was read: it may be the old one.
            self.put(digest, principal, generation)
        return principal

    def _read_done(self, digest: str, done: asyncio.Future) -> None:
        if self._reads.get(digest, (0, None))[1] is done:
            del self._reads[digest]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone


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
