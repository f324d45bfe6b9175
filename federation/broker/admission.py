"""Admission: whether a request may be accepted at all — credit, quotas, sizes, identifiers
and certificates. Each check raises the broker's domain error with what to do; none writes.

Checks that read what quota is held run inside the service's exclusive section on SQLite
and under the lab's admission lock on PostgreSQL (``lock_lab_admissions``), so the insert
that follows sees what they saw. Whether a lease id is taken is the insert's to find (its
primary key); ``lease_ids_taken`` names them for the refusal.
"""

from __future__ import annotations

import ipaddress
import json

from sqlalchemy import and_, func
from sqlmodel import Session, col, select

from accounting.ledger import lab_balance_query
from accounting.models import Lab, Membership
from accounting.units import fmt_pcu, to_nano

from .. import placement
from ..sizes import format_bytes
from ..tls import (
    ROLE_WORKER,
    BadSigningRequest,
    certificate_identity,
    certificate_matches_request,
    is_ca_certificate,
    load_worker_request,
    signed_by,
)
from .auth import Principal
from .errors import Conflict, Invalid, NotAllowed, OverCreditLimit
from .memo import ExpiringMap
from .models import (
    LIVE_STATES,
    ClusterCreate,
    ClusterRecord,
    Lease,
    LeaseState,
    Provider,
    ProviderRegister,
)


def check_provider_limits(lab: Lab, body: ProviderRegister) -> None:
    """Refuse a machine larger than an administrator allows for the lab: a provider that
    declares capacity it does not have would be placed and paid for it."""
    asked = [(body.cpus, lab.provider_max_cpus, "CPU cores", str),
             (body.memory, lab.provider_max_memory, "memory", format_bytes),
             (len(body.gpus), lab.provider_max_gpus, "GPUs", str)]
    for value, limit, what, fmt in asked:
        if value > limit:
            raise NotAllowed("provider-over-limit",
                             f"this machine offers {fmt(value)} {what}; lab {lab.name} may "
                             f"offer at most {fmt(limit)} per machine. Offer less (parallex "
                             "provide --cpus/--memory/--gpus) or ask an administrator to raise "
                             "the lab's provider limit")


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """'10.0.0.0/8,::1/128' → networks; a ValueError naming the bad one."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"--scheduler-networks: {part!r} is not a network (write "
                             "e.g. 10.0.0.0/8,127.0.0.0/8)") from None
    if not networks:
        raise ValueError("--scheduler-networks names no network; users could start no cluster")
    return tuple(networks)


def check_scheduler_host(address: str, networks: tuple) -> None:
    """The scheduler listens on an IP address inside ``networks`` (the gateway forwards to
    it and workers dial it: a host elsewhere would make either a relay to that host)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise Invalid("scheduler-address", f"scheduler_address must name an IP address; got "
                      f"host {host!r}: set parallex.scheduler.host to the server's "
                      "IP address") from None
    if not any(ip in net for net in networks):
        allowed = ", ".join(str(n) for n in networks)
        raise Invalid("scheduler-address", f"the scheduler at {ip} is outside the networks "
                      f"this federation's schedulers may use ({allowed}); run the notebook "
                      "on the hub, or ask the federation's administrator")


def check_new_cluster(s: Session, principal: Principal, body: ClusterCreate,
                      networks: tuple = ()) -> None:
    """A cluster belongs to a user, brings its own CA, listens inside the allowed networks
    (``networks``; empty: anywhere) and names only labs that exist."""
    if principal.user_id is None:
        raise NotAllowed("not-a-user", "clusters belong to users; use a user token")
    if not is_ca_certificate(body.ca_cert):
        raise Invalid("bad-ca", "ca_cert must be a PEM CA certificate")
    if networks:
        check_scheduler_host(body.scheduler_address, networks)
    if body.labs:
        known = set(s.exec(select(Lab.name).where(col(Lab.name).in_(body.labs))).all())
        unknown = sorted(set(body.labs) - known)
        if unknown:
            raise Invalid("unknown-lab",
                          f"labs: no lab named {', '.join(map(repr, unknown))}; "
                          "parallex lab list shows the federation's labs")


#: Seconds a replica answers "some machine fits" from the machines' shapes as it last read
#: them (``check_fits_somewhere``).
SHAPES_KEPT = 2.0


class ShapesSeen:
    """The online machines' distinct shapes as this replica last read them, for
    ``SHAPES_KEPT`` seconds."""

    def __init__(self, ttl: float = SHAPES_KEPT):
        self._seen: ExpiringMap[str, list[placement.ProviderCapacity]] = ExpiringMap(ttl, 1)

    def get(self) -> list[placement.ProviderCapacity] | None:
        return self._seen.get("")

    def put(self, shapes: list[placement.ProviderCapacity]) -> None:
        self._seen.put("", shapes)


def check_fits_somewhere(s: Session, request: placement.LeaseRequest,
                         seen: ShapesSeen | None = None) -> None:
    """Refuse a worker no online provider could host even when idle (it would wait forever).

    With ``seen``, a worker that one of the shapes read in the last few seconds hosts is
    admitted without reading them again (every scale request asked, and under load each
    round trip waits for a core; issue 14). A machine that went offline meanwhile admits at
    most a worker that then waits pending, as one that goes offline just after admission
    would. A refusal is never from memory: a worker no remembered shape hosts is checked
    against the machines online now, so a machine that just came is seen at once."""
    remembered = seen.get() if seen is not None else None
    if remembered is not None and any(placement.fits(p, request) for p in remembered):
        return
    # The machines' distinct shapes, not every machine: a federation of a thousand machines
    # has a few dozen (issue 14's load benchmark: this read was a fifth of a replica's time).
    # With their labs' names in the same statement (one round trip fewer a scale request).
    rows = s.exec(select(Lab.name, Provider.site, Provider.cpus, Provider.memory,
                         Provider.gpus_json, Provider.accepts_peers)
                  .join(Lab, Lab.id == Provider.lab_id)
                  .where(Provider.online == True).distinct()).all()  # noqa: E712
    shapes = [placement.ProviderCapacity(
        provider_id="", lab=lab_name, site=site, free_cpus=cpus,
        free_memory=memory, free_gpus=[placement.GpuSlot(g["index"], g["model"], g["memory"])
                                       for g in json.loads(gpus_json)],
        accepts_peers=accepts_peers) for lab_name, site, cpus, memory, gpus_json, accepts_peers
        in rows]
    if seen is not None:
        seen.put(shapes)
    why = placement.largest_offer(shapes, request)
    if why is not None:
        raise Invalid("no-provider-fits",
                      f"no provider in the federation can ever host this worker: {why}")


def check_distinct_lease_ids(ids: list[str]) -> None:
    """Refuse a request that names one lease id twice. Whether an id is taken already is
    the insert's to find (the primary key): ``lease_ids_taken`` says which, after."""
    if len(set(ids)) != len(ids):
        raise Invalid("duplicate-lease-id", "lease ids in one request must differ")


def lease_ids_taken(s: Session, ids: list[str]) -> Conflict:
    """The refusal of a request whose insert hit existing lease ids, naming them."""
    taken = sorted(s.exec(select(Lease.id).where(col(Lease.id).in_(ids))).all())
    if not taken:  # gone again: another request's rows, rolled back meanwhile
        return Conflict("lease-id-taken", "one of these lease ids was taken by another "
                        "request at the same moment; ask again with new ids")
    return Conflict("lease-id-taken", f"lease ids already exist: {taken}; ask with new ids")


def lab_member_and_balance(s: Session, lab_id: int,
                           user_id: int) -> tuple[Lab, Membership | None, int]:
    """The lab, the user's membership there (None: none) and the lab's balance in nano-PCU
    (0 before its account exists), in one statement: every scale request needs all three,
    and under load each round trip waits for a core (issue 14)."""
    owed = lab_balance_query(Lab.id).scalar_subquery()
    lab, member, amount = s.exec(
        select(Lab, Membership, owed)
        .outerjoin(Membership, and_(Membership.lab_id == Lab.id, Membership.user_id == user_id))
        .where(Lab.id == lab_id)).one()
    return lab, member, amount or 0


def quota_applies(lab: Lab, member: Membership | None) -> bool:
    """Whether the cluster's lab or its owner's membership there (None: none) has a CPU or
    GPU quota."""
    limits = (lab.max_cpus, lab.max_gpus) + ((member.max_cpus, member.max_gpus) if member
                                              else ())
    return any(limit is not None for limit in limits)


def check_credit_and_quotas(s: Session, cluster: ClusterRecord, lab: Lab,
                            member: Membership | None, owed: int, cpus: float, gpus: int,
                            n: int) -> None:
    """Refuse ``n`` new workers for ``lab`` (the cluster's; ``member``: its owner's
    membership there, if any; ``owed``: its balance in nano-PCU, as
    ``lab_member_and_balance`` reads it) over its credit limit or over a quota."""
    if owed < -to_nano(lab.credit_limit):
        raise OverCreditLimit(
            "credit-limit",
            f"lab {lab.name}'s balance is {fmt_pcu(owed)}, below its credit limit of "
            f"-{lab.credit_limit:,.2f} PCU: new workers are refused (running ones keep "
            "running). Ask your PI or an administrator for a grant, or let your lab's "
            "machines earn credits.")
    if not quota_applies(lab, member):
        return  # nothing to count
    member_max_cpus = member.max_cpus if member else None
    member_max_gpus = member.max_gpus if member else None
    # Summed by the database per user of the lab (not a row per live lease).
    held = s.exec(select(ClusterRecord.user_id, func.sum(Lease.cpus), func.sum(Lease.gpus))
                  .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
                  .where(ClusterRecord.lab_id == lab.id, col(Lease.state).in_(LIVE_STATES))
                  .group_by(ClusterRecord.user_id)).all()
    want_cpus, want_gpus = cpus * n, gpus * n
    for who, rows, max_cpus, max_gpus in (
            (f"lab {lab.name}", held, lab.max_cpus, lab.max_gpus),
            ("you", [r for r in held if r[0] == cluster.user_id],
             member_max_cpus, member_max_gpus)):
        held_cpus = sum(r[1] or 0 for r in rows)
        held_gpus = sum(r[2] or 0 for r in rows)
        if max_cpus is not None and held_cpus + want_cpus > max_cpus:
            raise NotAllowed("quota-exceeded",
                             f"{who} may hold at most {max_cpus:g} CPUs at once; "
                             f"{held_cpus:g} are held and this asks for {want_cpus:g} more")
        if max_gpus is not None and held_gpus + want_gpus > max_gpus:
            raise NotAllowed("quota-exceeded",
                             f"{who} may hold at most {max_gpus} GPUs at once; {held_gpus} "
                             f"are held and this asks for {want_gpus} more")


# ---- worker certificates --------------------------------------------------------------------
#
# The agent makes the worker's key on its machine and sends a signing request; the cluster
# signs it with its own CA and sends the certificate back. The broker relays requests and
# certificates, which are public, and never holds a private key.

def check_signing_request(lease_id: str, csr_pem: str) -> None:
    """The agent's signing request must be a worker request for this very lease."""
    try:
        load_worker_request(csr_pem, lease_id)
    except BadSigningRequest as exc:
        raise Invalid("bad-signing-request", f"lease {lease_id}: {exc}") from exc


def check_signable(lease: Lease) -> None:
    """Only a starting lease's worker gets a certificate."""
    if lease.state != LeaseState.starting:
        raise Conflict("not-starting", f"lease {lease.id} is {lease.state.value}; only a "
                       "starting lease's worker gets a certificate")


def check_worker_certificate(lease: Lease, cert: str, cluster: ClusterRecord) -> None:
    """The cluster's certificate must answer the lease's waiting signing request: signed by
    the cluster's CA, a worker certificate named after the lease, for the request's key."""
    if lease.state != LeaseState.starting or not lease.worker_csr:
        raise Conflict("no-signing-request", f"lease {lease.id} is {lease.state.value} and "
                       "has no signing request waiting")
    # signed_by also refuses what does not parse, so identity can be read after.
    if not signed_by(cert, cluster.ca_cert):
        raise Invalid("bad-worker-cert", f"the certificate for lease {lease.id} is not signed "
                      "by this cluster's CA")
    name, role = certificate_identity(cert)
    if name != lease.id or role != ROLE_WORKER:
        raise Invalid("bad-worker-cert", f"the certificate for lease {lease.id} must be a "
                      f"worker certificate with CN={lease.id}; it has CN={name!r}")
    if not certificate_matches_request(cert, lease.worker_csr):
        raise Invalid("bad-worker-cert", f"the certificate for lease {lease.id} is not for "
                      "the key of its signing request")
