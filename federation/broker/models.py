"""Broker tables (tokens, providers, clusters, leases) and the request/response schemas."""

from __future__ import annotations

import datetime as dt
import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import StringConstraints, field_validator, model_validator
from sqlalchemy import BigInteger, Index, LargeBinary, and_, or_
from sqlmodel import Field, SQLModel, col

from accounting.identifiers import (
    Label,
    LabName,
    OptionalLabel,
    ProviderName,
    SiteName,
    UserName,
)
from accounting.models import utcnow

from ..ids import ENVIRONMENT_HASH

# The lease state machine lives in federation.lease_states; its names are re-exported here.
from ..lease_states import HELD_STATES, LIVE_STATES, EndReason, LeaseState  # noqa: F401
from ..sizes import MiB, TiB, parse_memory
from .id_params import LeaseId


class TokenKind(StrEnum):
    admin = "admin"
    user = "user"
    provider = "provider"


class ApiToken(SQLModel, table=True):
    id: str = Field(primary_key=True)
    kind: TokenKind
    token_hash: str = Field(index=True, unique=True)
    lab_id: int | None = Field(default=None, foreign_key="lab.id")
    user_id: int | None = Field(default=None, foreign_key="user.id")
    created_at: dt.datetime = Field(default_factory=utcnow)
    revoked_at: dt.datetime | None = None


class Provider(SQLModel, table=True):
    id: str = Field(primary_key=True)
    lab_id: int = Field(foreign_key="lab.id", index=True)
    token_id: str = Field(foreign_key="apitoken.id", index=True)
    name: str = Field(index=True)
    site: str = ""
    cpus: float
    memory: int = Field(sa_type=BigInteger, description="Bytes offered.")
    gpus_json: str = "[]"
    online: bool = True
    offering: bool = Field(default=True, description="False while the owner's policy keeps "
                           "the machine for its owner: nothing new is placed there.")
    offer_note: str = Field(default="", description="Why the agent offers or withholds its "
                            "capacity, as its owner policy says.")
    accepts_peers: bool = Field(default=True, description="Whether its workers accept "
                                "connections from other sites (False behind NAT or a "
                                "firewall: a cluster using it stays within its site).")
    environment_json: str = Field(default="{}", description="How the agent provides "
                                  "clusters' environments: mode (build or fixed) and its "
                                  "python, dask and distributed versions.")
    environments_json: str = Field(default="[]", description="Hashes of the environments "
                                   "built and ready on the machine (placement prefers them).")
    registered_at: dt.datetime = Field(default_factory=utcnow)
    last_seen: dt.datetime = Field(default_factory=utcnow)

    @property
    def environment(self) -> dict[str, str]:
        return json.loads(self.environment_json)

    @property
    def environments(self) -> list[str]:
        return json.loads(self.environments_json)

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return json.loads(self.gpus_json)


class ClusterRecord(SQLModel, table=True):
    __tablename__ = "cluster"
    id: str = Field(primary_key=True)
    name: str = ""
    user_id: int = Field(foreign_key="user.id", index=True)
    lab_id: int = Field(foreign_key="lab.id", index=True)
    scheduler_address: str
    ca_cert: str
    allowed_labs_json: str = Field(default="[]", description="Labs the owner allows; [] any.")
    allowed_sites_json: str = Field(default="[]", description="Sites the owner allows; [] any.")
    active: bool = True
    end_reason: str | None = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    last_seen: dt.datetime = Field(default_factory=utcnow)
    closed_at: dt.datetime | None = None
    dashboard_port: int | None = Field(default=None, description="The port of the scheduler's "
                                       "Dask dashboard, on the scheduler's host; None: none.")
    dashboard_key_hash: str | None = Field(default=None, description="SHA-256 (hex) of the "
                                           "secret in the cluster's dashboard link.")
    environment: str | None = Field(default=None, description="The hash of the software "
                                    "environment its workers need; None: the agents' own.")


#: The clusters still open, a few hundred among every notebook's cluster the federation ever
#: had: the reaper looks for silent ones every second, and by ``active`` alone that was a
#: scan of the cluster table, certificates and all (0.19 s beside 200,000 closed clusters).
#: Keyed by id, not by ``last_seen``, so a cluster heartbeat's update stays in place (HOT).
ACTIVE_CLUSTER = ClusterRecord.active == True  # noqa: E712
Index("ix_cluster_active", ClusterRecord.id,
      postgresql_where=ACTIVE_CLUSTER, sqlite_where=ACTIVE_CLUSTER)
#: The newest clusters first, in the listing's order (``GET /clusters``, 200 by default, of
#: every cluster the federation ever had; migration 0021).
Index("ix_cluster_created_at_id", ClusterRecord.created_at, ClusterRecord.id)


class Environment(SQLModel, table=True):
    """A software environment a cluster described (federation.environment)."""

    hash: str = Field(primary_key=True, max_length=32)
    python: str
    packages_json: str = Field(description="[{name, version, source, sha256, filename}]")
    created_at: dt.datetime = Field(default_factory=utcnow)


class EnvironmentWheel(SQLModel, table=True):
    """A wheel a user shipped for a local or editable package, by its SHA-256."""

    __tablename__ = "environment_wheel"
    sha256: str = Field(primary_key=True, max_length=64)
    filename: str
    size: int = Field(sa_type=BigInteger)
    data: bytes = Field(sa_type=LargeBinary)
    user_id: int = Field(foreign_key="user.id")
    created_at: dt.datetime = Field(default_factory=utcnow)


class EnvironmentFailure(SQLModel, table=True):
    """An environment a provider could not build (placement sends it elsewhere)."""

    __tablename__ = "environment_failure"
    environment: str = Field(primary_key=True, foreign_key="environment.hash")
    provider_id: str = Field(primary_key=True, foreign_key="provider.id")
    message: str = ""
    created_at: dt.datetime = Field(default_factory=utcnow)


class BrokerLeader(SQLModel, table=True):
    """Which broker replica runs the periodic passes, until when (database time)."""

    __tablename__ = "broker_leader"
    name: str = Field(primary_key=True)
    holder: str = ""
    expires_at: dt.datetime = Field(default_factory=utcnow)


class Lease(SQLModel, table=True):
    # A cluster's and a machine's leases are found with their end time, so a read of the
    # ones not ended (``NOT_ENDED``) or ended lately skips the rest of their history: by
    # cluster or machine alone, each cluster heartbeat and agent heartbeat batch read every
    # lease its cluster or machine ever had, a year of them on a busy machine (migration
    # 0014).
    __table_args__ = (Index("ix_lease_cluster_id_ended_at", "cluster_id", "ended_at"),
                      Index("ix_lease_provider_id_ended_at", "provider_id", "ended_at"))

    id: str = Field(primary_key=True)
    cluster_id: str = Field(foreign_key="cluster.id")
    provider_id: str | None = Field(default=None, foreign_key="provider.id")
    group: str = "default"
    cpus: float
    memory: int = Field(sa_type=BigInteger, description="Bytes reserved.")
    gpus: int = 0
    gpu_model: str | None = Field(default=None, description="The GPU model the user asked for "
                                  "(a class or words of a model name), if any.")
    gpu_indices_json: str = "[]"
    placed_gpu_model: str | None = Field(default=None, description="The model of the GPUs the "
                                         "lease was placed on; what it is priced by.")
    state: LeaseState = Field(default=LeaseState.pending, index=True)
    release_reason: EndReason | None = Field(default=None, description="While releasing: the "
                                             "reason the lease will end with (its target).")
    end_reason: EndReason | None = None
    message: str = ""
    worker_csr: str = Field(default="", description="The agent's signing request (PEM) for "
                            "the worker's key, which never leaves the provider machine.")
    worker_cert: str = Field(default="", description="The cluster's certificate over it.")
    # Indexed for the dashboard's wait times, which read the leases asked for in a period
    # (migration 0018); a lease's creation time never changes, so updates stay in place.
    created_at: dt.datetime = Field(default_factory=utcnow, index=True)
    assigned_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    releasing_at: dt.datetime | None = None
    metered_until: dt.datetime | None = None
    suspensions_json: str = Field(default="[]", description="Spans the lease was suspended for "
                                  "its machine's owner, as [[start, end or null], ...] in ISO "
                                  "8601; not metered.")

    @property
    def gpu_indices(self) -> list[int]:
        return json.loads(self.gpu_indices_json)

    @property
    def priced_gpu_model(self) -> str | None:
        """The model a GPU lease is charged for: the one it runs on, once placed."""
        return self.placed_gpu_model or self.gpu_model


#: A lease not ended, as a condition the (cluster, end) and (machine, end) indexes answer: a
#: lease has an end time exactly when it has ended (``lease_states.move`` writes both), so
#: beside a condition on ``state`` this one adds no meaning, only the index's reach.
NOT_ENDED = col(Lease.ended_at).is_(None)

#: Leases that ended after they started and whose last part is not charged yet (the end
#: meterer's next batch, or the periodic pass, charges it): a handful at any time among every
#: lease that ever ended, found by a partial index of their own (migration 0014) by each
#: metering pass and each page of the job-record feed.
END_NOT_CHARGED = and_(Lease.state == LeaseState.ended,
                       col(Lease.started_at).is_not(None),
                       or_(col(Lease.metered_until).is_(None),
                           col(Lease.metered_until) < col(Lease.ended_at)))
Index("ix_lease_end_not_charged", Lease.ended_at,
      postgresql_where=END_NOT_CHARGED, sqlite_where=END_NOT_CHARGED)
def ended_after(cursor: tuple[dt.datetime, str]):
    """Leases that ended after ``cursor`` (an end time and a lease id) in the order
    (ended_at, id): the job-record feed's pages and the prune's batches walk the ended
    leases so, by the index below."""
    at, lease_id = cursor
    return or_(Lease.ended_at > at, and_(Lease.ended_at == at, Lease.id > lease_id))


#: The ended leases by end time, for the job-record feed's pages (partial: a lease enters it
#: once, when it ends, not at each of its earlier moves).
Index("ix_lease_ended_at_id", Lease.ended_at, Lease.id,
      postgresql_where=col(Lease.ended_at).is_not(None),
      sqlite_where=col(Lease.ended_at).is_not(None))


# ---- request / response schemas -------------------------------------------------------------


#: Bounds of one worker and of one provider machine; a lease is never a fraction of a thread
#: or a fraction of the machine's memory (Dask reads a memory limit <= 1 as a fraction).
MIN_WORKER_MEMORY = 256 * MiB
MAX_WORKER_CPUS = 512
MAX_WORKER_MEMORY = 16 * TiB
MAX_WORKER_GPUS = 16
MAX_PROVIDER_CPUS = 4096
MAX_PROVIDER_MEMORY = 64 * TiB
MAX_PROVIDER_GPUS = 64


class WorkerSpec(SQLModel):
    """The size of one worker: whole threads, at least 256 MiB, whole GPUs."""

    cpus: int = Field(ge=1, le=MAX_WORKER_CPUS,
                      description="CPU cores per worker: a whole number of threads, 1 to 512.")
    memory: int = Field(ge=MIN_WORKER_MEMORY, le=MAX_WORKER_MEMORY,
                        description="Memory per worker in bytes, 256 MiB to 16 TiB; strings "
                                    "like '4 GiB' accepted.")
    gpus: int = Field(default=0, ge=0, le=MAX_WORKER_GPUS, description="Whole GPUs per worker.")
    gpu_model: Label | None = Field(default=None, max_length=64)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return parse_memory(value)


class GpuInfo(SQLModel):
    index: int = Field(ge=0, lt=MAX_PROVIDER_GPUS)
    model: Label = Field(min_length=1, max_length=128)
    memory: int = Field(ge=0, le=4 * TiB, description="GPU memory in bytes.")


#: An environment's hash (federation.environment.environment_hash).
EnvironmentHash = Annotated[str, StringConstraints(pattern=ENVIRONMENT_HASH)]
#: What a wheel's file name may be (PEP 427 characters only).
WHEEL_NAME = r"^[A-Za-z0-9_.+!-]{1,200}\.whl$"


DistName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
                                            max_length=200)]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.+!_-]+$", max_length=128)]
OptionalVersion = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.+!_-]*$",
                                                   max_length=64)]
OptionalSha256 = Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{64})?$")]
OptionalWheelName = Annotated[str, StringConstraints(pattern=r"^([A-Za-z0-9_.+!-]+\.whl)?$",
                                                     max_length=204)]
PythonVersion = Annotated[str, StringConstraints(pattern=r"^3\.[0-9]{1,2}$")]
OptionalPythonVersion = Annotated[str, StringConstraints(pattern=r"^(3\.[0-9]{1,2})?$")]


class PackageSpec(SQLModel):
    """One distribution of a cluster's environment."""

    name: DistName = Field(description="Normalised distribution name (PEP 503).")
    version: Version
    source: Literal["index", "local", "git", "editable"] = "index"
    sha256: OptionalSha256 = Field(default="", description="The shipped wheel's SHA-256 "
                                   "(local and editable packages only).")
    filename: OptionalWheelName = Field(default="", description="The shipped wheel's name.")

    @model_validator(mode="after")
    def _shipped_has_wheel(self) -> PackageSpec:
        if self.source != "index" and not (self.filename and self.sha256):
            raise ValueError(f"a {self.source} package needs the sha256 and filename of its "
                             "wheel")
        if self.source == "index" and (self.filename or self.sha256):
            raise ValueError("a package from the index ships no wheel (no sha256, filename)")
        return self


class EnvironmentCreate(SQLModel):
    """A cluster's software environment (federation.environment.describe)."""

    python: PythonVersion = Field(description="Python major.minor, e.g. 3.11.")
    packages: list[PackageSpec] = Field(max_length=5000)

    @field_validator("packages")
    @classmethod
    def _distinct(cls, value: list[PackageSpec]) -> list[PackageSpec]:
        if len({p.name for p in value}) != len(value):
            raise ValueError("each package may be listed once")
        return value


class ProviderEnvironment(SQLModel):
    """How an agent provides environments (``parallex provide --environment``)."""

    mode: Literal["build", "fixed"] = Field(
        default="build", description="build: builds each cluster's environment with uv; "
                                     "fixed: serves only clusters that match its own.")
    python: OptionalPythonVersion = ""
    dask: OptionalVersion = ""
    distributed: OptionalVersion = ""


class ProviderRegister(SQLModel):
    name: ProviderName = Field(min_length=1, max_length=128)
    site: SiteName | None = Field(default=None, max_length=64)
    cpus: int = Field(ge=1, le=MAX_PROVIDER_CPUS,
                      description="Whole CPU cores offered, 1 to 4096.")
    memory: int = Field(ge=MIN_WORKER_MEMORY, le=MAX_PROVIDER_MEMORY,
                        description="Memory offered in bytes, 256 MiB to 64 TiB.")
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=MAX_PROVIDER_GPUS)
    accepts_peers: bool = Field(default=True, description="Whether this machine's workers "
                                "accept connections from other sites.")
    environment: ProviderEnvironment | None = Field(
        default=None, description="How it provides clusters' environments; None: an agent "
                                  "that predates environments (serves any cluster as is).")

    @field_validator("gpus")
    @classmethod
    def _distinct_gpus(cls, value: list[GpuInfo]) -> list[GpuInfo]:
        if len({g.index for g in value}) != len(value):
            raise ValueError("GPU indices must differ")
        return value

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return parse_memory(value)


class ProviderHeartbeat(SQLModel):
    running: list[LeaseId] = Field(
        max_length=10_000, description="Lease ids whose worker process is alive (required: "
                                       "an empty list says no worker runs)."
    )
    offering: bool = Field(default=True, description="False while the owner's policy keeps "
                           "the machine for its owner (nothing new is placed there).")
    offer_note: str = Field(default="", max_length=300,
                            description="Why, as the agent's owner policy says.")
    environments: list[EnvironmentHash] | None = Field(
        default=None, max_length=1000, description="Hashes of the environments ready on the "
                                                   "machine; None leaves the last list.")


class LeaseStateReport(SQLModel):
    state: LeaseState
    reason: EndReason | None = None
    message: str = Field(default="", max_length=2000)
    environment_error: bool = Field(
        default=False, description="With state 'ended': the lease failed because the "
                                   "cluster's environment cannot be built on this provider.")


class ClusterCreate(SQLModel):
    name: OptionalLabel = Field(default="", max_length=128)
    scheduler_address: str = Field(min_length=6, max_length=512)
    ca_cert: str = Field(min_length=1, max_length=20_000)
    labs: list[LabName] = Field(default_factory=list, max_length=100,
                                description="Only these labs' machines may host the cluster's "
                                            "workers (e.g. for sensitive data); [] means any.")
    sites: list[SiteName] = Field(default_factory=list, max_length=100,
                                  description="Only machines at these sites; [] means any.")
    dashboard_port: int | None = Field(default=None, ge=1, le=65535,
                                       description="The port of the scheduler's Dask dashboard "
                                                   "(on the scheduler's host), which the broker "
                                                   "then serves at the cluster's dashboard link.")
    environment: EnvironmentHash | None = Field(
        default=None, description="The environment its workers need (POST /environments "
                                  "first); None: whatever the agents run.")

    @field_validator("scheduler_address")
    @classmethod
    def _tls_only(cls, value: str) -> str:
        if not value.startswith("tls://"):
            raise ValueError("scheduler_address must be a tls:// address; workers only use TLS")
        return value


class ClusterEnvironment(SQLModel):
    environment: EnvironmentHash = Field(description="The hash of the cluster's new "
                                         "environment (POST /environments first).")


class ClusterHeartbeat(SQLModel):
    connected: list[LeaseId] = Field(
        default_factory=list, max_length=10_000,
        description="Leases whose workers have joined the cluster's scheduler.")


class LeaseSlot(SQLModel):
    lease_id: LeaseId = Field(min_length=8, max_length=64,
                              description="The id the cluster gives the lease (its worker's "
                                          "name and certificate CN).")


class SigningRequest(SQLModel):
    csr: str = Field(min_length=1, max_length=20_000,
                     description="PEM certificate signing request for the worker's key.")


class WorkerCertificate(SQLModel):
    lease_id: LeaseId = Field(min_length=8, max_length=64)
    cert: str = Field(min_length=1, max_length=20_000,
                      description="PEM worker certificate signed by the cluster's CA.")


class WorkerCertificates(SQLModel):
    certificates: list[WorkerCertificate] = Field(min_length=1, max_length=1000)


class LeaseCreate(SQLModel):
    spec: WorkerSpec
    group: SiteName = Field(default="default", min_length=1, max_length=64)
    workers: list[LeaseSlot] = Field(min_length=1, max_length=1000)


class LeaseRelease(SQLModel):
    lease_ids: list[LeaseId] = Field(min_length=1, max_length=10_000)


class TokenCreate(SQLModel):
    kind: TokenKind
    lab: LabName = Field(min_length=1, max_length=64)
    user: UserName | None = Field(default=None, max_length=128)


class LeasePublic(SQLModel):
    id: str
    cluster_id: str
    provider_id: str | None
    lab: str | None = None
    group: str
    cpus: float
    memory: int
    gpus: int
    gpu_model: str | None
    placed_gpu_model: str | None = None
    state: LeaseState
    release_reason: EndReason | None = None
    end_reason: EndReason | None
    message: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None


class ClusterPublic(SQLModel):
    id: str
    name: str
    user: str
    lab: str
    scheduler_address: str
    labs: list[str] = Field(default_factory=list)
    sites: list[str] = Field(default_factory=list)
    active: bool
    end_reason: str | None
    created_at: dt.datetime
    leases: list[LeasePublic] = Field(default_factory=list)
    #: Where the cluster's scheduler (in the hub's network) dials the federation gateway to
    #: reach its workers, when the federation has one; workers dial its public address.
    gateway_internal: str | None = None
    #: Only in the answer to the cluster's creation, to its owner: the path (under the broker's
    #: URL) where the broker serves the cluster's Dask dashboard; it holds the link's secret.
    dashboard_path: str | None = None
