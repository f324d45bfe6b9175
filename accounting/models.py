"""Identity tables: labs and their users. Later issues add institutions, roles and the ledger."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel

from .identifiers import NAME_RULES, LabName, OptionalSiteName, UserName


def utcnow() -> dt.datetime:
    """Timezone-aware UTC now; every timestamp in the database is UTC."""
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC time; naive values (as some drivers return) are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class Institution(SQLModel, table=True):
    """A university or institute; its labs share its identity provider (issue 4)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, min_length=1, max_length=128)


class Role(StrEnum):
    member = "member"
    pi = "pi"
    admin = "admin"


class LabPolicy(SQLModel):
    """What an administrator sets per lab: fair-share weight, credit limit and quotas."""

    share: float = Field(default=1.0, gt=0, le=1e6,
                         description="Fair-share weight; capacity is shared in proportion.")
    credit_limit: float = Field(default=0.0, ge=0, le=1e12,
                                description="PCU a lab may go below zero before new workers "
                                            "are refused; 0 means no credit.")
    max_cpus: float | None = Field(default=None, ge=0, le=1e7,
                                   description="Most CPUs the lab's users may hold at once; "
                                               "None means no limit.")
    max_gpus: int | None = Field(default=None, ge=0, le=1_000_000,
                                 description="Most GPUs the lab's users may hold at once; "
                                             "None means no limit.")
    provider_max_cpus: int = Field(
        default=256, ge=1, le=4096,
        description="Most CPU cores one of the lab's provider machines may offer (default 256).")
    provider_max_memory: int = Field(
        default=2 * 2**40, ge=2**28, le=64 * 2**40, sa_type=BigInteger,
        description="Most memory in bytes one of the lab's machines may offer (default 2 TiB).")
    provider_max_gpus: int = Field(
        default=16, ge=0, le=64,
        description="Most GPUs one of the lab's provider machines may offer (default 16).")


class LabBase(LabPolicy):
    name: LabName = Field(index=True, unique=True, min_length=1, max_length=64,
                          description="Lab name: " + NAME_RULES["lab"] + ".")
    site: OptionalSiteName = Field(default="", max_length=64,
                                   description="Site label used for locality.")


class LabCreate(LabBase):
    institution: str | None = Field(default=None, max_length=128)


class LabUpdate(SQLModel):
    share: float | None = Field(default=None, gt=0, le=1e6)
    credit_limit: float | None = Field(default=None, ge=0, le=1e12)
    max_cpus: float | None = Field(default=None, ge=0, le=1e7)
    max_gpus: int | None = Field(default=None, ge=0, le=1_000_000)
    provider_max_cpus: int | None = Field(default=None, ge=1, le=4096)
    provider_max_memory: int | None = Field(default=None, ge=2**28, le=64 * 2**40)
    provider_max_gpus: int | None = Field(default=None, ge=0, le=64)
    clear_quotas: bool = Field(default=False, description="Remove max_cpus and max_gpus.")


class Lab(LabBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    institution_id: int | None = Field(default=None, foreign_key="institution.id")
    created_at: dt.datetime = Field(default_factory=utcnow)


class LabPublic(LabBase):
    id: int


class UserBase(SQLModel):
    name: UserName = Field(index=True, unique=True, min_length=1, max_length=128,
                           description="User name: " + NAME_RULES["user"] + ".")


class UserCreate(UserBase):
    pass


class User(UserBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    lab_id: int = Field(foreign_key="lab.id", index=True)
    created_at: dt.datetime = Field(default_factory=utcnow)


class UserPublic(UserBase):
    id: int
    lab: str


class Membership(SQLModel, table=True):
    """A user's role in a lab, with optional per-user quotas there."""

    user_id: int = Field(foreign_key="user.id", primary_key=True)
    lab_id: int = Field(foreign_key="lab.id", primary_key=True)
    role: Role = Role.member
    max_cpus: float | None = Field(default=None, ge=0)
    max_gpus: int | None = Field(default=None, ge=0)


def names_by_id(session, model, ids) -> dict:
    """id → name of the rows of ``model`` (any table with id and name) among ``ids``; one
    query, and only those rows, however large the table."""
    from sqlmodel import col, select

    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    return dict(session.exec(select(model.id, model.name)
                             .where(col(model.id).in_(wanted))).all())


def create_lab(session, *, name: str, site: str = "", institution: str | None = None,
               policy: LabPolicy | None = None) -> Lab:
    """Insert a lab (and its institution when new); the caller commits."""
    from sqlmodel import select

    institution_id = None
    if institution:
        inst = session.exec(select(Institution).where(Institution.name == institution)).first()
        if inst is None:
            inst = Institution(name=institution)
            session.add(inst)
            session.flush()
        institution_id = inst.id
    lab = Lab(name=name, site=site, institution_id=institution_id,
              **(policy.model_dump() if policy else {}))
    session.add(lab)
    session.flush()
    return lab


def create_user(session, *, name: str, lab: Lab, role: Role = Role.member) -> User:
    """Insert a user whose home lab is ``lab``, with a membership there; the caller commits."""
    user = User(name=name, lab_id=lab.id)
    session.add(user)
    session.flush()
    session.add(Membership(user_id=user.id, lab_id=lab.id, role=role))
    session.flush()
    return user
