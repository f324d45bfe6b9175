"""The double-entry ledger: accounts, transfers whose entries sum to zero, and balances kept in
step with the entries in the same transaction (so reading a balance is one row, not a sum)."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Index, Select, update
from sqlmodel import Field, Session, SQLModel, col, select

from .bulk import insert_rows
from .models import Lab, as_utc, utcnow
from .units import fmt_pcu


class AccountKind(StrEnum):
    lab = "lab"
    grants = "grants"          # where grants come from; its balance is minus all grants given
    federation = "federation"  # fees and the part of charges a provider's reliability withholds


class TransferKind(StrEnum):
    usage = "usage"
    grant = "grant"
    adjustment = "adjustment"


class Account(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    kind: AccountKind
    name: str = Field(unique=True, index=True)
    lab_id: int | None = Field(default=None, foreign_key="lab.id", unique=True)


class Transfer(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    kind: TransferKind
    memo: str = Field(default="", max_length=500)
    created_at: dt.datetime = Field(default_factory=utcnow, index=True)


class LedgerEntry(SQLModel, table=True):
    """One account's side of a transfer. Its transfer and account ids are not foreign keys, as
    a usage record's are not (metering writes two entries per charged period, in bulk;
    migration 0013), and nothing deletes a transfer or an account."""

    # By account and time together (a lab's ledger page, newest first; migration 0022).
    __table_args__ = (Index("ix_ledgerentry_account_id_created_at_id", "account_id",
                            "created_at", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    transfer_id: int = Field(index=True)
    account_id: int
    amount: int = Field(sa_type=BigInteger, description="nano-PCU; negative = debit.")
    created_at: dt.datetime = Field(default_factory=utcnow)


class Balance(SQLModel, table=True):
    account_id: int = Field(foreign_key="account.id", primary_key=True)
    amount: int = Field(default=0, sa_type=BigInteger, description="nano-PCU.")


def ledger_page(session: Session, account_id: int | None, since: dt.datetime | None,
                limit: int) -> list[tuple[LedgerEntry, Transfer]]:
    """An account's newest ``limit`` entries (from ``since``, if given) with their
    transfers, newest first."""
    q = (select(LedgerEntry, Transfer).join(Transfer, Transfer.id == LedgerEntry.transfer_id)
         .where(LedgerEntry.account_id == account_id))
    if since is not None:
        q = q.where(LedgerEntry.created_at >= as_utc(since))
    return list(session.exec(q.order_by(col(LedgerEntry.created_at).desc(),
                                        col(LedgerEntry.id).desc()).limit(limit)).all())


def system_account(session: Session, kind: AccountKind) -> Account:
    """The grants or federation account, created on first use."""
    account = session.exec(select(Account).where(Account.name == kind.value)).first()
    if account is None:
        account = Account(kind=kind, name=kind.value)
        session.add(account)
        session.flush()
        session.add(Balance(account_id=account.id, amount=0))
        session.flush()
    return account


def lab_balance_query(lab_id: Any) -> Select:
    """The balance (nano-PCU) of the lab ``lab_id``: an id, or a lab id column to correlate
    with as a subquery (a scale request reads it with the lab and the membership:
    ``admission.lab_member_and_balance``). No row before the lab's account exists."""
    return (select(Balance.amount).join(Account, Account.id == Balance.account_id)
            .where(Account.lab_id == lab_id))


def lab_balance(session: Session, lab: Lab) -> int:
    """The lab's balance in nano-PCU without writing anything (0 before its account exists),
    for reads: a GET must not create rows."""
    return session.exec(lab_balance_query(lab.id)).first() or 0


def lab_account(session: Session, lab: Lab) -> Account:
    """The lab's account, created on first use."""
    account = session.exec(select(Account).where(Account.lab_id == lab.id)).first()
    if account is None:
        account = Account(kind=AccountKind.lab, name=f"lab:{lab.name}", lab_id=lab.id)
        session.add(account)
        session.flush()
        session.add(Balance(account_id=account.id, amount=0))
        session.flush()
    return account


def post_transfer(session: Session, *, kind: TransferKind, entries: list[tuple[int, int]],
                  memo: str = "", at: dt.datetime | None = None) -> Transfer:
    """Write a transfer of (account id, nano-PCU) entries and move the balances.

    Raises ValueError unless the entries sum to exactly zero. The caller commits, so entries
    and balances land together or not at all.
    """
    entries = [(a, amt) for a, amt in entries if amt != 0]
    if sum(amt for _, amt in entries) != 0:
        raise ValueError(f"a transfer must sum to zero; entries {entries} do not")
    at = at or utcnow()
    transfer = Transfer(kind=kind, memo=memo, created_at=at)
    session.add(transfer)
    session.flush()
    apply_entries(session, [(transfer.id, a, amt, at) for a, amt in entries])
    return transfer


def apply_entries(session: Session, rows: list[tuple[int, int, int, dt.datetime]]) -> None:
    """Insert (transfer id, account id, amount, time) entries and add them to the balances."""
    if not rows:
        return
    insert_rows(session, LedgerEntry.__table__, [
        {"transfer_id": t, "account_id": a, "amount": amt, "created_at": at}
        for t, a, amt, at in rows])
    totals: dict[int, int] = {}
    for _t, account, amount, _at in rows:
        totals[account] = totals.get(account, 0) + amount
    # Increments, not read-modify-write, so concurrent writers cannot lose an update; in
    # account order, so two writers lock balance rows in the same order and never deadlock.
    for account, amount in sorted(totals.items()):
        session.execute(update(Balance).where(Balance.account_id == account)
                        .values(amount=Balance.amount + amount))


#: Largest balance magnitude a grant may produce, in nano-PCU (4e9 PCU): far below the 64-bit
#: integer columns' limit (9.2e9 PCU), leaving room for usage transfers.
MAX_ABS_BALANCE = 4 * 10**18


def balance(session: Session, account_id: int) -> int:
    """The account's balance in nano-PCU (one primary-key read)."""
    row = session.get(Balance, account_id)
    return row.amount if row else 0


def grant(session: Session, *, lab: Lab, amount: int, memo: str = "") -> Transfer:
    """Give ``amount`` nano-PCU to ``lab`` from the grants account."""
    if amount <= 0:
        raise ValueError("a grant must be more than 0 PCU")
    source = system_account(session, AccountKind.grants)
    target = lab_account(session, lab)
    for account, change in ((target, amount), (source, -amount)):
        if abs(balance(session, account.id) + change) > MAX_ABS_BALANCE:
            raise ValueError(
                f"this grant would take {account.name}'s balance beyond the ledger's largest "
                f"({fmt_pcu(MAX_ABS_BALANCE)}); grant less")
    return post_transfer(session, kind=TransferKind.grant,
                         entries=[(source.id, -amount), (target.id, amount)],
                         memo=memo or f"grant to {lab.name}")
