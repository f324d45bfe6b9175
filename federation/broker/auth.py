"""Who is calling: token hashing, issue and revoke, and the one place requests are authenticated.

Tokens are shown once and stored as SHA-256 hashes: they are long random strings, so a plain
hash is enough and lookups stay one indexed query. JupyterHub tokens are accepted too, when the
broker knows its hub (hub_tokens.py).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlalchemy import and_
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from accounting.models import Lab, Membership, Role, User, utcnow

from .errors import NotAllowed, NotAuthenticated, NotFound
from .hub_tokens import HubIdentity
from .models import ApiToken, TokenKind

TOKEN_PREFIX = "px_"


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(
    session: Session, *, kind: TokenKind, lab: Lab | None = None, user: User | None = None,
    token: str | None = None,
) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the secret (the only time it is seen)."""
    token_id = "tok_" + secrets.token_hex(6)
    secret = token or f"{TOKEN_PREFIX}{secrets.token_urlsafe(32)}"
    row = ApiToken(
        id=token_id,
        kind=kind,
        token_hash=hash_token(secret),
        lab_id=lab.id if lab else None,
        user_id=user.id if user else None,
    )
    session.add(row)
    session.flush()
    return row, secret


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    kind: TokenKind
    token_id: str
    lab_id: int | None
    lab_name: str | None
    user_id: int | None
    user_name: str | None
    role: Role | None = None

    @property
    def is_admin(self) -> bool:
        """An admin token, or a user whose role is admin (set by their institution's claims)."""
        return self.kind == TokenKind.admin or self.role == Role.admin

    @property
    def is_pi(self) -> bool:
        """A PI of their lab (administrators can do what PIs can)."""
        return self.role in (Role.pi, Role.admin) or self.kind == TokenKind.admin


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise NotAuthenticated("missing-token",
            "no API token given; send 'Authorization: Bearer <token>' "
            "(PARALLEX_TOKEN for users, --token for providers)",
        )
    return value.strip()


async def authenticate(request: Request) -> Principal:
    """Resolve the request's bearer token to a Principal or answer 401. A token seen in the
    last seconds is answered from this replica's memory (token_cache.py); otherwise the
    database is read in the thread pool, never on the event loop."""
    secret = _bearer(request)
    digest = hash_token(secret)
    cache = getattr(request.app.state, "principals", None)
    if cache is None:
        return (await run_in_threadpool(_read_principal, request, secret, digest))[0]
    def read() -> Awaitable[tuple[Principal, bool]]:
        return run_in_threadpool(_read_principal, request, secret, digest)

    known = cache.get_renewing(digest, read)
    if known is not None:
        return known
    return await cache.read_once(digest, read)


def _read_principal(request: Request, secret: str, digest: str) -> tuple[Principal, bool]:
    """The token's Principal from the database; and whether it is an API token's (kept in
    the cache) rather than a hub token's (the hub's own cache keeps those)."""
    # Only reads: outside a transaction (one round trip, not three; a replica reads each
    # token it serves again every --token-cache seconds).
    with request.app.state.reading() as session:
        # One statement for the token, its lab, its user and their membership there.
        found = session.exec(
            select(ApiToken, Lab, User, Membership)
            .outerjoin(Lab, Lab.id == ApiToken.lab_id)
            .outerjoin(User, User.id == ApiToken.user_id)
            .outerjoin(Membership, and_(Membership.user_id == ApiToken.user_id,
                                        Membership.lab_id == ApiToken.lab_id))
            .where(ApiToken.token_hash == digest)).first()
        if found is None:
            hub = getattr(request.app.state, "hub_tokens", None)
            if hub is not None and not secret.startswith(TOKEN_PREFIX):
                return _hub_principal(session, hub.identify(secret)), False
            raise NotAuthenticated("bad-token", "this token is not known to the broker; ask your "
                           "administrator for a new one")
        row, lab, user, member = found
        if row.revoked_at is not None:
            raise NotAuthenticated("revoked-token",
                           f"token {row.id} was revoked on {row.revoked_at:%Y-%m-%d %H:%M} UTC; "
                           "ask your administrator for a new one")
        if row.kind != TokenKind.user or user is None or lab is None:
            member = None
        return Principal(
            kind=row.kind,
            token_id=row.id,
            lab_id=lab.id if lab else None,
            lab_name=lab.name if lab else None,
            user_id=user.id if user else None,
            user_name=user.name if user else None,
            role=member.role if member else None,
        ), True


def user_principal(session: Session, name: str, token_id: str) -> Principal | None:
    """The Principal of the Parallex user ``name`` with their membership's role; None for a
    name the federation does not know."""
    user = session.exec(select(User).where(User.name == name)).first()
    if user is None:
        return None
    lab = session.get(Lab, user.lab_id)
    member = session.get(Membership, (user.id, lab.id))
    return Principal(kind=TokenKind.user, token_id=token_id, lab_id=lab.id,
                     lab_name=lab.name, user_id=user.id, user_name=user.name,
                     role=member.role if member else None)


def _hub_principal(session: Session, identity: HubIdentity) -> Principal:
    """The Parallex user behind a JupyterHub identity (same name, written at hub login)."""
    principal = user_principal(session, identity.name, f"hub:{identity.name}")
    if principal is None:
        raise NotAllowed("no-lab", f"hub user {identity.name} belongs to no Parallex lab "
                       "yet; sign out of the hub and in again so your lab membership is "
                       "registered, or ask your lab's PI")
    return principal


def _require(*kinds: TokenKind):
    allowed = ", ".join(k.value for k in kinds)

    async def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if kinds == (TokenKind.admin,) and principal.is_admin:
            return principal  # a user with the admin role acts as an administrator
        if principal.kind not in kinds:
            raise NotAllowed("wrong-token-kind",
                           f"a {principal.kind.value} token cannot do this; it needs a token "
                           f"of kind: {allowed}")
        return principal

    return dependency


require_admin = _require(TokenKind.admin)
require_user = _require(TokenKind.user, TokenKind.admin)
require_provider = _require(TokenKind.provider)
require_any = _require(TokenKind.user, TokenKind.admin, TokenKind.provider)


def revoke(session: Session, token_id: str) -> ApiToken:
    """Mark a token revoked; later requests with it get 401."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound("unknown-token", f"no token with id {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
    return row
