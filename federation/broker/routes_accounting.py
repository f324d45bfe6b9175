"""Accounting endpoints: balances, ledgers, usage, prices and grants.

Members see their own lab's books, administrators every lab's; the rule lives in
``readable_lab`` alone.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import field_validator
from sqlalchemy import case, func
from sqlmodel import Field, SQLModel, col, select

from accounting.ledger import LedgerEntry, Transfer, balance, grant, lab_account
from accounting.metering import UsageRecord
from accounting.models import Lab, User, as_utc, utcnow
from accounting.pricing import PriceVersion, price_at, set_price
from accounting.units import to_nano, to_pcu

from .auth import Principal, require_admin, require_user
from .errors import ApiError
from .models import Provider

router = APIRouter()


def readable_lab(session, principal: Principal, name: str) -> Lab:
    """The lab named ``name`` if the caller may read its books (member or admin)."""
    lab = session.exec(select(Lab).where(Lab.name == name)).first()
    if lab is None:
        raise ApiError(404, "unknown-lab", f"no lab named {name!r}")
    if not principal.is_admin and principal.lab_id != lab.id:
        raise ApiError(403, "not-your-lab",
                       f"lab {name}'s books are for its members and administrators; you can "
                       f"read your own lab's ({principal.lab_name})")
    return lab


def _pcu(nano: int) -> str:
    return str(to_pcu(nano))


@router.get("/labs/{lab}/balance")
def lab_balance(lab: str, request: Request,
                principal: Principal = Depends(require_user)) -> dict:
    """The lab's balance in PCU (a decimal string, exact to 1e-9 PCU)."""
    with request.app.state.session() as s:
        row = readable_lab(s, principal, lab)
        amount = balance(s, lab_account(s, row).id)
        s.commit()
        return {"lab": row.name, "balance": _pcu(amount), "balance_nano": amount}


@router.get("/labs/{lab}/ledger")
def lab_ledger(lab: str, request: Request,
               since: dt.datetime | None = Query(None, description="Only entries from then."),
               limit: int = Query(200, ge=1, le=10_000, description="Newest entries first."),
               principal: Principal = Depends(require_user)) -> dict:
    with request.app.state.session() as s:
        row = readable_lab(s, principal, lab)
        account = lab_account(s, row)
        q = (select(LedgerEntry, Transfer).join(Transfer, Transfer.id == LedgerEntry.transfer_id)
             .where(LedgerEntry.account_id == account.id))
        if since is not None:
            q = q.where(LedgerEntry.created_at >= as_utc(since))
        rows = s.exec(q.order_by(col(LedgerEntry.created_at).desc(),
                                 col(LedgerEntry.id).desc()).limit(limit)).all()
        return {"lab": row.name, "entries": [
            {"time": e.created_at, "amount": _pcu(e.amount), "kind": t.kind.value,
             "memo": t.memo, "transfer_id": t.id} for e, t in rows]}


@router.get("/usage")
def usage(request: Request, since: dt.datetime | None = Query(None),
          by: Literal["lab", "user", "provider"] = Query("lab"),
          lab: str | None = Query(None, description="Only this consuming lab."),
          principal: Principal = Depends(require_user)) -> dict:
    """Usage totals: PCU, core-hours and GPU-hours, grouped by consuming lab, user or provider.
    Members see their own lab's consumption only."""
    with request.app.state.session() as s:
        if lab is not None:
            lab_id = readable_lab(s, principal, lab).id
        elif not principal.is_admin:
            lab_id = principal.lab_id
        else:
            lab_id = None
        key = {"lab": UsageRecord.consumer_lab_id, "user": UsageRecord.user_id,
               "provider": UsageRecord.provider_id}[by]
        charged = case((UsageRecord.self_use == False, UsageRecord.charge),  # noqa: E712
                       else_=0)
        own = case((UsageRecord.self_use == True, UsageRecord.charge), else_=0)  # noqa: E712
        q = select(key, func.sum(charged), func.sum(own),
                   func.sum(UsageRecord.cpus * UsageRecord.seconds),
                   func.sum(UsageRecord.gpus * UsageRecord.seconds),
                   func.sum(UsageRecord.seconds)).group_by(key)
        if lab_id is not None:
            q = q.where(UsageRecord.consumer_lab_id == lab_id)
        if since is not None:
            q = q.where(UsageRecord.period_end >= as_utc(since))
        names = {"lab": dict(s.exec(select(Lab.id, Lab.name)).all()),
                 "user": dict(s.exec(select(User.id, User.name)).all()),
                 "provider": dict(s.exec(select(Provider.id, Provider.name)).all())}[by]
        # pcu: what was charged; self_use_pcu: what a lab's use of its own machines would
        # have cost (free, recorded so a PI sees it).
        rows = [{by: names.get(k, str(k)), "pcu": _pcu(int(charge or 0)),
                 "self_use_pcu": _pcu(int(self_use or 0)),
                 "core_hours": round((cpu_s or 0) / 3600, 6),
                 "gpu_hours": round((gpu_s or 0) / 3600, 6),
                 "lease_hours": round((secs or 0) / 3600, 6)}
                for k, charge, self_use, cpu_s, gpu_s, secs in s.exec(q).all()]
        return {"by": by, "since": since, "rows": sorted(rows, key=lambda r: r[by])}


def _price_public(p: PriceVersion) -> dict:
    return {"id": p.id, "effective_from": p.effective_from, "w_cpu": p.w_cpu,
            "w_mem_gib": p.w_mem_gib, "default_gpu_weight": p.default_gpu_weight,
            "fee_fraction": p.fee_fraction,
            "gpu_classes": [{"class": c, "pattern": pat, "weight": w}
                            for c, pat, w in p.gpu_classes]}


@router.get("/prices")
def prices(request: Request, principal: Principal = Depends(require_user)) -> dict:
    """The price version in force now and any that take effect later."""
    with request.app.state.session() as s:
        now = utcnow()
        current = price_at(s, now)
        s.commit()
        later = s.exec(select(PriceVersion).where(PriceVersion.effective_from > now)
                       .order_by(PriceVersion.effective_from)).all()
        return {"current": _price_public(current), "upcoming": [_price_public(p) for p in later]}


class PriceSet(SQLModel):
    effective_from: dt.datetime | None = Field(
        default=None, description="When it takes effect (UTC); now if left out.")
    w_cpu: float = Field(ge=0, description="PCU per hour per CPU core.")
    w_mem_gib: float = Field(ge=0, description="PCU per hour per GiB of memory.")
    gpu_weights: dict[str, float] = Field(default_factory=dict,
                                          description="PCU per hour per GPU, by GPU class.")
    default_gpu_weight: float | None = Field(default=None, ge=0)
    fee_fraction: float | None = Field(default=None, ge=0, lt=1)

    @field_validator("gpu_weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        negative = {k: v for k, v in value.items() if v < 0}
        if negative:
            raise ValueError(f"GPU weights must be 0 or more; got {negative}")
        return value


@router.post("/prices", status_code=201)
def new_price(body: PriceSet, request: Request,
              _admin: Principal = Depends(require_admin)) -> dict:
    with request.app.state.session() as s:
        now = utcnow()
        try:
            version = set_price(s, effective_from=as_utc(body.effective_from or now),
                                w_cpu=body.w_cpu, w_mem_gib=body.w_mem_gib,
                                gpu_weights=body.gpu_weights,
                                default_gpu_weight=body.default_gpu_weight,
                                fee_fraction=body.fee_fraction, now=now)
        except ValueError as exc:
            s.rollback()
            raise ApiError(422, "bad-price", str(exc)) from exc
        s.commit()
        return _price_public(version)


class GrantCreate(SQLModel):
    lab: str = Field(min_length=1, max_length=64)
    amount: float = Field(gt=0, le=1e12, description="PCU to give.")
    memo: str = Field(default="", max_length=500)


@router.post("/grants", status_code=201)
def new_grant(body: GrantCreate, request: Request,
              admin: Principal = Depends(require_admin)) -> dict:
    with request.app.state.session() as s:
        lab = readable_lab(s, admin, body.lab)
        transfer = grant(s, lab=lab, amount=to_nano(body.amount), memo=body.memo)
        s.commit()
        return {"transfer_id": transfer.id, "lab": lab.name, "amount": str(body.amount),
                "balance": _pcu(balance(s, lab_account(s, lab).id))}
