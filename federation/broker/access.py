"""Who may read which lab's books: the one place these rules live.

- Administrators read every lab.
- Members and PIs read their own lab's balance and ledger.
- A member's usage figures are their own; a PI's are the whole lab's, with its members,
  machines and earnings.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, select

from accounting.models import Lab

from .auth import Principal
from .errors import ApiError


def lab_named(session: Session, name: str) -> Lab:
    lab = session.exec(select(Lab).where(Lab.name == name)).first()
    if lab is None:
        raise ApiError(404, "unknown-lab", f"no lab named {name!r}")
    return lab


def readable_lab(session: Session, principal: Principal, name: str) -> Lab:
    """The lab named ``name`` if the caller may read its balance and ledger."""
    lab = lab_named(session, name)
    if not principal.is_admin and principal.lab_id != lab.id:
        raise ApiError(403, "not-your-lab",
                       f"lab {name}'s books are for its members and administrators; you can "
                       f"read your own lab's ({principal.lab_name})")
    return lab


def _pi_only(name: str | None) -> ApiError:
    return ApiError(403, "pi-only", f"lab {name}'s members, machines and earnings are for its "
                    "PIs and administrators; your own usage is at /usage")


def managed_lab(session: Session, principal: Principal, name: str) -> Lab:
    """The lab named ``name`` if the caller is its PI (or an administrator)."""
    lab = readable_lab(session, principal, name)
    if not principal.is_pi:
        raise _pi_only(name)
    return lab


@dataclass(frozen=True)
class UsageScope:
    """The usage records a caller may see: one lab's, one user's, or (admin) everyone's."""

    lab_id: int | None
    user_id: int | None


def usage_scope(session: Session, principal: Principal, lab: str | None,
                provided: bool) -> UsageScope:
    """Which usage the caller sees; ``provided`` asks for what a lab's machines served."""
    if lab is not None:
        row = managed_lab(session, principal, lab) if provided else readable_lab(
            session, principal, lab)
        lab_id = row.id
    elif principal.is_admin:
        return UsageScope(None, None)
    elif provided and not principal.is_pi:
        raise _pi_only(principal.lab_name)
    else:
        lab_id = principal.lab_id
    if principal.is_pi or provided:
        return UsageScope(lab_id, None)
    return UsageScope(lab_id, principal.user_id)
