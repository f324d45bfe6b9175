"""Lease placement: a pure function from a capacity snapshot and a queue of requests to
assignments. No database, no clock, no I/O, so later issues can add fair share and owner
priority by changing the order of the queue and the score, and a simulator can run it at scale.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from accounting import gpus
from accounting.pricing import DEFAULT_GPU_CLASSES

from .placement_index import CandidateIndex


@dataclass(frozen=True)
class GpuSlot:
    """One GPU of a provider."""

    index: int
    model: str
    memory: int  # bytes


@dataclass
class ProviderCapacity:
    """What one provider has free now, plus its labels."""

    provider_id: str
    lab: str
    site: str
    free_cpus: float
    free_memory: int
    free_gpus: list[GpuSlot] = field(default_factory=list)
    #: Share of its recent leases its owner took back (0 to 1); placement prefers lower.
    preemption_rate: float = 0.0
    #: Whether its workers accept connections from other sites (False behind NAT or a
    #: firewall): a cluster with a worker here keeps all its workers within this site.
    accepts_peers: bool = True
    #: Hashes of the software environments built and ready there (placement prefers them:
    #: a worker there starts without a build).
    environments: frozenset[str] = frozenset()


@dataclass
class Reach:
    """Where one cluster's workers are: every site, and the sites of workers that accept no
    connections from other sites. Dask needs every worker to reach every other."""

    sites: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)

    def admits(self, cap: ProviderCapacity) -> bool:
        """True when a worker on ``cap`` could reach, and be reached by, the others."""
        return (self.closed <= {cap.site}
                and (cap.accepts_peers or self.sites <= {cap.site}))

    def add(self, cap: ProviderCapacity) -> None:
        self.sites.add(cap.site)
        if not cap.accepts_peers:
            self.closed.add(cap.site)


@dataclass(frozen=True)
class LeaseRequest:
    """One pending lease to place; ``lab`` is the lab of the user who asked."""

    lease_id: str
    cluster_id: str
    cpus: float
    memory: int
    gpus: int = 0
    gpu_model: str | None = None
    lab: str = ""
    #: The labs and sites the cluster's owner allows (empty: any), e.g. for sensitive data.
    allowed_labs: frozenset[str] = frozenset()
    allowed_sites: frozenset[str] = frozenset()
    #: The hash of the cluster's software environment ("" none), the providers that cannot
    #: run it, and why (federation.broker.environments).
    environment: str = ""
    excluded: frozenset[str] = frozenset()
    environment_note: str = ""

    def allows(self, cap: ProviderCapacity) -> bool:
        """True when the owner allows a worker on ``cap``'s lab and site and ``cap`` can run
        the cluster's environment."""
        return ((not self.allowed_labs or cap.lab in self.allowed_labs)
                and (not self.allowed_sites or cap.site in self.allowed_sites)
                and cap.provider_id not in self.excluded)


@dataclass(frozen=True)
class Placement:
    """A lease assigned to a provider, with the GPU indices it gets and their model (what the
    lease is priced by)."""

    lease_id: str
    provider_id: str
    gpu_indices: tuple[int, ...] = ()
    gpu_model: str | None = None


def matching_gpus(slots: list[GpuSlot], model: str | None) -> list[GpuSlot]:
    """The GPU slots that serve a request for ``model`` (a GPU class or words of a model name;
    accounting.gpus decides, as it does for pricing), all if None."""
    if not model:
        return list(slots)
    return [g for g in slots if gpus.matches(model, g.model, DEFAULT_GPU_CLASSES)]


def fits(cap: ProviderCapacity, req: LeaseRequest) -> bool:
    """True when ``req`` may go to ``cap`` and fits in its free capacity."""
    return (
        req.allows(cap)
        and cap.free_cpus >= req.cpus
        and cap.free_memory >= req.memory
        and len(matching_gpus(cap.free_gpus, req.gpu_model)) >= req.gpus
    )


def place(
    requests: list[LeaseRequest],
    providers: list[ProviderCapacity],
    cluster_labs: dict[str, Counter[str]],
    rng: random.Random,
    reach: dict[str, Reach] | None = None,
) -> list[Placement]:
    """Place ``requests`` in order onto ``providers``.

    ``cluster_labs`` counts, per cluster, the live leases it already has per lab; a cluster is
    kept on the lab (then site) where most of its workers are, so its workers talk over short
    links. Among equally good providers the choice is random, which spreads load without
    preferring whoever registered first. Requests that do not fit stay unplaced. The snapshot
    passed in is consumed (its free capacity is reduced) so callers pass a copy.
    ``reach`` (per cluster, updated as requests are placed) keeps a cluster's workers where
    they can all reach each other.
    """
    reach = {} if reach is None else reach
    placements: list[Placement] = []
    labs = {cid: Counter(c) for cid, c in cluster_labs.items()}
    sites: dict[str, Counter[str]] = {}
    lab_site = {p.lab: p.site for p in providers}
    for cid, counts in labs.items():
        sites[cid] = Counter()
        for lab, n in counts.items():
            sites[cid][lab_site.get(lab, "")] += n

    if not requests:
        return placements
    index = CandidateIndex(providers, min(r.cpus for r in requests),
                           min(r.memory for r in requests))
    for req in requests:
        where = reach.setdefault(req.cluster_id, Reach())
        lab_counts = labs.setdefault(req.cluster_id, Counter())
        site_counts = sites.setdefault(req.cluster_id, Counter())
        # Near the cluster's other workers first; then a machine whose owner takes it back
        # less often (in steps of 10 %, so small differences leave the choice random).
        labs_allowed = _labs_allowed(req, where, index.labs_at)
        best = None
        if req.environment:
            # A machine with the environment built starts the worker in seconds, not minutes.
            best = index.best(labs_allowed, lab_counts, site_counts, req.gpus > 0,
                              lambda p, r=req, w=where: (r.environment in p.environments
                                                         and fits(p, r) and w.admits(p)), rng)
        if best is None:
            best = index.best(labs_allowed, lab_counts, site_counts, req.gpus > 0,
                              lambda p, r=req, w=where: fits(p, r) and w.admits(p), rng)
        if best is None:
            continue
        gpu_slots = sorted(matching_gpus(best.free_gpus, req.gpu_model), key=lambda g: g.index)
        taken = gpu_slots[: req.gpus]
        best.free_cpus -= req.cpus
        best.free_memory -= req.memory
        best.free_gpus = [g for g in best.free_gpus if g not in taken]
        index.taken(best)
        lab_counts[best.lab] += 1
        site_counts[best.site] += 1
        where.add(best)
        placements.append(Placement(req.lease_id, best.provider_id, tuple(g.index for g in taken),
                                    taken[0].model if taken else None))
    return placements


def _labs_allowed(req: LeaseRequest, where: Reach,
                  labs_at: dict[str, set[str]]) -> set[str] | None:
    """The labs whose providers could serve ``req`` by its restrictions and its cluster's
    reach (None: any); a superset, since the fit check decides per provider."""
    labs: set[str] | None = set(req.allowed_labs) if req.allowed_labs else None
    sites = set(req.allowed_sites) if req.allowed_sites else None
    if where.closed:
        sites = (sites if sites is not None else set(where.closed)) & where.closed
        if len(where.closed) > 1:
            sites = set()
    if sites is not None:
        at_sites = {lab for site in sites for lab in labs_at.get(site, ())}
        labs = at_sites if labs is None else labs & at_sites
    return labs


def place_with_owner_priority(
    requests: list[LeaseRequest],
    providers: list[ProviderCapacity],
    cluster_labs: dict[str, Counter[str]],
    rng: random.Random,
    reach: dict[str, Reach] | None = None,
) -> list[Placement]:
    """Owner priority, then everything else: first each request (in the given, fair-share
    order) may only use its own lab's machines, so a lab's members come first there; the
    requests left over are then placed anywhere with ``place``."""
    labs = {p.lab for p in providers}
    reach = {} if reach is None else reach
    first: list[Placement] = []
    counts = {cid: Counter(c) for cid, c in cluster_labs.items()}
    for lab in labs:
        own = [p for p in providers if p.lab == lab]
        mine = [r for r in requests if r.lab == lab]
        if mine:
            first += place(mine, own, counts, rng, reach)
    cluster_of = {r.lease_id: r.cluster_id for r in requests}
    lab_of = {p.provider_id: p.lab for p in providers}
    for p in first:  # what the first pass placed counts for locality in the second
        counts.setdefault(cluster_of[p.lease_id], Counter())[lab_of[p.provider_id]] += 1
    placed = {p.lease_id for p in first}
    rest = [r for r in requests if r.lease_id not in placed]
    return first + place(rest, providers, counts, rng, reach)


def why_waiting(req: LeaseRequest, providers: list[ProviderCapacity],
                reach: Reach | None = None) -> str:
    """Why ``req`` is still pending after a placement pass; ``providers`` carry the free
    capacity that pass left. The words a user reads in ``%parallex`` and in a start timeout."""
    from .sizes import format_bytes

    def cpus(n: float) -> str:
        return f"{n:g} CPU" + ("" if n == 1 else "s")

    size = f"{cpus(req.cpus)} and {format_bytes(req.memory)}"
    if req.gpus:
        size += f" and {req.gpus} {req.gpu_model + ' ' if req.gpu_model else ''}GPUs"
    allowed = [p for p in providers if req.allows(p)]
    if not allowed and req.excluded and any(p.provider_id in req.excluded for p in providers):
        return ("no online provider can run this cluster's software environment: "
                + (req.environment_note or "see the refusal when scaling"))
    if not allowed:
        where = ", ".join(f"{kind} {', '.join(sorted(names))}" for kind, names in
                          (("labs", req.allowed_labs), ("sites", req.allowed_sites)) if names)
        return (f"no provider of the {where} this cluster is restricted to is online"
                if where else "no provider is online")
    if reach is not None and any(fits(p, req) for p in allowed) \
            and not any(fits(p, req) and reach.admits(p) for p in allowed):
        sites = ", ".join(sorted(reach.closed or reach.sites))
        return (f"waiting for {size} at site {sites}: this cluster's workers there accept no "
                f"connections from other sites, so its workers stay within that site (a "
                f"provider elsewhere has room)")
    most = max(allowed, key=lambda p: (len(matching_gpus(p.free_gpus, req.gpu_model)),
                                       p.free_cpus, p.free_memory))
    busy = f"all {len(allowed)} online providers are busy" if len(allowed) > 1 \
        else "the one online provider is busy"
    gpus = (f", {len(matching_gpus(most.free_gpus, req.gpu_model))} GPUs" if req.gpus else "")
    return (f"waiting for {size} to come free: {busy} (the most free has "
            f"{cpus(most.free_cpus)}, {format_bytes(most.free_memory)}{gpus})")


def largest_offer(providers: list[ProviderCapacity], req: LeaseRequest) -> str | None:
    """Explain why ``req`` can never fit any provider's *total* capacity, or None if one could.

    ``providers`` here carry total (not free) capacity.
    """
    if any(fits(p, req) for p in providers):
        return None
    if not providers:
        return "no provider is registered with the federation yet"
    allowed = [p for p in providers if req.allows(p)]
    if not allowed:
        where = ", ".join(f"{kind} {sorted(names)}" for kind, names in
                          (("labs", req.allowed_labs), ("sites", req.allowed_sites)) if names)
        return f"no provider is online in the {where} this cluster is restricted to"
    providers = allowed
    from .sizes import format_bytes

    max_cpus = max(p.free_cpus for p in providers)
    max_mem = max(p.free_memory for p in providers)
    max_gpus = max(len(matching_gpus(p.free_gpus, req.gpu_model)) for p in providers)
    parts = []
    if req.cpus > max_cpus:
        parts.append(f"asked for {req.cpus:g} CPUs; the largest provider has {max_cpus:g}")
    if req.memory > max_mem:
        parts.append(
            f"asked for {format_bytes(req.memory)} of memory; the largest provider has "
            f"{format_bytes(max_mem)}"
        )
    if req.gpus > max_gpus:
        model = f" {req.gpu_model}" if req.gpu_model else ""
        parts.append(f"asked for {req.gpus}{model} GPUs; the largest provider has {max_gpus}")
    if not parts:
        parts.append(
            f"no single provider has {req.cpus:g} CPUs, {format_bytes(req.memory)} and "
            f"{req.gpus} GPUs together"
        )
    return "; ".join(parts)
