"""Rows inserted in bulk (``accounting.bulk.insert_rows``: COPY on PostgreSQL, an
executemany on SQLite) read back as they were given, and fail as any insert does."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from accounting.bulk import insert_rows
from accounting.ledger import LedgerEntry, Transfer, TransferKind, lab_account
from accounting.models import create_lab
from federation.broker import db

AT = dt.datetime(2026, 5, 1, 12, 30, 15, 250_000, tzinfo=dt.timezone(dt.timedelta(hours=2)))


def test_rows_read_back_as_given_and_a_broken_row_fails_the_insert(db_url):
    engine = db.make_engine(db_url)
    try:
        with db.session(engine) as s:
            lab = create_lab(s, name="lab-a")
            account = lab_account(s, lab).id
            transfer = Transfer(kind=TransferKind.adjustment, memo="", created_at=AT)
            s.add(transfer)
            s.commit()
            rows = [{"transfer_id": transfer.id, "account_id": account, "amount": amount,
                     "created_at": AT + dt.timedelta(seconds=i)}
                    for i, amount in enumerate([-(2**62), 0, 7, 2**62])]
            insert_rows(s, LedgerEntry.__table__, rows)
            s.commit()
            back = s.exec(select(LedgerEntry).where(LedgerEntry.transfer_id == transfer.id)
                          .order_by(LedgerEntry.created_at)).all()
            assert [(e.account_id, e.amount) for e in back] == [
                (account, r["amount"]) for r in rows]
            # The same instants, in UTC: the +02:00 offset was honoured, not dropped.
            assert [db_utc(e.created_at) for e in back] == [
                r["created_at"].astimezone(dt.UTC) for r in rows]

            # A row without an amount: the whole insert fails, nothing is written.
            with pytest.raises(IntegrityError):
                insert_rows(s, LedgerEntry.__table__, [
                    dict(rows[0]), dict(rows[0], amount=None)])
                s.flush()
            s.rollback()
            assert len(s.exec(select(LedgerEntry).where(
                LedgerEntry.transfer_id == transfer.id)).all()) == len(rows)

            # A naive time is refused, as in any insert of an aware column.
            with pytest.raises(Exception, match="timezone"):
                insert_rows(s, LedgerEntry.__table__, [
                    dict(rows[0], created_at=AT.replace(tzinfo=None))])
            s.rollback()
    finally:
        engine.dispose()


def db_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
