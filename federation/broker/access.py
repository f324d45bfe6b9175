"""Who may read which lab's books: the one place these rules live, for the API and the
dashboards alike.

- Administrators read every lab.
- Members and PIs read their own lab's balance and ledger.
- A member's usage figures are their own; a PI's are the whole lab's, with its members,
  machines and earnings.

A ``Scope`` says who is looking. The API builds it from the request's token (``scope_of``),
the dashboards from the hub user's name (``scope_of_user``); both take the role from the
person's lab membership (written from their institution's claims at hub login), so a
JupyterHub administrator is not a Parallex administrator unless their membership says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, select

from accounting.models import Lab

from .auth import Principal, user_principal
from .errors import NotAllowed, NotFound


@dataclass(frozen=True)
class Scope:
    """Who is looking: ``role`` is "admin" (every lab), "pi" (their lab, its members,
    machines and earnings) or "member" (their lab's balance, their own usage)."""

    name: str
    role: str
    user_id: int | None = None
    lab_id: int | None = None
    lab_name: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_pi(self) -> bool:
        """A PI of their lab (administrators can do what PIs can)."""
        return self.role in ("pi", "admin")


def scope_of(principal: Principal) -> Scope:
    """The scope of an API caller."""
    role = "admin" if principal.is_admin else "pi" if principal.is_pi else "member"
    return Scope(principal.user_name or principal.token_id, role, principal.user_id,
                 principal.lab_id, principal.lab_name)


def scope_of_user(session: Session, name: str) -> Scope | None:
    """The scope of the Parallex user ``name`` (a hub user of the same name); None for a name
    the federation does not know, who may read nothing."""
    principal = user_principal(session, name, f"hub:{name}")
    return None if principal is None else scope_of(principal)


def lab_named(session: Session, name: str) -> Lab:
    lab = session.exec(select(Lab).where(Lab.name == name)).first()
    if lab is None:
        raise NotFound("unknown-lab", f"no lab named {name!r}")
    return lab


def readable_lab(session: Session, scope: Scope, name: str) -> Lab:
    """The lab named ``name`` if the caller may read its balance and ledger."""
    lab = lab_named(session, name)
    if not scope.is_admin and scope.lab_id != lab.id:
        raise NotAllowed("not-your-lab",
                       f"lab {name}'s books are for its members and administrators; you can "
                       f"read your own lab's ({scope.lab_name})")
    return lab


def _pi_only(name: str | None) -> NotAllowed:
    return NotAllowed("pi-only", f"lab {name}'s members, machines and earnings are for its "
                    "PIs and administrators; your own usage is at /usage")


def managed_lab(session: Session, scope: Scope, name: str) -> Lab:
    """The lab named ``name`` if the caller is its PI (or an administrator)."""
    lab = readable_lab(session, scope, name)
    if not scope.is_pi:
        raise _pi_only(name)
    return lab


@dataclass(frozen=True)
class UsageScope:
    """The usage records a caller may see: one lab's, one user's, or (admin) everyone's."""

    lab_id: int | None
    user_id: int | None


def usage_scope(session: Session, scope: Scope, lab: str | None,
                provided: bool) -> UsageScope:
    """Which usage the caller sees; ``provided`` asks for what a lab's machines served."""
    if lab is not None:
        row = managed_lab(session, scope, lab) if provided else readable_lab(
            session, scope, lab)
        lab_id = row.id
    elif scope.is_admin:
        return UsageScope(None, None)
    elif provided and not scope.is_pi:
        raise _pi_only(scope.lab_name)
    else:
        lab_id = scope.lab_id
    if scope.is_pi or provided:
        return UsageScope(lab_id, None)
    return UsageScope(lab_id, scope.user_id)
