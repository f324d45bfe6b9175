"""Identity tables: labs and their users. Later issues add institutions, roles and the ledger."""

from __future__ import annotations

import datetime as dt

from sqlmodel import Field, SQLModel


def utcnow() -> dt.datetime:
    """Timezone-aware UTC now; every timestamp in the database is UTC."""
    return dt.datetime.now(dt.UTC)


class LabBase(SQLModel):
    name: str = Field(
        index=True, unique=True, min_length=1, max_length=64, regex=r"^[A-Za-z0-9_.-]+$"
    )
    site: str = Field(default="", max_length=64, description="Site label used for locality.")


class LabCreate(LabBase):
    pass


class Lab(LabBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    created_at: dt.datetime = Field(default_factory=utcnow)


class LabPublic(LabBase):
    id: int


class UserBase(SQLModel):
    name: str = Field(
        index=True, unique=True, min_length=1, max_length=128, regex=r"^[A-Za-z0-9_.@-]+$"
    )


class UserCreate(UserBase):
    pass


class User(UserBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    lab_id: int = Field(foreign_key="lab.id", index=True)
    created_at: dt.datetime = Field(default_factory=utcnow)


class UserPublic(UserBase):
    id: int
    lab: str


def create_lab(session, *, name: str, site: str = "") -> Lab:
    """Insert a lab; the caller commits."""
    lab = Lab(name=name, site=site)
    session.add(lab)
    session.flush()
    return lab


def create_user(session, *, name: str, lab: Lab) -> User:
    """Insert a user in ``lab``; the caller commits."""
    user = User(name=name, lab_id=lab.id)
    session.add(user)
    session.flush()
    return user
