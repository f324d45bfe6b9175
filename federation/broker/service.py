"""The broker's rules: lease state transitions, the placement pass, heartbeat timeouts.

The routes that call these functions run in FastAPI's thread pool (the reaper on the event
loop), so calls overlap. What consumes capacity or quota — admission with its insert, and the
placement pass — holds ``Broker.exclusive`` and, on PostgreSQL, an advisory transaction lock
that other broker processes on the same database respect; without it two passes read the same
free capacity and both fill it (tests/federation/test_concurrency.py double-booked a provider
by 3 CPUs of 8 before). Agents' wake-ups are set on the event loop from whichever thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

from sqlalchemy import and_, or_, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from accounting import fairshare, ledger, metering, reliability
from accounting.metering import LeaseUsage
from accounting.models import Lab, Membership, User, as_utc, names_by_id, utcnow
from accounting.pricing import Resources, ensure_default_price
from accounting.units import fmt_pcu, to_nano

from .. import placement
from ..lease_states import move
from ..sizes import format_bytes
from ..tls import (
    ROLE_WORKER,
    BadSigningRequest,
    certificate_identity,
    certificate_matches_request,
    load_worker_request,
    signed_by,
)
from . import db
from .auth import Principal
from .capacity import record_capacity
from .errors import Conflict, Invalid, NotAllowed, NotFound, OverCreditLimit, TooSoon
from .models import (
    HELD_STATES,
    LIVE_STATES,
    ClusterCreate,
    ClusterPublic,
    ClusterRecord,
    EndReason,
    Lease,
    LeaseCreate,
    LeasePublic,
    LeaseState,
    LeaseStateReport,
    Provider,
    ProviderRegister,
    WorkerCertificate,
)
from .settings import BrokerSettings

logger = logging.getLogger("parallex.broker")

#: Key of the PostgreSQL advisory lock that serialises placement and admission across broker
#: processes (any fixed 64-bit number no other application on the database uses).
PLACEMENT_LOCK = 0x7061726C6C6578  # "parllex"


class Broker:
    """Broker state that lives beside the database: the engine, settings, agent wake-ups."""

    def __init__(self, engine: Engine, settings: BrokerSettings, seed: int | None = None):
        self.engine = engine
        self.settings = settings
        self.boot_id = uuid.uuid4().hex[:8]
        self.rng = random.Random(seed)
        self._versions: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}
        # Routes run in FastAPI's thread pool (and the reaper on the event loop), so two
        # placement passes, or a quota check and another request's insert, can overlap. Every
        # change that consumes capacity or quota holds this lock (and, on PostgreSQL, an
        # advisory lock that also serialises other broker processes on the same database).
        self._exclusive = threading.RLock()
        # Wake-ups cross threads: versions and events change under this lock, and events are
        # set on the loop that waits on them (asyncio.Event is not thread-safe).
        self._wake_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._last_metering = 0.0
        self._last_heartbeat: dict[str, float] = {}
        self._last_capacity = 0.0

    def session(self) -> Session:
        return db.session(self.engine)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One capacity- or quota-consuming change at a time in this process."""
        with self._exclusive:
            yield

    def _lock_across_processes(self, s: Session) -> None:
        """On PostgreSQL, hold the placement lock for the rest of ``s``'s transaction."""
        if self.engine.dialect.name == "postgresql":
            s.exec(text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=PLACEMENT_LOCK))

    # ---- agent wake-ups ------------------------------------------------------------------

    def version(self, provider_id: str) -> str:
        """Opaque version of a provider's lease list; it changes on every change to it."""
        return f"{self.boot_id}:{self._versions.get(provider_id, 0)}"

    def bump(self, provider_id: str | None) -> None:
        """Mark a change of the provider's lease list and wake its long poll (any thread)."""
        if provider_id is None:
            return
        with self._wake_lock:
            self._versions[provider_id] = self._versions.get(provider_id, 0) + 1
            event = self._events.pop(provider_id, None)
        if event is not None:
            self._set(event)

    def _set(self, event: asyncio.Event) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop or self.loop is None:
            event.set()
        else:
            self.loop.call_soon_threadsafe(event.set)

    async def wait_for_change(self, provider_id: str, since: str | None, timeout: float) -> None:
        """Return when the provider's lease list differs from ``since`` or after ``timeout``."""
        # The version check and the event's creation are one step under the lock, so a bump
        # from another thread between them cannot be missed (a lost wake-up would leave the
        # agent waiting the whole poll).
        with self._wake_lock:
            if since != self.version(provider_id):
                return
            event = self._events.setdefault(provider_id, asyncio.Event())
        # asyncio.timeout, not wait_for, which on Python 3.11 can lose a cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    # ---- start-up -------------------------------------------------------------------------

    def recover(self) -> None:
        """After a (re)start, give every agent and cluster a full timeout to check back in.

        The broker's own downtime must not count as their silence; agents then report which
        workers they run and the heartbeat reconciles the rest.
        """
        now = utcnow()
        with self.session() as s:
            for p in s.exec(select(Provider).where(Provider.online == True)):  # noqa: E712
                p.last_seen = now
                s.add(p)
            for c in s.exec(select(ClusterRecord).where(ClusterRecord.active == True)):  # noqa: E712
                c.last_seen = now
                s.add(c)
            # Installed here, so reading a price never has to write one.
            ensure_default_price(s)
            s.commit()
        self.place_pending()

    # ---- providers ------------------------------------------------------------------------

    def register_provider(self, principal: Principal, body: ProviderRegister) -> Provider:
        with self.session() as s:
            lab = s.get(Lab, principal.lab_id)
            _check_provider_limits(lab, body)
            provider = s.exec(
                select(Provider).where(Provider.lab_id == lab.id, Provider.name == body.name)
            ).first()
            if provider is None:
                provider = Provider(id="prv_" + uuid.uuid4().hex[:12], lab_id=lab.id,
                                    token_id=principal.token_id, name=body.name, cpus=body.cpus,
                                    memory=body.memory)
            provider.token_id = principal.token_id
            provider.site = body.site if body.site is not None else lab.site
            provider.cpus = body.cpus
            provider.memory = body.memory
            provider.gpus_json = json.dumps([g.model_dump() for g in body.gpus])
            provider.online = True
            provider.last_seen = utcnow()
            s.add(provider)
            s.commit()
        logger.info("provider %s (%s) registered for lab %s: %g CPUs, %d bytes, %d GPUs",
                    provider.id, provider.name, principal.lab_name, provider.cpus,
                    provider.memory, len(body.gpus))
        self.bump(provider.id)
        self.place_pending()
        return provider

    def provider_for(self, principal: Principal, provider_id: str) -> Provider:
        with self.session() as s:
            provider = s.get(Provider, provider_id)
        # Another lab's provider answers exactly like an unknown one: ids are not disclosed.
        if provider is None or provider.lab_id != principal.lab_id:
            raise NotFound("unknown-provider",
                           f"no provider {provider_id!r} of your lab; register again with POST "
                           "/api/v1/agent/register")
        return provider

    @property
    def agent_heartbeat_interval(self) -> float:
        """Seconds between an agent's heartbeats, as the broker tells agents."""
        return max(0.2, self.settings.provider_timeout / 5)

    def check_heartbeat_rate(self, provider_id: str) -> None:
        """Refuse (429) a provider heartbeat sooner than the minimum interval after the last."""
        least = min(self.settings.min_heartbeat_interval, self.agent_heartbeat_interval / 2)
        now = time.monotonic()
        last = self._last_heartbeat.get(provider_id)
        if last is not None and now - last < least:
            wait = least - (now - last)
            raise TooSoon("heartbeat-too-frequent",
                           f"heartbeats from one provider must be at least {least:g} s apart; "
                           f"retry in {wait:.2f} s", retry_after=1)
        self._last_heartbeat[provider_id] = now

    def provider_heartbeat(self, provider: Provider, running: list[str]) -> None:
        now = utcnow()
        alive = set(running)
        changed = False
        with self.session() as s:
            row = s.get(Provider, provider.id)
            came_back = not row.online
            row.last_seen = now
            row.online = True
            s.add(row)
            held = s.exec(select(Lease).where(Lease.provider_id == provider.id,
                                              col(Lease.state).in_(HELD_STATES))).all()
            for lease in held:
                if (lease.state == LeaseState.releasing and lease.releasing_at is not None
                        and (now - as_utc(lease.releasing_at)).total_seconds()
                        > self.settings.release_timeout):
                    # The agent could not report the end (or would not): the capacity it
                    # holds comes back, and billing stops.
                    lease.end_reason = None
                    self._end(lease, EndReason.lost,
                              f"the provider did not report the worker stopped within "
                              f"{self.settings.release_timeout:g} s of its release")
                    s.add(lease)
                    changed = True
                elif lease.state == LeaseState.running and lease.id not in alive:
                    self._end_by_provider(s, lease, EndReason.failed, "the provider reports no "
                                          "worker process for this lease")
                    s.add(lease)
                    changed = True
                elif (lease.state == LeaseState.starting and lease.assigned_at is not None
                      and (now - as_utc(lease.assigned_at)).total_seconds()
                      > self.settings.start_timeout):
                    self._end_by_provider(
                        s, lease, EndReason.failed,
                        f"the worker did not connect to its scheduler within "
                        f"{self.settings.start_timeout:g} s of being placed")
                    s.add(lease)
                    changed = True
            s.commit()
        if changed or came_back:
            self.bump(provider.id)
            self.place_pending()

    def provider_leases(self, provider: Provider) -> list[dict]:
        """What the agent should run (starting, running) and stop (releasing)."""
        with self.session() as s:
            rows = s.exec(
                select(Lease, ClusterRecord)
                .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
                .where(Lease.provider_id == provider.id, col(Lease.state).in_(HELD_STATES))
            ).all()
        return [
            {
                "id": lease.id,
                "state": lease.state.value,
                "scheduler_address": cluster.scheduler_address,
                "ca_cert": cluster.ca_cert,
                "cert": lease.worker_cert,
                "csr_sent": bool(lease.worker_csr),
                "cpus": lease.cpus,
                "memory": lease.memory,
                "gpus": lease.gpus,
                "gpu_indices": lease.gpu_indices,
            }
            for lease, cluster in rows
        ]

    def report_lease_state(self, provider: Provider, lease_id: str,
                           body: LeaseStateReport) -> Lease:
        with self.session() as s:
            lease = s.get(Lease, lease_id)
            if lease is None or lease.provider_id != provider.id:
                raise NotFound("unknown-lease",
                               f"no lease {lease_id!r} assigned to provider {provider.id}")
            if lease.state == LeaseState.ended:
                return lease  # idempotent: a repeated or late report changes nothing
            if body.state == LeaseState.running:
                # The agent says the process started; the lease runs (and is metered) only
                # once the cluster confirms that its worker joined the scheduler.
                return lease
            elif body.state == LeaseState.ended:
                reason = body.reason
                if reason is None:
                    reason = (EndReason.released if lease.state == LeaseState.releasing
                              else EndReason.failed)
                self._end_by_provider(s, lease, reason, body.message)
            else:
                raise Invalid("bad-state", "an agent can report 'running' or 'ended', "
                               f"not {body.state.value!r}")
            s.add(lease)
            s.commit()
        self.bump(provider.id)
        if lease.state == LeaseState.ended:
            self.meter(lease_ids={lease.id})
            self.place_pending()
        return lease

    # ---- clusters -------------------------------------------------------------------------

    def create_cluster(self, principal: Principal, body: ClusterCreate) -> ClusterRecord:
        from ..tls import is_ca_certificate

        if principal.user_id is None:
            raise NotAllowed("not-a-user", "clusters belong to users; use a user token")
        if not is_ca_certificate(body.ca_cert):
            raise Invalid("bad-ca", "ca_cert must be a PEM CA certificate")
        with self.session() as s:
            if body.labs:
                known = set(s.exec(select(Lab.name).where(col(Lab.name).in_(body.labs))).all())
                unknown = sorted(set(body.labs) - known)
                if unknown:
                    raise Invalid("unknown-lab",
                                   f"labs: no lab named {', '.join(map(repr, unknown))}; "
                                   "parallex lab list shows the federation's labs")
            cluster = ClusterRecord(id="cl_" + uuid.uuid4().hex[:12], name=body.name,
                                    user_id=principal.user_id, lab_id=principal.lab_id,
                                    scheduler_address=body.scheduler_address,
                                    ca_cert=body.ca_cert,
                                    allowed_labs_json=json.dumps(sorted(set(body.labs))),
                                    allowed_sites_json=json.dumps(sorted(set(body.sites))))
            s.add(cluster)
            s.commit()
        logger.info("cluster %s registered by %s", cluster.id, principal.user_name)
        return cluster

    def cluster_for(self, principal: Principal, cluster_id: str) -> ClusterRecord:
        """The cluster, if the caller may act on it: its owner or an administrator."""
        with self.session() as s:
            cluster = s.get(ClusterRecord, cluster_id)
        # Another user's cluster answers exactly like an unknown one: ids are not disclosed.
        if cluster is None or (not principal.is_admin and cluster.user_id != principal.user_id):
            raise NotFound("unknown-cluster", f"no cluster {cluster_id!r} of yours")
        return cluster

    def list_clusters(self, principal: Principal, active_only: bool = True) -> list[ClusterPublic]:
        """The caller's clusters (every cluster for an administrator), in four queries
        whatever their number."""
        with self.session() as s:
            q = select(ClusterRecord).order_by(ClusterRecord.created_at)
            if active_only:
                q = q.where(ClusterRecord.active == True)  # noqa: E712
            if not principal.is_admin:
                q = q.where(ClusterRecord.user_id == principal.user_id)
            return _clusters_public(s, list(s.exec(q)))

    def cluster_public(self, cluster_id: str) -> ClusterPublic:
        with self.session() as s:
            return _clusters_public(s, [s.get(ClusterRecord, cluster_id)])[0]

    def cluster_heartbeat(self, cluster: ClusterRecord,
                          connected: list[str] | None = None) -> ClusterPublic:
        """Note that the cluster lives; leases whose workers it says joined its scheduler
        become running (and metered) from now."""
        if not cluster.active:
            raise Conflict("cluster-ended",
                           f"cluster {cluster.id} was ended ({cluster.end_reason}); "
                           "start a new FederatedCluster")
        now = utcnow()
        with self.session() as s:
            row = s.get(ClusterRecord, cluster.id)
            row.last_seen = now
            s.add(row)
            if connected:
                for lease in s.exec(select(Lease).where(
                        Lease.cluster_id == cluster.id, Lease.state == LeaseState.starting,
                        col(Lease.id).in_(connected))):
                    move(lease, LeaseState.running, at=now)
                    s.add(lease)
            s.commit()
        return self.cluster_public(cluster.id)

    def request_leases(self, cluster: ClusterRecord, body: LeaseCreate) -> list[str]:
        """Create the asked leases (pending) and place what fits; returns their ids."""
        if not cluster.active:
            raise Conflict("cluster-ended", f"cluster {cluster.id} has ended")
        spec = body.spec
        request = placement.LeaseRequest(
            lease_id="?", cluster_id=cluster.id, cpus=spec.cpus, memory=spec.memory,
            gpus=spec.gpus, gpu_model=spec.gpu_model,
            allowed_labs=frozenset(json.loads(cluster.allowed_labs_json)),
            allowed_sites=frozenset(json.loads(cluster.allowed_sites_json)))
        with self.exclusive(), self.session() as s:
            self._lock_across_processes(s)
            online = s.exec(select(Provider).where(Provider.online == True)).all()  # noqa: E712
            lab_names = names_by_id(s, Lab, {p.lab_id for p in online})
            totals = [_capacity(p, [], lab_names) for p in online]
            why = placement.largest_offer(totals, request)
            if why is not None:
                raise Invalid("no-provider-fits",
                               f"no provider in the federation can ever host this worker: {why}")
            self._check_credit_and_quotas(s, cluster, spec, len(body.workers))
            ids = [w.lease_id for w in body.workers]
            if len(set(ids)) != len(ids):
                raise Invalid("duplicate-lease-id", "lease ids in one request must differ")
            taken = s.exec(select(Lease.id).where(col(Lease.id).in_(ids))).all()
            if taken:
                raise Conflict("lease-id-taken", f"lease ids already exist: {sorted(taken)}")
            leases = [
                Lease(id=lease_id, cluster_id=cluster.id, group=body.group, cpus=spec.cpus,
                      memory=spec.memory, gpus=spec.gpus, gpu_model=spec.gpu_model)
                for lease_id in ids
            ]
            s.add_all(leases)
            s.commit()
        self.place_pending()
        return [lease.id for lease in leases]

    @staticmethod
    def _check_credit_and_quotas(s: Session, cluster: ClusterRecord, spec, n: int) -> None:
        """Refuse new workers for a lab over its credit limit (402) or over a quota (403)."""
        lab = s.get(Lab, cluster.lab_id)
        owed = ledger.balance(s, ledger.lab_account(s, lab).id)
        if owed < -to_nano(lab.credit_limit):
            raise OverCreditLimit("credit-limit",
                           f"lab {lab.name}'s balance is {fmt_pcu(owed)}, below its credit "
                           f"limit of -{lab.credit_limit:,.2f} PCU: new workers are refused "
                           "(running ones keep running). Ask your PI or an administrator for "
                           "a grant, or let your lab's machines earn credits.")
        live = col(Lease.state).in_(LIVE_STATES)
        lab_rows = s.exec(select(Lease.cpus, Lease.gpus, ClusterRecord.user_id)
                          .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
                          .where(ClusterRecord.lab_id == lab.id, live)).all()
        want_cpus, want_gpus = spec.cpus * n, spec.gpus * n
        member = s.get(Membership, (cluster.user_id, lab.id))
        for who, rows, max_cpus, max_gpus in (
                (f"lab {lab.name}", lab_rows, lab.max_cpus, lab.max_gpus),
                ("you", [r for r in lab_rows if r[2] == cluster.user_id],
                 member.max_cpus if member else None, member.max_gpus if member else None)):
            held_cpus = sum(r[0] for r in rows)
            held_gpus = sum(r[1] for r in rows)
            if max_cpus is not None and held_cpus + want_cpus > max_cpus:
                raise NotAllowed("quota-exceeded",
                               f"{who} may hold at most {max_cpus:g} CPUs at once; {held_cpus:g} "
                               f"are held and this asks for {want_cpus:g} more")
            if max_gpus is not None and held_gpus + want_gpus > max_gpus:
                raise NotAllowed("quota-exceeded",
                               f"{who} may hold at most {max_gpus} GPUs at once; {held_gpus} are "
                               f"held and this asks for {want_gpus} more")

    def release_leases(self, cluster: ClusterRecord, lease_ids: list[str],
                       reason: EndReason = EndReason.released, message: str = "") -> int:
        with self.session() as s:
            rows = s.exec(select(Lease).where(col(Lease.id).in_(lease_ids))).all()
            found = {r.id for r in rows}
            # Another cluster's leases answer exactly like unknown ones.
            missing = [i for i in lease_ids if i not in found] + [
                r.id for r in rows if r.cluster_id != cluster.id]
            if missing:
                raise NotFound("unknown-lease",
                               f"no such leases in this cluster: {sorted(missing)}")
            touched = self._release_all(s, rows, reason, message)
            s.commit()
        self._after_release(touched)
        return len(touched)

    def close_cluster(self, cluster_id: str, reason: str = "closed") -> None:
        lease_reason = EndReason.lost if reason == "lost" else EndReason.released
        with self.session() as s:
            cluster = s.get(ClusterRecord, cluster_id)
            if cluster.active:
                cluster.active = False
                cluster.end_reason = reason
                cluster.closed_at = utcnow()
                s.add(cluster)
            live = s.exec(select(Lease).where(Lease.cluster_id == cluster_id,
                                              col(Lease.state).in_(LIVE_STATES))).all()
            touched = self._release_all(s, live, lease_reason, f"cluster {reason}")
            s.commit()
        self._after_release(touched)

    def _release_all(self, s: Session, leases: list[Lease], reason: EndReason,
                     message: str) -> set[str | None]:
        """Release each lease; returns the providers whose agents must hear of it."""
        touched: set[str | None] = set()
        for lease in leases:
            if self._release(lease, reason, message):
                s.add(lease)
                touched.add(lease.provider_id)
        return touched

    def _after_release(self, touched: set[str | None]) -> None:
        for provider_id in touched:
            self.bump(provider_id)
        self.place_pending()

    # ---- worker certificates ------------------------------------------------------------
    #
    # The agent makes the worker's key on its machine and sends a signing request; the cluster
    # signs it with its own CA and sends the certificate back. The broker relays requests and
    # certificates, which are public, and never holds a private key.

    def submit_signing_request(self, provider: Provider, lease_id: str, csr_pem: str) -> None:
        """Store the agent's signing request for a starting lease and wake its cluster."""
        try:
            load_worker_request(csr_pem, lease_id)
        except BadSigningRequest as exc:
            raise Invalid("bad-signing-request", f"lease {lease_id}: {exc}") from exc
        with self.session() as s:
            lease = s.get(Lease, lease_id)
            if lease is None or lease.provider_id != provider.id:
                raise NotFound("unknown-lease",
                               f"no lease {lease_id!r} assigned to provider {provider.id}")
            if lease.state != LeaseState.starting:
                raise Conflict("not-starting",
                               f"lease {lease_id} is {lease.state.value}; only a starting "
                               "lease's worker gets a certificate")
            # A new request (the agent restarted and lost its key) replaces the old one.
            lease.worker_csr = csr_pem
            lease.worker_cert = ""
            s.add(lease)
            s.commit()
            cluster_id = lease.cluster_id
        self.bump(f"cluster:{cluster_id}")

    def signing_requests(self, cluster: ClusterRecord) -> list[dict]:
        """The cluster's starting leases whose agents wait for a certificate."""
        with self.session() as s:
            rows = s.exec(select(Lease.id, Lease.worker_csr).where(
                Lease.cluster_id == cluster.id, Lease.state == LeaseState.starting,
                Lease.worker_csr != "", Lease.worker_cert == "")).all()
        return [{"lease_id": lease_id, "csr": csr} for lease_id, csr in rows]

    def submit_certificates(self, cluster: ClusterRecord,
                            certificates: list[WorkerCertificate]) -> int:
        """Store the cluster's certificates for its leases' signing requests (all or none)."""
        touched: set[str | None] = set()
        with self.session() as s:
            for item in certificates:
                lease = s.get(Lease, item.lease_id)
                if lease is None or lease.cluster_id != cluster.id:
                    raise NotFound("unknown-lease",
                                   f"no lease {item.lease_id!r} in this cluster")
                if lease.state != LeaseState.starting or not lease.worker_csr:
                    raise Conflict("no-signing-request",
                                   f"lease {item.lease_id} is {lease.state.value} and has no "
                                   "signing request waiting")
                # signed_by also refuses what does not parse, so identity can be read after.
                if not signed_by(item.cert, cluster.ca_cert):
                    raise Invalid("bad-worker-cert",
                                   f"the certificate for lease {item.lease_id} is not signed "
                                   "by this cluster's CA")
                name, role = certificate_identity(item.cert)
                if name != item.lease_id or role != ROLE_WORKER:
                    raise Invalid("bad-worker-cert",
                                   f"the certificate for lease {item.lease_id} must be a worker "
                                   f"certificate with CN={item.lease_id}; it has CN={name!r}")
                if not certificate_matches_request(item.cert, lease.worker_csr):
                    raise Invalid("bad-worker-cert",
                                   f"the certificate for lease {item.lease_id} is not for the "
                                   "key of its signing request")
                lease.worker_cert = item.cert
                s.add(lease)
                touched.add(lease.provider_id)
            s.commit()
        for provider_id in touched:
            self.bump(provider_id)
        return len(certificates)

    def provider_offline(self, provider: Provider) -> int:
        """An agent that shuts down says so: no new lease goes to its machine, and what it
        held ends now (preempted: no fault of the provider) instead of after the provider
        timeout, so clusters replace those workers at once. Returns how many leases ended."""
        ended: set[str] = set()
        with self.session() as s:
            row = s.get(Provider, provider.id)
            row.online = False
            s.add(row)
            for lease in s.exec(select(Lease).where(Lease.provider_id == row.id,
                                                    col(Lease.state).in_(HELD_STATES))):
                self._end_by_provider(s, lease, EndReason.preempted,
                                      f"provider {row.name} went offline (its agent stopped)")
                s.add(lease)
                ended.add(lease.id)
            s.commit()
        logger.info("provider %s went offline; %d leases ended", provider.id, len(ended))
        self.bump(provider.id)
        if ended:
            self.meter(lease_ids=ended)
        self.place_pending()
        return len(ended)

    # ---- timeouts -------------------------------------------------------------------------

    def reap(self) -> None:
        """End what went silent: providers past the provider timeout, clusters past theirs."""
        now = utcnow()
        provider_cutoff = now - dt.timedelta(seconds=self.settings.provider_timeout)
        cluster_cutoff = now - dt.timedelta(seconds=self.settings.cluster_timeout)
        lost_providers: list[str] = []
        lost_leases: set[str] = set()
        with self.session() as s:
            for p in s.exec(select(Provider).where(Provider.online == True,  # noqa: E712
                                                   Provider.last_seen < provider_cutoff)):
                p.online = False
                s.add(p)
                lost_providers.append(p.id)
                for lease in s.exec(select(Lease).where(Lease.provider_id == p.id,
                                                        col(Lease.state).in_(HELD_STATES))):
                    self._end_by_provider(s, lease, EndReason.lost,
                                          f"provider {p.name} stopped heart-beating for more "
                                          f"than {self.settings.provider_timeout:g} s")
                    s.add(lease)
                    lost_leases.add(lease.id)
            lost_clusters = [c.id for c in s.exec(
                select(ClusterRecord).where(ClusterRecord.active == True,  # noqa: E712
                                            ClusterRecord.last_seen < cluster_cutoff))]
            s.commit()
        for pid in lost_providers:
            logger.warning("provider %s is lost; its leases ended", pid)
            self.bump(pid)
        for cid in lost_clusters:
            logger.warning("cluster %s stopped heart-beating; ending its leases", cid)
            self.close_cluster(cid, reason="lost")
        if lost_providers:
            self.meter(lease_ids=lost_leases)
            self.place_pending()
        if time.monotonic() - self._last_metering >= self.settings.metering_interval:
            self.meter()
        if time.monotonic() - self._last_capacity >= self.settings.capacity_interval:
            self._last_capacity = time.monotonic()
            with self.session() as s:
                record_capacity(s)
                s.commit()

    # ---- metering -------------------------------------------------------------------------

    def meter(self, now: dt.datetime | None = None,
              lease_ids: set[str] | None = None) -> int:
        """Charge running leases' whole periods and ended leases' remainders: all of them
        (the periodic pass), or only ``lease_ids`` (a lease that just ended)."""
        now = now or utcnow()
        query = (
            select(Lease, ClusterRecord, Provider)
            .join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
            .join(Provider, Provider.id == Lease.provider_id)
            .where(Lease.started_at != None,  # noqa: E711
                   or_(col(Lease.state).in_([LeaseState.running, LeaseState.releasing]),
                       and_(Lease.state == LeaseState.ended,
                            or_(Lease.metered_until == None,  # noqa: E711
                                Lease.metered_until < Lease.ended_at)))))
        if lease_ids is None:
            self._last_metering = time.monotonic()
        elif not lease_ids:
            return 0
        else:
            query = query.where(col(Lease.id).in_(lease_ids))
        with self.session() as s:
            rows = s.exec(query).all()
            if not rows:
                return 0
            factors = reliability.reliabilities(s, sorted({p.id for _l, _c, p in rows}))
            usages = [LeaseUsage(
                lease.id, cluster.user_id, cluster.lab_id, provider.lab_id, provider.id,
                lease.started_at, lease.ended_at if lease.state == LeaseState.ended else None,
                Resources(lease.cpus, lease.memory, lease.gpus, lease.priced_gpu_model),
                reliability=factors[provider.id])
                for lease, cluster, provider in rows]
            try:
                records = metering.meter(
                    s, usages, now=now, interval=self.settings.metering_interval,
                    half_life=self.settings.fair_share_half_life,
                    cloud=self.settings.cloud_prices,
                    reliability_half_life=self.settings.reliability_half_life)
                last: dict[str, dt.datetime] = {}
                for r in records:
                    last[r.lease_id] = max(last.get(r.lease_id, r.period_end), r.period_end)
                for lease, _c, _p in rows:
                    until = lease.ended_at if lease.state == LeaseState.ended else last.get(
                        lease.id)
                    if until is not None:
                        lease.metered_until = until
                        s.add(lease)
                s.commit()
            except IntegrityError:
                # Another meterer recorded a period first; the next pass finds it done.
                s.rollback()
                logger.warning("metering pass collided with another; will retry")
                return 0
        return len(records)

    # ---- placement ------------------------------------------------------------------------

    def place_pending(self) -> int:
        """Assign pending leases to providers with room; returns how many were placed.

        One pass at a time (``exclusive``): two passes reading the same free capacity would
        both fill it."""
        with self.exclusive(), self.session() as s:
            self._lock_across_processes(s)
            pending = s.exec(
                select(Lease).join(ClusterRecord, ClusterRecord.id == Lease.cluster_id)
                .where(Lease.state == LeaseState.pending, ClusterRecord.active == True)  # noqa: E712
                .order_by(Lease.created_at, Lease.id)
            ).all()
            if not pending:
                return 0
            providers = s.exec(select(Provider).where(Provider.online == True)).all()  # noqa: E712
            held = s.exec(select(Lease).where(col(Lease.state).in_(HELD_STATES))).all()
            by_provider: dict[str, list[Lease]] = {}
            for lease in held:
                by_provider.setdefault(lease.provider_id, []).append(lease)
            lab_names = {lab.id: lab.name for lab in s.exec(select(Lab))}
            snapshot = [_capacity(p, by_provider.get(p.id, []), lab_names) for p in providers]
            provider_lab = {p.id: lab_names.get(p.lab_id, "") for p in providers}
            cluster_labs: dict[str, Counter[str]] = {}
            for lease in held:
                if lease.state != LeaseState.releasing:
                    cluster_labs.setdefault(lease.cluster_id, Counter())[
                        provider_lab.get(lease.provider_id, "")] += 1
            requests = self._fair_order(s, pending, lab_names)
            placed = placement.place_with_owner_priority(requests, snapshot, cluster_labs,
                                                         self.rng)
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
                    reason = placement.why_waiting(req, snapshot)
                    if lease.message != reason:
                        lease.message = reason
                        s.add(lease)
            s.commit()
        for pid in {p.provider_id for p in placed}:
            self.bump(pid)
        return len(placed)

    def _fair_order(self, s: Session, pending: list[Lease],
                    lab_names: dict[int, str]) -> list[placement.LeaseRequest]:
        """Pending leases as placement requests, in fair-share order."""
        clusters = {c.id: c for c in s.exec(select(ClusterRecord).where(
            col(ClusterRecord.id).in_({lease.cluster_id for lease in pending})))}
        now = utcnow()
        half_life = self.settings.fair_share_half_life
        lab_ids = {c.lab_id for c in clusters.values()}
        shares = {lab.id: lab.share for lab in s.exec(select(Lab).where(
            col(Lab.id).in_(lab_ids)))}
        lab_usage = fairshare.usage_now(s, "lab", lab_ids, now, half_life)
        user_usage = fairshare.usage_now(s, "user", {c.user_id for c in clusters.values()},
                                         now, half_life)
        claims = [fairshare.Claim(lease.id, clusters[lease.cluster_id].lab_id,
                                  clusters[lease.cluster_id].user_id, lease.created_at)
                  for lease in pending]
        by_id = {lease.id: lease for lease in pending}
        allowed = {cid: (frozenset(json.loads(c.allowed_labs_json)),
                         frozenset(json.loads(c.allowed_sites_json)))
                   for cid, c in clusters.items()}
        requests = []
        for c in fairshare.fair_order(claims, shares, lab_usage, user_usage):
            lease = by_id[c.request_id]
            labs, sites = allowed[lease.cluster_id]
            requests.append(placement.LeaseRequest(
                lease_id=lease.id, cluster_id=lease.cluster_id, cpus=lease.cpus,
                memory=lease.memory, gpus=lease.gpus, gpu_model=lease.gpu_model,
                lab=lab_names.get(c.lab, ""), allowed_labs=labs, allowed_sites=sites))
        return requests

    # ---- helpers --------------------------------------------------------------------------

    def _end_by_provider(self, s: Session, lease: Lease, reason: EndReason,
                         message: str) -> None:
        """End ``lease`` on news from (or about) its provider; a lost or failed end counts
        against the provider's reliability unless the lease was already being released."""
        releasing = lease.state == LeaseState.releasing
        self._end(lease, reason, message)
        if (not releasing and lease.provider_id
                and lease.end_reason in (EndReason.lost, EndReason.failed)):
            reliability.record_incident(s, lease.provider_id, lease.end_reason.value,
                                        at=lease.ended_at)

    @staticmethod
    def _end(lease: Lease, reason: EndReason, message: str = "") -> None:
        # A reason chosen when the release was asked for (released, lost cluster) wins.
        move(lease, LeaseState.ended, at=utcnow(), reason=reason, message=message)

    def _release(self, lease: Lease, reason: EndReason, message: str) -> bool:
        """Move a live lease towards ended; True when it changed."""
        if lease.state == LeaseState.pending:
            self._end(lease, reason, message)
            return True
        if lease.state in (LeaseState.starting, LeaseState.running):
            move(lease, LeaseState.releasing, at=utcnow(), reason=reason, message=message)
            return True
        return False


def _check_provider_limits(lab: Lab, body: ProviderRegister) -> None:
    """Refuse a machine larger than an administrator allows for the lab (403): a provider
    that declares capacity it does not have would be placed and paid for it."""
    asked = [(body.cpus, lab.provider_max_cpus, "CPU cores", str),
             (body.memory, lab.provider_max_memory, "memory", format_bytes),
             (len(body.gpus), lab.provider_max_gpus, "GPUs", str)]
    for value, limit, what, fmt in asked:
        if value > limit:
            raise NotAllowed("provider-over-limit",
                           f"this machine offers {fmt(value)} {what}; lab {lab.name} may offer "
                           f"at most {fmt(limit)} per machine. Offer less (parallex provide "
                           f"--cpus/--memory/--gpus) or ask an administrator to raise the "
                           f"lab's provider limit")


def _clusters_public(s: Session, clusters: list[ClusterRecord]) -> list[ClusterPublic]:
    """The public view of ``clusters``: their owners, labs, leases and the labs of the
    leases' providers, one query each (the heartbeat reads one cluster every few seconds)."""
    if not clusters:
        return []
    ids = [c.id for c in clusters]
    users = names_by_id(s, User, {c.user_id for c in clusters})
    labs = names_by_id(s, Lab, {c.lab_id for c in clusters})
    leases: dict[str, list[Lease]] = {cid: [] for cid in ids}
    for lease in s.exec(select(Lease).where(col(Lease.cluster_id).in_(ids))
                        .order_by(Lease.created_at, Lease.id)):
        leases[lease.cluster_id].append(lease)
    provider_labs = dict(s.exec(
        select(Provider.id, Lab.name).join(Lab, Lab.id == Provider.lab_id)
        .where(col(Provider.id).in_({le.provider_id for group in leases.values()
                                     for le in group if le.provider_id}))).all())
    return [ClusterPublic(
        id=c.id, name=c.name, user=users[c.user_id], lab=labs[c.lab_id],
        scheduler_address=c.scheduler_address, labs=json.loads(c.allowed_labs_json),
        sites=json.loads(c.allowed_sites_json), active=c.active, end_reason=c.end_reason,
        created_at=c.created_at,
        leases=[LeasePublic(**lease.model_dump(), lab=provider_labs.get(lease.provider_id))
                for lease in leases[c.id]])
        for c in clusters]


def _capacity(provider: Provider, held: list[Lease],
              lab_names: dict[int, str] | None = None) -> placement.ProviderCapacity:
    used_gpus = {i for lease in held for i in lease.gpu_indices}
    return placement.ProviderCapacity(
        provider_id=provider.id,
        lab=(lab_names or {}).get(provider.lab_id, str(provider.lab_id)),
        site=provider.site,
        free_cpus=provider.cpus - sum(lease.cpus for lease in held),
        free_memory=provider.memory - sum(lease.memory for lease in held),
        free_gpus=[placement.GpuSlot(g["index"], g["model"], g["memory"])
                   for g in provider.gpus if g["index"] not in used_gpus],
    )
