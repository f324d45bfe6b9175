"""Accounting endpoints: balances, ledgers with their explanations, usage, prices and grants.

Who may read what is decided in ``access`` alone.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import StringConstraints, field_validator
from sqlmodel import Field, Session, SQLModel, col, select

from accounting.identifiers import LabName
from accounting.ledger import (
    Account,
    LedgerEntry,
    Transfer,
    TransferKind,
    balance,
    grant,
    lab_account,
    ledger_page,
)
from accounting.ledger import lab_balance as read_lab_balance
from accounting.metering import UsageRecord
from accounting.models import Lab, User, as_utc, names_by_id, utcnow
from accounting.pricing import (
    PriceVersion,
    Resources,
    gpu_class,
    pcu_per_hour,
    price_at,
    set_price,
)
from accounting.reliability import factor, standings
from accounting.retention import pruned_before
from accounting.statement import Parties, explain_usage
from accounting.units import to_nano, to_pcu
from accounting.usage_totals import usage_totals

from .access import readable_lab, scope_of, usage_scope
from .auth import Principal, require_admin, require_user
from .errors import Invalid, NotFound
from .id_params import LabPath, RowIdPath
from .models import Provider, WorkerSpec

router = APIRouter()


def _pcu(nano: int) -> str:
    return str(to_pcu(nano))


def _user_label(principal: Principal, record: UsageRecord, users: dict[int, str],
                labs: dict[int, str]) -> str:
    """A member's name for those who may see it (themselves, their PI, admins)."""
    if principal.is_admin or principal.user_id == record.user_id or (
            principal.is_pi and principal.lab_id == record.consumer_lab_id):
        return users.get(record.user_id, str(record.user_id))
    return f"a member of {labs.get(record.consumer_lab_id, '?')}"


@router.get("/labs/{lab}/balance")
def lab_balance(lab: LabPath, request: Request,
                principal: Principal = Depends(require_user)) -> dict:
    """The lab's balance in PCU (a decimal string, exact to 1e-9 PCU) and its credit limit."""
    with request.app.state.session() as s:
        row = readable_lab(s, scope_of(principal), lab)
        amount = read_lab_balance(s, row)
        return {"lab": row.name, "balance": _pcu(amount), "balance_nano": amount,
                "credit_limit": str(row.credit_limit)}


@router.get("/labs/{lab}/ledger")
def lab_ledger(lab: LabPath, request: Request,
               since: dt.datetime | None = Query(None, description="Only entries from then."),
               limit: int = Query(200, ge=1, le=10_000, description="Newest entries first."),
               principal: Principal = Depends(require_user)) -> dict:
    """The lab's entries, newest first; usage entries say which lease, machine and rate."""
    with request.app.state.session() as s:
        row = readable_lab(s, scope_of(principal), lab)
        account_id = s.exec(select(Account.id).where(Account.lab_id == row.id)).first()
        rows = ledger_page(s, account_id, since, limit)
        records = {r.transfer_id: r for r in s.exec(select(UsageRecord).where(
            col(UsageRecord.transfer_id).in_([t.id for _e, t in rows])))} if rows else {}
        names = _names(s, records.values())
        entries = []
        for e, t in rows:
            entry = {"time": e.created_at, "amount": _pcu(e.amount), "kind": t.kind.value,
                     "memo": t.memo, "transfer_id": t.id}
            r = records.get(t.id)
            if r is None and t.kind == TransferKind.usage:
                # Pruned with its lease's other records (accounting/retention.py): the
                # memo still names the lease and period.
                entry["usage_pruned"] = True
            if r is not None:
                entry["usage"] = {
                    "lease_id": r.lease_id, "seconds": r.seconds, "cpus": r.cpus,
                    "memory": r.memory, "gpus": r.gpus, "gpu_model": r.gpu_model,
                    "pcu_per_hour": r.pcu_per_hour, "reliability": r.reliability,
                    "provider": names["provider"].get(r.provider_id, r.provider_id),
                    "provider_lab": names["lab"].get(r.provider_lab_id),
                    "consumer_lab": names["lab"].get(r.consumer_lab_id),
                    "user": _user_label(principal, r, names["user"], names["lab"]),
                    "side": "earned" if r.provider_lab_id == row.id else "charged"}
            entries.append(entry)
        return {"lab": row.name, "entries": entries}


def _names(s: Session, records, *, labs=()) -> dict[str, dict]:
    """Names of the labs, users and providers ``records`` (usage records) mention."""
    records = list(records)
    return {"lab": names_by_id(s, Lab, [*labs, *(r.consumer_lab_id for r in records),
                                        *(r.provider_lab_id for r in records)]),
            "user": names_by_id(s, User, (r.user_id for r in records)),
            "provider": names_by_id(s, Provider, (r.provider_id for r in records))}


@router.get("/transfers/{transfer_id}")
def explain_transfer(transfer_id: RowIdPath, request: Request,
                     principal: Principal = Depends(require_user)) -> dict:
    """Why a transfer happened: its entries and, for usage, the arithmetic behind the charge.
    Readable by administrators and by members of the labs it moved credits for."""
    with request.app.state.session() as s:
        transfer = s.get(Transfer, transfer_id)
        rows = s.exec(select(LedgerEntry, Account).join(
            Account, Account.id == LedgerEntry.account_id)
            .where(LedgerEntry.transfer_id == transfer_id)).all() if transfer else []
        lab_ids = {a.lab_id for _e, a in rows if a.lab_id is not None}
        if transfer is None or not (principal.is_admin or principal.lab_id in lab_ids):
            # The same answer for "missing" and "not yours": ids are not secrets to probe.
            raise NotFound("unknown-transfer",
                           f"no transfer {transfer_id} in your lab's ledger; `parallex ledger` "
                           "lists the ids you can explain")
        record = s.exec(select(UsageRecord).where(
            UsageRecord.transfer_id == transfer_id)).first()
        names = _names(s, [record] if record else [], labs=lab_ids)
        out = {"transfer_id": transfer.id, "kind": transfer.kind.value, "memo": transfer.memo,
               "time": transfer.created_at,
               "entries": [{"account": a.name, "lab": names["lab"].get(a.lab_id),
                            "amount": _pcu(e.amount)} for e, a in rows],
               "explanation": [transfer.memo] if transfer.memo else []}
        if record is None and transfer.kind == TransferKind.usage:
            horizon = pruned_before(s)
            out["usage_pruned"] = True
            out["explanation"].append(
                "Its usage record (the resources, rate and price version behind this charge) "
                "was pruned with the records of leases that ended before "
                f"{horizon:%Y-%m-%d} UTC." if horizon else "Its usage record is gone.")
            out["explanation"].append(
                "The entries below are the charge as it was booked; the lease's totals are in "
                "its job record (`parallex records`).")
        if record is not None:
            price = s.get(PriceVersion, record.price_version_id)
            parties = Parties(
                consumer_lab=names["lab"].get(record.consumer_lab_id, "?"),
                provider_lab=names["lab"].get(record.provider_lab_id, "?"),
                provider=names["provider"].get(record.provider_id, record.provider_id),
                user=_user_label(principal, record, names["user"], names["lab"]))
            out["explanation"] = explain_usage(record, price, parties,
                                               request.app.state.broker.settings
                                               .cloud_prices.currency)
            out["usage"] = {
                "lease_id": record.lease_id, "period_start": record.period_start,
                "period_end": record.period_end, "seconds": record.seconds,
                "cpus": record.cpus, "memory": record.memory, "gpus": record.gpus,
                "gpu_model": record.gpu_model, "gpu_class": record.gpu_class,
                "price_version": record.price_version_id, "pcu_per_hour": record.pcu_per_hour,
                "charge": _pcu(record.charge), "earned": _pcu(record.earned),
                "reliability": record.reliability, "fee_fraction": price.fee_fraction,
                "self_use": record.self_use, "cloud_cost": record.cloud_cost}
        return out


@router.get("/usage")
def usage(request: Request,
          since: dt.datetime | None = Query(None, description="Periods ending at or after."),
          until: dt.datetime | None = Query(None, description="Periods ending before."),
          by: Literal["lab", "user", "provider", "provider_lab"] = Query("lab"),
          lab: str | None = Query(None, description="Only this lab."),
          side: Literal["consumed", "provided"] = Query(
              "consumed", description="consumed: what the lab's members used; provided: what "
                                      "the lab's machines served (PIs and admins)."),
          principal: Principal = Depends(require_user)) -> dict:
    """Usage totals: PCU charged, earned, self-use, core-hours, GPU-hours and the cloud
    equivalent. Members see their own usage, PIs their lab's, administrators everyone's."""
    with request.app.state.session() as s:
        scope = usage_scope(s, scope_of(principal), lab, provided=side == "provided")
        key = {"lab": "consumer_lab_id", "user": "user_id", "provider": "provider_id",
               "provider_lab": "provider_lab_id"}[by]
        where: dict[str, int] = {}
        if scope.lab_id is not None:
            where["provider_lab_id" if side == "provided" else "consumer_lab_id"] = scope.lab_id
        if scope.user_id is not None:
            where["user_id"] = scope.user_id
        found = usage_totals(s, by=key, since=since, until=until, **where)
        keys = list(found)
        model = {"lab": Lab, "provider_lab": Lab, "user": User, "provider": Provider}[by]
        names = {by: names_by_id(s, model, keys)}
        # pcu: what was charged; self_use_pcu: what a lab's use of its own machines would have
        # cost (free, recorded so a PI sees it); earned_pcu: what the providers' labs earned.
        rows = [{by: names[by].get(k, str(k)), "pcu": _pcu(t.charged),
                 "self_use_pcu": _pcu(t.self_use), "earned_pcu": _pcu(t.earned),
                 "core_hours": round(t.cpu_seconds / 3600, 6),
                 "gpu_hours": round(t.gpu_seconds / 3600, 6),
                 "lease_hours": round(t.seconds / 3600, 6),
                 "cloud_cost": t.cloud_cost, "_key": k}
                for k, t in found.items()]
        if by == "provider":
            standing = standings(s, [r["_key"] for r in rows])
            for r in rows:
                st = standing[r["_key"]]
                r.update(reliability=round(factor(st.penalty), 4),
                         lost_leases=st.lost_leases, failed_leases=st.failed_leases)
        for r in rows:
            del r["_key"]
        return {"by": by, "side": side, "since": since, "until": until,
                "scope": ("everyone" if scope.lab_id is None
                          else f"{names_by_id(s, Lab, [scope.lab_id])[scope.lab_id]}" + (
                              f", {principal.user_name} only" if scope.user_id else "")),
                "currency": request.app.state.broker.settings.cloud_prices.currency,
                "rows": sorted(rows, key=lambda r: r[by])}


def _price_public(p: PriceVersion) -> dict:
    return {"id": p.id, "effective_from": p.effective_from, "w_cpu": p.w_cpu,
            "w_mem_gib": p.w_mem_gib, "default_gpu_weight": p.default_gpu_weight,
            "fee_fraction": p.fee_fraction,
            "gpu_classes": [{"class": c, "pattern": pat, "weight": w}
                            for c, pat, w in p.gpu_classes]}


@router.get("/prices")
def prices(request: Request, principal: Principal = Depends(require_user)) -> dict:
    """The price version in force now, any that take effect later, and the reference cloud
    prices used for savings."""
    with request.app.state.session() as s:
        now = utcnow()
        current = price_at(s, now)
        later = s.exec(select(PriceVersion).where(PriceVersion.effective_from > now)
                       .order_by(PriceVersion.effective_from)).all()
        return {"current": _price_public(current), "upcoming": [_price_public(p) for p in later],
                "cloud_reference": request.app.state.broker.settings.cloud_prices.public()}


class Quote(SQLModel):
    spec: WorkerSpec
    workers: int = Field(default=1, ge=0, le=100_000, description="How many such workers.")


@router.post("/prices/quote")
def quote(body: Quote, request: Request, principal: Principal = Depends(require_user)) -> dict:
    """PCU per hour of ``workers`` workers of ``spec`` at today's list price. Work placed on
    the caller's own lab's machines is free, so this is an upper bound."""
    with request.app.state.session() as s:
        price = price_at(s, utcnow())
        spec = body.spec
        res = Resources(spec.cpus, spec.memory, spec.gpus, spec.gpu_model)
        per_worker = pcu_per_hour(price, res)
        cloud = request.app.state.broker.settings.cloud_prices
        cls = gpu_class(price, spec.gpu_model)[0] if spec.gpus else None
        return {"price_version": price.id, "workers": body.workers, "gpu_class": cls,
                "pcu_per_hour_per_worker": per_worker,
                "pcu_per_hour": per_worker * body.workers,
                "cloud_cost_per_hour": cloud.cost(cpus=spec.cpus, memory=spec.memory,
                                                  gpus=spec.gpus, gpu_class=cls,
                                                  seconds=3600) * body.workers,
                "currency": cloud.currency}


GpuClassName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")]


class GpuClassNew(SQLModel):
    name: GpuClassName = Field(description="Class name, e.g. b200: lower-case letters, "
                               "digits, _ . - (at most 32).")
    pattern: str = Field(max_length=200, description="Regular expression matched against the "
                         "GPU's model name (case-insensitive), e.g. 'b200'.")
    weight: float = Field(ge=0, le=1e6, description="PCU per hour per GPU of this class.")


class PriceSet(SQLModel):
    effective_from: dt.datetime | None = Field(
        default=None, description="When it takes effect (UTC); now if left out.")
    w_cpu: float = Field(ge=0, description="PCU per hour per CPU core.")
    w_mem_gib: float = Field(ge=0, description="PCU per hour per GiB of memory.")
    gpu_weights: dict[str, float] = Field(default_factory=dict,
                                          description="PCU per hour per GPU, by GPU class.")
    default_gpu_weight: float | None = Field(default=None, ge=0)
    fee_fraction: float | None = Field(default=None, ge=0, lt=1)
    new_gpu_classes: list[GpuClassNew] = Field(
        default_factory=list, max_length=64, description="GPU classes to add (tried before "
        "the existing ones).")

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
                                fee_fraction=body.fee_fraction, now=now,
                                new_gpu_classes=[(c.name, c.pattern, c.weight)
                                                 for c in body.new_gpu_classes])
        except ValueError as exc:
            s.rollback()
            raise Invalid("bad-price", str(exc)) from exc
        s.commit()
        return _price_public(version)


class GrantCreate(SQLModel):
    lab: LabName = Field(min_length=1, max_length=64)
    amount: float = Field(ge=1e-9, le=1e8,
                          description="PCU to give, from 0.000000001 (the ledger's unit) "
                                      "to 100,000,000.")
    memo: str = Field(default="", max_length=500)


@router.post("/grants", status_code=201)
def new_grant(body: GrantCreate, request: Request,
              admin: Principal = Depends(require_admin)) -> dict:
    with request.app.state.session() as s:
        lab = readable_lab(s, scope_of(admin), body.lab)
        try:
            transfer = grant(s, lab=lab, amount=to_nano(body.amount), memo=body.memo)
        except ValueError as exc:
            raise Invalid("bad-grant", str(exc)) from exc
        s.commit()
        return {"transfer_id": transfer.id, "lab": lab.name, "amount": str(body.amount),
                "balance": _pcu(balance(s, lab_account(s, lab).id))}
