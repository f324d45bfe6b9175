"""Administrator endpoints: labs, users, tokens; plus whoami and the provider list for everyone."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, SQLModel, select

from accounting.ledger import grant, lab_account
from accounting.models import (
    Lab,
    LabCreate,
    LabPolicy,
    LabPublic,
    LabUpdate,
    Membership,
    Role,
    User,
    UserCreate,
    UserPublic,
    create_lab,
    create_user,
)
from accounting.reliability import reliabilities
from accounting.units import to_nano

from .auth import Principal, authenticate, issue_token, require_admin, require_any, revoke
from .errors import Conflict, Invalid, NotFound
from .id_params import LabPath, TokenIdPath, UserPath
from .models import Provider, TokenCreate, TokenKind

router = APIRouter()


def _lab_by_name(session, name: str) -> Lab:
    lab = session.exec(select(Lab).where(Lab.name == name)).first()
    if lab is None:
        raise NotFound("unknown-lab", f"no lab named {name!r}; create it with "
                       "`parallex admin lab create`")
    return lab


@router.get("/whoami")
def whoami(request: Request, principal: Principal = Depends(authenticate)) -> dict:
    """Who the token belongs to, and the most CPUs and GPUs they may hold at once (the
    tighter of their own and their lab's quota; None means no limit)."""
    max_cpus = max_gpus = None
    if principal.user_id is not None and principal.lab_id is not None:
        with request.app.state.session() as s:
            lab = s.get(Lab, principal.lab_id)
            member = s.get(Membership, (principal.user_id, principal.lab_id))
            limits = [x for x in (lab, member) if x is not None]
            cpus = [x.max_cpus for x in limits if x.max_cpus is not None]
            gpus = [x.max_gpus for x in limits if x.max_gpus is not None]
            max_cpus, max_gpus = (min(cpus) if cpus else None), (min(gpus) if gpus else None)
    return {"kind": principal.kind.value, "token_id": principal.token_id,
            "lab": principal.lab_name, "user": principal.user_name,
            "role": principal.role.value if principal.role else None,
            "max_cpus": max_cpus, "max_gpus": max_gpus}


@router.post("/labs", status_code=201, response_model=LabPublic)
def create_lab_route(body: LabCreate, request: Request,
                     _admin: Principal = Depends(require_admin)) -> Lab:
    with request.app.state.session() as s:
        if s.exec(select(Lab).where(Lab.name == body.name)).first():
            raise Conflict("lab-exists", f"a lab named {body.name!r} already exists")
        lab = create_lab(s, name=body.name, site=body.site or body.name,
                         institution=body.institution,
                         policy=LabPolicy(**body.model_dump(include=set(LabPolicy.model_fields))))
        initial = request.app.state.broker.settings.initial_grant
        lab_account(s, lab)
        if initial > 0:
            grant(s, lab=lab, amount=to_nano(initial), memo=f"initial grant to {lab.name}")
        s.commit()
        return lab


@router.patch("/labs/{lab}", response_model=LabPublic)
def update_lab(lab: LabPath, body: LabUpdate, request: Request,
               _admin: Principal = Depends(require_admin)) -> Lab:
    """Change a lab's fair-share weight, credit limit or quotas."""
    with request.app.state.session() as s:
        row = _lab_by_name(s, lab)
        for field, value in body.model_dump(exclude_unset=True, exclude={"clear_quotas"}).items():
            if value is None:
                raise Invalid("invalid-request", f"{field}: give a value, or use "
                               "clear_quotas to remove the quotas")
            setattr(row, field, value)
        if body.clear_quotas:
            row.max_cpus = row.max_gpus = None
        s.add(row)
        s.commit()
        return row


class MemberSet(SQLModel):
    role: Role = Role.member
    max_cpus: float | None = Field(default=None, ge=0, description="None: no per-user limit.")
    max_gpus: int | None = Field(default=None, ge=0, description="None: no per-user limit.")


@router.put("/labs/{lab}/members/{user}")
def set_member(lab: LabPath, user: UserPath, body: MemberSet, request: Request,
               _admin: Principal = Depends(require_admin)) -> dict:
    """Add a user to a lab (created if new) or change their role and quotas there; fields
    left out of the request keep their value."""
    with request.app.state.session() as s:
        lab_row = _lab_by_name(s, lab)
        user_row = s.exec(select(User).where(User.name == user)).first()
        if user_row is None:
            user_row = create_user(s, name=user, lab=lab_row, role=body.role)
        member = s.get(Membership, (user_row.id, lab_row.id)) or Membership(
            user_id=user_row.id, lab_id=lab_row.id)
        # Only what the request names changes: the hub's login sync sends the role alone and
        # must not clear quotas an administrator set.
        for name in body.model_fields_set & {"role", "max_cpus", "max_gpus"}:
            setattr(member, name, getattr(body, name))
        s.add(member)
        s.commit()
        return {"lab": lab_row.name, "user": user_row.name, "role": member.role.value,
                "max_cpus": member.max_cpus, "max_gpus": member.max_gpus}


@router.get("/labs", response_model=list[LabPublic])
def list_labs(request: Request, _p: Principal = Depends(require_any)) -> list[Lab]:
    with request.app.state.session() as s:
        return list(s.exec(select(Lab).order_by(Lab.name)))


@router.post("/labs/{lab}/users", status_code=201, response_model=UserPublic)
def create_user_route(lab: LabPath, body: UserCreate, request: Request,
                      _admin: Principal = Depends(require_admin)) -> UserPublic:
    with request.app.state.session() as s:
        lab_row = _lab_by_name(s, lab)
        if s.exec(select(User).where(User.name == body.name)).first():
            raise Conflict("user-exists", f"a user named {body.name!r} already exists")
        user = create_user(s, name=body.name, lab=lab_row)
        s.commit()
        return UserPublic(id=user.id, name=user.name, lab=lab_row.name)


@router.post("/tokens", status_code=201)
def create_token(body: TokenCreate, request: Request,
                 _admin: Principal = Depends(require_admin)) -> dict:
    """Issue a user or provider token; the secret is in this answer and nowhere else."""
    with request.app.state.session() as s:
        lab = _lab_by_name(s, body.lab)
        user = None
        if body.kind == TokenKind.user:
            if not body.user:
                raise Invalid("missing-user", "a user token needs 'user'")
            user = s.exec(select(User).where(User.name == body.user)).first()
            if user is None:
                user = create_user(s, name=body.user, lab=lab)
            elif user.lab_id != lab.id:
                raise Conflict("user-in-other-lab",
                               f"user {body.user!r} belongs to another lab")
        elif body.kind == TokenKind.admin:
            raise Invalid("no-admin-tokens",
                           "admin tokens come from PARALLEX_ADMIN_TOKEN on the broker")
        try:
            row, secret = issue_token(s, kind=body.kind, lab=lab, user=user)
            s.commit()
        except IntegrityError as exc:
            s.rollback()
            raise Conflict("token-clash", "token id clash; try again") from exc
        return {"id": row.id, "kind": row.kind.value, "lab": lab.name,
                "user": user.name if user else None, "token": secret}


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: TokenIdPath, request: Request,
                 _admin: Principal = Depends(require_admin)) -> dict:
    with request.app.state.session() as s:
        row = revoke(s, token_id)
        s.commit()
        return {"id": row.id, "revoked_at": row.revoked_at}


@router.get("/providers")
def list_providers(request: Request, _p: Principal = Depends(require_any)) -> list[dict]:
    """Every provider with its lab and capacity (no secrets), for users and admins alike."""
    with request.app.state.session() as s:
        rows = s.exec(select(Provider, Lab.name).join(Lab, Lab.id == Provider.lab_id)).all()
        factors = reliabilities(s, [p.id for p, _lab in rows])
        return [{"id": p.id, "name": p.name, "lab": lab, "site": p.site, "cpus": p.cpus,
                 "memory": p.memory, "gpus": p.gpus, "online": p.online,
                 "last_seen": p.last_seen, "reliability": round(factors[p.id], 4)}
                for p, lab in rows]


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, principal: Principal = Depends(require_admin)) -> str:
    """Prometheus metrics (text format): leases by state and lab, the oldest pending lease's
    age, agents online and offering, PCU/h by lab, and this replica's placement, metering and
    HTTP timings. Scrape with an administrator token (``authorization: credentials_file``)."""
    return generate_latest(request.app.state.broker.metrics.registry).decode()
