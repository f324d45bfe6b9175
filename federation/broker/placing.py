"""Placement orchestration: one pass that reads the pending leases and the providers' free
capacity, orders the leases by fair share, lets ``federation.placement`` (pure) choose, and
writes the result. What still waits gets the reason (``placement.why_waiting``).

A pass must not overlap another on the same data: the service runs it inside its exclusive
section, and ``lock_across_processes`` makes other broker processes on one PostgreSQL wait.
Releases, closes and admissions do not take that lock (they would queue behind every pass):
the pass locks the pending leases it reads (``FOR UPDATE SKIP LOCKED``), so a release that
holds a lease's row makes the pass leave that lease alone, and one that comes later waits
for the pass and finds the lease placed; admissions of one lab wait on each other where a
quota applies (``lock_lab_admissions``), since placing consumes capacity but no quota or
credit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from collections import Counter
from typing import Any

from sqlalchemy import BigInteger, cast, func, text
from sqlmodel import Session, col, select

from accounting import fairshare
from accounting.models import Lab, utcnow

from .. import placement
from ..lease_states import move
from . import environments
from .models import HELD_STATES, NOT_ENDED, ClusterRecord, Lease, LeaseState, Provider
from .preemption import RecentPreemptionRates, preemption_rates

#: Key of the PostgreSQL advisory lock that serialises placement and admission across broker
#: processes (any fixed 64-bit number no other application on the database uses).
PLACEMENT_LOCK = 0x7061726C6C6578  # "parllex"


def lock_across_processes(s: Session) -> None:
    """On PostgreSQL, hold the placement lock for the rest of ``s``'s transaction (SQLite
    has one writer at a time anyway)."""
    if s.get_bind().dialect.name == "postgresql":
        s.exec(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=PLACEMENT_LOCK))


#: First key of the PostgreSQL advisory locks that serialise one lab's admissions (the second
#: is the lab's id): two scale requests of a lab checked at once would both fit a quota.
ADMISSION_LOCK = 0x7061646D  # "padm"


def lock_lab_admissions(s: Session, lab_id: int) -> None:
    """On PostgreSQL, hold the lab's admission lock for the rest of ``s``'s transaction."""
    if s.get_bind().dialect.name == "postgresql":
        s.exec(text("SELECT pg_advisory_xact_lock(:key, :lab)").bindparams(
            key=ADMISSION_LOCK, lab=lab_id))


#: Salt of the PostgreSQL advisory locks that serialise the registrations of one machine (a
#: lab and a name), so that a machine registering twice at once makes one row.
REGISTRATION_LOCK = b"parallex-registration"


def lock_machine_registration(s: Session, lab_id: int, name: str) -> None:
    """On PostgreSQL, hold the lock of the lab's machine ``name`` for the rest of ``s``'s
    transaction. Per machine, not per lab: a lab's fifty machines registering together (a
    site's agents started at once) waited on each other for up to 1.8 s in issue 14's load
    benchmark, though only registrations of one name can collide. The key is a 64-bit
    digest of the lab and the name (one-key advisory locks; the placement and migration locks
    are the other one-key locks, and a digest equal to one of them, a 2^-64 chance, would
    only make a registration wait for a pass or a migration)."""
    if s.get_bind().dialect.name == "postgresql":
        digest = hashlib.blake2b(f"{lab_id}/{name}".encode(), digest_size=8,
                                 key=REGISTRATION_LOCK).digest()
        s.exec(text("SELECT pg_advisory_xact_lock(:key)").bindparams(
            key=int.from_bytes(digest, "big", signed=True)))


@dataclasses.dataclass
class Usage:
    """What a provider's held leases (starting, running, releasing, suspended) take of it."""

    cpus: float = 0.0
    memory: int = 0
    gpu_indices: set[int] = dataclasses.field(default_factory=set)


def _held_gpu_indices(s: Session) -> dict[str, set[int]]:
    """Per provider, the GPU indices its held leases use (GPU leases only: few rows)."""
    out: dict[str, set[int]] = {}
    for pid, indices in s.exec(select(Lease.provider_id, Lease.gpu_indices_json)
                               .where(col(Lease.state).in_(HELD_STATES), Lease.gpus > 0)).all():
        out.setdefault(pid, set()).update(json.loads(indices or "[]"))
    return out


#: Parsed provider JSON columns by their text. A pass reads every online provider, and a
#: provider's GPUs and environment columns rarely change: parsing 1,000 providers' columns
#: took ~40 ms of a pass under issue 14's load. The parsed values are shared: read-only.
_parse_json = functools.lru_cache(maxsize=16_384)(json.loads)


@functools.lru_cache(maxsize=16_384)
def _parse_hashes(text_: str) -> frozenset[str]:
    return frozenset(json.loads(text_))


@dataclasses.dataclass(slots=True)
class OnlineProvider:
    """What a placement pass knows of an online, offering provider: the columns placement
    reads, parsed, and what its held leases use (``online_providers``). Read-only; not
    frozen, since a pass builds a thousand and a frozen dataclass's ``__init__`` took three
    times as long."""

    id: str
    name: str
    lab_id: int
    site: str
    cpus: float
    memory: int
    gpus: tuple[dict[str, Any], ...]
    accepts_peers: bool
    #: The agent's environment mode and versions (read-only: shared between passes).
    environment: dict[str, str]
    environments: frozenset[str]
    used: Usage


def online_providers(s: Session) -> list[OnlineProvider]:
    """The providers a pass may place on (online, and offering: a provider whose owner
    policy keeps the machine for its owner gets nothing new), with their usage, in one
    statement. Rows, not ORM objects: hydrating 1,000 ``Provider`` objects and summing
    usage in a statement of its own took a third of a placing pass under issue 14's load.
    Core rows on the session's connection (its pending changes are not flushed first: a
    pass has none when it reads), not the ORM's column rows, and the memory summed as a
    64-bit integer (a plain ``SUM`` of a BIGINT is NUMERIC: a ``Decimal`` a row). Every
    pass that has something to place reads it; with the frozen ``OnlineProvider`` this
    took a quarter more CPU (1,000 providers, 10,000 held leases)."""
    held = (select(Lease.provider_id.label("provider_id"),
                   func.sum(Lease.cpus).label("cpus"),
                   cast(func.sum(Lease.memory), BigInteger).label("memory"))
            .where(col(Lease.state).in_(HELD_STATES)).group_by(Lease.provider_id).subquery())
    rows = s.connection().execute(
        select(Provider.id, Provider.name, Provider.lab_id, Provider.site, Provider.cpus,
               Provider.memory, Provider.gpus_json, Provider.accepts_peers,
               Provider.environment_json, Provider.environments_json, held.c.cpus,
               held.c.memory)
        .outerjoin(held, held.c.provider_id == Provider.id)
        .where(Provider.online == True, Provider.offering == True)  # noqa: E712
    ).all()
    gpu_indices = _held_gpu_indices(s) if any(_parse_json(r[6]) for r in rows) else {}
    return [OnlineProvider(
        pid, name, lab_id, site, cpus, memory, tuple(_parse_json(gpus)), accepts_peers,
        _parse_json(environment), _parse_hashes(hashes),
        Usage(used_cpus or 0.0, used_memory or 0, gpu_indices.get(pid, set())))
        for (pid, name, lab_id, site, cpus, memory, gpus, accepts_peers, environment, hashes,
             used_cpus, used_memory) in rows]


def capacity_left(provider: OnlineProvider,
                  lab_names: dict[int, str] | None = None) -> placement.ProviderCapacity:
    """What ``provider`` has free beside what its held leases use."""
    used = provider.used
    return placement.ProviderCapacity(
        provider_id=provider.id,
        lab=(lab_names or {}).get(provider.lab_id, str(provider.lab_id)),
        site=provider.site,
        free_cpus=provider.cpus - used.cpus,
        free_memory=provider.memory - used.memory,
        free_gpus=[placement.GpuSlot(g["index"], g["model"], g["memory"])
                   for g in provider.gpus if g["index"] not in used.gpu_indices],
        accepts_peers=provider.accepts_peers,
        environments=provider.environments,
    )


def workers_where(s: Session, cluster_ids: set[str]) -> list[tuple[str, str, int]]:
    """(cluster, provider, live workers there) for ``cluster_ids``: where their workers
    run, counted by the database (releasing ones are leaving and do not count)."""
    if not cluster_ids:
        return []
    return list(s.exec(
        select(Lease.cluster_id, Lease.provider_id, func.count())
        .where(col(Lease.cluster_id).in_(cluster_ids), NOT_ENDED,
               col(Lease.state).in_(HELD_STATES), Lease.state != LeaseState.releasing)
        .group_by(Lease.cluster_id, Lease.provider_id)).all())


def request_of(lease: Lease, cluster: ClusterRecord, lab: str = "") -> placement.LeaseRequest:
    """The placement request of a lease of ``cluster``."""
    return placement.LeaseRequest(
        lease_id=lease.id, cluster_id=cluster.id, cpus=lease.cpus, memory=lease.memory,
        gpus=lease.gpus, gpu_model=lease.gpu_model, lab=lab,
        allowed_labs=frozenset(json.loads(cluster.allowed_labs_json)),
        allowed_sites=frozenset(json.loads(cluster.allowed_sites_json)))


def fair_requests(s: Session, pending: list[Lease], clusters: dict[str, ClusterRecord],
                  lab_names: dict[int, str], half_life: float) -> list[placement.LeaseRequest]:
    """Pending leases (of ``clusters``) as placement requests, in fair-share order."""
    now = utcnow()
    lab_ids = {c.lab_id for c in clusters.values()}
    shares = {lab.id: lab.share for lab in s.exec(select(Lab).where(col(Lab.id).in_(lab_ids)))}
    lab_usage = fairshare.usage_now(s, "lab", lab_ids, now, half_life)
    user_usage = fairshare.usage_now(s, "user", {c.user_id for c in clusters.values()},
                                     now, half_life)
    claims = [fairshare.Claim(lease.id, clusters[lease.cluster_id].lab_id,
                              clusters[lease.cluster_id].user_id, lease.created_at)
              for lease in pending]
    by_id = {lease.id: lease for lease in pending}
    return [request_of(by_id[c.request_id], clusters[by_id[c.request_id].cluster_id],
                       lab_names.get(c.lab, ""))
            for c in fairshare.fair_order(claims, shares, lab_usage, user_usage)]


def with_environments(s: Session, requests: list[placement.LeaseRequest],
                      clusters: dict[str, ClusterRecord], providers: list[OnlineProvider],
                      lab_names: dict[int, str]) -> list[placement.LeaseRequest]:
    """``requests`` (of ``clusters``) with their clusters' environments and the providers
    that cannot run them (federation.broker.environments)."""
    refused = {cid: environments.refusals(s, c, providers, lab_names)
               for cid, c in clusters.items() if c.environment is not None}
    return [dataclasses.replace(
        r, environment=clusters[r.cluster_id].environment,
        excluded=frozenset(refused[r.cluster_id]),
        environment_note=environments.refusal_reasons(refused[r.cluster_id]))
        if r.cluster_id in refused else r for r in requests]


def place_pending(s: Session, rng: random.Random, half_life: float,
                  relayed: bool = False,
                  recent_rates: RecentPreemptionRates | None = None) -> set[str]:
    """Assign pending leases to providers with room (the caller commits); returns the
    providers that got leases, whose agents must be woken.

    ``relayed``: the federation has a gateway, through which every worker is reached (its
    workers listen on parallex:// addresses), so sites that accept no peer connections need
    not confine a cluster (docs/architecture.md, "Peer traffic across sites").
    ``recent_rates``: the replica's remembered preemption rates (read afresh without)."""
    pending = s.exec(
        select(Lease).join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
        .where(Lease.state == LeaseState.pending, ClusterRecord.active == True)  # noqa: E712
        .order_by(Lease.created_at, Lease.id)
        # A lease a release or close holds is left for the next pass (which it asks for);
        # the rows read here stay locked until the pass commits (PostgreSQL; SQLite has one
        # writer, the exclusive section).
        .with_for_update(of=Lease, skip_locked=True)
    ).all()
    if not pending:
        return set()
    providers = online_providers(s)
    lab_names = {lab.id: lab.name for lab in s.exec(select(Lab))}
    snapshot = [capacity_left(p, lab_names) for p in providers]
    if relayed:
        for cap in snapshot:
            cap.accepts_peers = True
    provider_ids = [p.id for p in providers]
    rates = (recent_rates.rates(s, provider_ids) if recent_rates is not None
             else preemption_rates(s, provider_ids))
    for cap in snapshot:
        cap.preemption_rate = rates.get(cap.provider_id, 0.0)
    provider_lab = {p.id: lab_names.get(p.lab_id, "") for p in providers}
    caps = {c.provider_id: c for c in snapshot}
    # Where the clusters that wait already have workers (only theirs matter to this pass).
    cluster_labs: dict[str, Counter[str]] = {}
    reach: dict[str, placement.Reach] = {}
    for cluster_id, provider_id, n in workers_where(s, {le.cluster_id for le in pending}):
        cluster_labs.setdefault(cluster_id, Counter())[provider_lab.get(provider_id, "")] += n
        if provider_id in caps:
            reach.setdefault(cluster_id, placement.Reach()).add(caps[provider_id])
    clusters = {c.id: c for c in s.exec(select(ClusterRecord).where(
        col(ClusterRecord.id).in_({lease.cluster_id for lease in pending})))}
    requests = with_environments(s, fair_requests(s, pending, clusters, lab_names, half_life),
                                 clusters, providers, lab_names)
    placed = placement.place_with_owner_priority(requests, snapshot, cluster_labs, rng, reach)
    by_id = {lease.id: lease for lease in pending}
    now = utcnow()
    for p in placed:
        lease = by_id[p.lease_id]
        lease.provider_id = p.provider_id
        lease.gpu_indices_json = json.dumps(list(p.gpu_indices))
        lease.placed_gpu_model = p.gpu_model
        move(lease, LeaseState.starting, at=now)
        lease.assigned_at = now
        lease.message = ""
        s.add(lease)
    # What still waits says why, with the capacity this pass left (%parallex shows it).
    placed_ids = {p.lease_id for p in placed}
    for req in requests:
        lease = by_id[req.lease_id]
        if req.lease_id not in placed_ids:
            reason = placement.why_waiting(req, snapshot, reach.get(req.cluster_id))
            if lease.message != reason:
                lease.message = reason
                s.add(lease)
    return {p.provider_id for p in placed}
