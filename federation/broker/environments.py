"""Clusters' software environments in the broker: stored descriptions and shipped wheels,
which providers can run which environment, and the refusal a user reads when none can.

A provider runs an environment when its agent builds environments with the cluster's Python
version and has not failed to build this one, or when its agent is ``fixed`` and its Python,
dask and distributed match (federation.environment_cache). An agent that predates
environments says nothing and serves every cluster as before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, delete, select

from accounting.models import Lab, utcnow

from ..environment import EnvironmentSpec, Package, environment_hash, fixed_mismatch
from .errors import Conflict, Invalid, NotFound
from .models import (
    HELD_STATES,
    NOT_ENDED,
    ClusterRecord,
    Environment,
    EnvironmentCreate,
    EnvironmentFailure,
    EnvironmentWheel,
    Lease,
    Provider,
)

#: Seconds a failed build keeps a provider from an environment: the lab may add the package to
#: its index meanwhile (an agent that registers again is tried again at once).
FAILURE_TTL = 3600.0
#: The most bytes of wheels one user may keep stored (1 GiB).
MAX_WHEEL_BYTES_PER_USER = 2**30


def spec_of(row: Environment) -> EnvironmentSpec:
    return EnvironmentSpec(row.python, [Package(**p) for p in json.loads(row.packages_json)])


def store(s: Session, body: EnvironmentCreate) -> tuple[str, list[str]]:
    """Store the environment (idempotent: its hash is its id); returns the hash and the
    SHA-256 of the shipped wheels the broker does not have yet. The caller commits."""
    packages = sorted(Package(**p.model_dump()) for p in body.packages)
    digest = environment_hash(body.python, packages)
    if s.get(Environment, digest) is None:
        s.add(Environment(hash=digest, python=body.python,
                          packages_json=json.dumps([p.__dict__ for p in packages])))
    return digest, missing_wheels(s, packages)


def missing_wheels(s: Session, packages: list[Package]) -> list[str]:
    wanted = {p.sha256 for p in packages if p.shipped}
    if not wanted:
        return []
    have = set(s.exec(select(EnvironmentWheel.sha256).where(
        col(EnvironmentWheel.sha256).in_(wanted))))
    return sorted(wanted - have)


def store_wheel(s: Session, user_id: int, sha256: str, filename: str, data: bytes) -> bool:
    """Keep a shipped wheel; False when it was already there. The caller commits."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise Invalid("wheel-damaged", "the wheel's SHA-256 differs from the one in its URL; "
                      "upload it again")
    if s.get(EnvironmentWheel, sha256) is not None:
        return False
    used = sum(s.exec(select(EnvironmentWheel.size).where(
        EnvironmentWheel.user_id == user_id)))
    if used + len(data) > MAX_WHEEL_BYTES_PER_USER:
        raise Conflict("wheel-quota", f"your shipped wheels would take "
                       f"{(used + len(data)) / 2**20:.0f} MiB of the broker's storage; the "
                       f"most is {MAX_WHEEL_BYTES_PER_USER // 2**20} MiB per user. Publish "
                       "large packages on your lab's package index")
    s.add(EnvironmentWheel(sha256=sha256, filename=filename, size=len(data), data=data,
                           user_id=user_id))
    return True


def check_usable(s: Session, digest: str) -> None:
    """A cluster may name ``digest`` once it is stored with every wheel it ships."""
    row = s.get(Environment, digest)
    if row is None:
        raise NotFound("unknown-environment", f"no environment {digest}; describe it first "
                       "with POST /api/v1/environments")
    missing = missing_wheels(s, spec_of(row).packages)
    if missing:
        raise Conflict("wheels-missing", f"environment {digest} ships {len(missing)} wheels "
                       "the broker does not have yet; upload them with PUT "
                       "/api/v1/environments/wheels/<sha256>")


class ProviderLike(Protocol):
    """What the refusals read of a provider: a ``Provider`` row, or a placement pass's
    ``OnlineProvider``."""

    id: str
    name: str
    lab_id: int

    @property
    def environment(self) -> dict[str, str]: ...


def where(provider: ProviderLike, lab: str) -> str:
    return f"{provider.name} (lab {lab})"


def refusal(provider: ProviderLike, lab: str, spec: EnvironmentSpec,
            failures: dict[str, str]) -> str | None:
    """Why ``provider`` cannot run ``spec``, or None when it can."""
    info = provider.environment
    if not info:
        return None
    if provider.id in failures:
        return failures[provider.id]
    if info.get("mode") == "fixed":
        return fixed_mismatch(spec, info, where(provider, lab))
    if info.get("python") and info["python"] != spec.python:
        return (f"{where(provider, lab)} has Python {info['python']}; this cluster's "
                f"environment needs Python {spec.python}")
    return None


def failures_of(s: Session, digest: str) -> dict[str, str]:
    """Provider id -> why it could not build ``digest`` (failures within FAILURE_TTL)."""
    since = utcnow() - dt.timedelta(seconds=FAILURE_TTL)
    return {f.provider_id: f.message for f in s.exec(select(EnvironmentFailure).where(
        EnvironmentFailure.environment == digest, EnvironmentFailure.created_at >= since))}


def forget_failures(s: Session, provider_id: str) -> None:
    """The provider's agent registered again (its index or mode may have changed): its
    failed builds are tried again. The caller commits."""
    s.exec(delete(EnvironmentFailure).where(EnvironmentFailure.provider_id == provider_id))


def refusals(s: Session, cluster: ClusterRecord, providers: Sequence[ProviderLike],
             lab_names: dict[int, str] | None = None) -> dict[str, str]:
    """Provider id -> why it cannot run the cluster's environment (only those that cannot)."""
    if not cluster.environment:
        return {}
    row = s.get(Environment, cluster.environment)
    spec = spec_of(row)
    failures = failures_of(s, row.hash)
    labs = lab_names if lab_names is not None else {
        lab.id: lab.name for lab in s.exec(select(Lab))}
    out = {}
    for p in providers:
        why = refusal(p, labs.get(p.lab_id, "?"), spec, failures)
        if why:
            out[p.id] = why
    return out


def allowed_providers(s: Session, cluster: ClusterRecord) -> list[Provider]:
    """The online providers the cluster's lab and site restrictions allow."""
    labs_allowed = set(json.loads(cluster.allowed_labs_json))
    sites_allowed = set(json.loads(cluster.allowed_sites_json))
    names = {lab.id: lab.name for lab in s.exec(select(Lab))}
    return [p for p in s.exec(select(Provider).where(Provider.online == True))  # noqa: E712
            if (not labs_allowed or names.get(p.lab_id) in labs_allowed)
            and (not sites_allowed or p.site in sites_allowed)]


def refusal_reasons(reasons: dict[str, str]) -> str:
    """The distinct reasons, the first four in full."""
    distinct = list(dict.fromkeys(reasons.values()))
    return "; ".join(distinct[:4]) + (f"; and {len(distinct) - 4} more" if len(distinct) > 4
                                      else "")


def refusal_message(reasons: dict[str, str]) -> str:
    return ("no online provider can run this cluster's software environment: "
            + refusal_reasons(reasons))


def check_servable(s: Session, cluster: ClusterRecord) -> None:
    """Refuse new leases (before anything is billed) when every online provider the cluster
    may use refuses its environment; with none online, leases wait as before."""
    if not cluster.environment:
        return
    providers = allowed_providers(s, cluster)
    reasons = refusals(s, cluster, providers)
    if providers and len(reasons) == len(providers):
        raise Conflict("environment-refused", refusal_message(reasons))


def record_failure(s: Session, lease: Lease, provider_id: str, message: str) -> None:
    """The provider could not build the lease's cluster's environment: placement avoids it
    for that environment from now on. The caller commits."""
    cluster = s.get(ClusterRecord, lease.cluster_id)
    if cluster is None or not cluster.environment:
        return
    # Two leases of one environment may fail on one machine at once: one row stands, the
    # latest failure's.
    insert = (pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert)
    values = {"message": message[:2000], "created_at": utcnow()}
    s.exec(insert(EnvironmentFailure).values(
        environment=cluster.environment, provider_id=provider_id, **values)
        .on_conflict_do_update(index_elements=["environment", "provider_id"], set_=values))


def provider_may_read(s: Session, provider_id: str, digest: str) -> bool:
    """True when the provider holds a lease of a cluster that needs ``digest``."""
    return s.exec(select(Lease.id).join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
                  .where(Lease.provider_id == provider_id, NOT_ENDED,
                         col(Lease.state).in_(HELD_STATES),
                         ClusterRecord.environment == digest).limit(1)).first() is not None
