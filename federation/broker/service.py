"""The broker's service: each public method is one request's unit of work.

A change commits in a short unit of its own and then asks the placer (a ``coalescer``) for a
placement pass: one thread runs passes, one for all the asks that arrive while another runs,
so requests no longer queue behind one another's passes. A scale request waits (bounded) for
the pass after it so that its answer shows where its leases went. Agents and clusters are
woken after the commit, and the leases a change ended are metered after it in a unit of its
own (a metering collision must not undo the change). The rules live beside this module, one
concern each:

- ``admission``: credit, quotas, sizes, identifiers, certificates (checks that raise);
- ``placing``: the placement pass and its lock;
- ``coalescer``: the threads that run placement passes and meter ended leases;
- ``placement_asks``: with several replicas, only the leader places; the others ask it;
- ``placement_process``: on PostgreSQL the leader's passes run in a child process;
- ``timeouts``: what went silent or is overdue;
- ``metering_runs``: which leases a metering pass charges;
- ``lease_ends``: ending and releasing leases (through ``federation.lease_states.move``);
- ``wakeups``: agents' and clusters' long polls;
- ``views``: what the API shows of clusters and leases;
- ``errors``: the domain errors all of them raise (HTTP statuses are mapped in app.py).

Routes run in FastAPI's thread pool, the reaper and the placer on threads of their own, so
calls overlap. Every placement pass runs in ``_placing()``: this process's exclusive section
and, on PostgreSQL, an advisory transaction lock other broker processes on the same database
respect. Without it two passes read the same free capacity and both fill it
(tests/federation/test_concurrency.py double-booked a provider by 3 CPUs of 8 before).
On PostgreSQL the other changes do not wait for passes: releases, closes and reports lock the
lease rows they change (a pass skips rows locked so, ``_row_locked``), admissions of one
lab wait on each other where a quota applies (``lock_lab_admissions``). Under issue 14's
load the releases and scale requests of 100 users queued behind back-to-back passes on the
one placement lock for seconds. SQLite (one process, one writer) keeps all of them in the
exclusive section.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TypeVar

from sqlalchemy import bindparam, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from accounting.bulk import insert_rows
from accounting.models import Lab, utcnow
from accounting.pricing import ensure_default_price
from accounting.sql_lists import one_of

from ..gateway_routes import route_of
from ..lease_states import move_columns
from . import admission, db, environments
from .agent_batches import (
    Heartbeat,
    LeaseListRead,
    Report,
    each_alone_if_refused,
    end_late,
    read_lease_lists,
    record_heartbeats,
    record_reports,
)
from .auth import Principal
from .capacity import record_capacity
from .coalescer import Coalescer
from .errors import Conflict, Invalid, NotAllowed, NotFound, TooSoon, Unavailable
from .lease_ends import RELEASE_COLUMNS, end_by_provider, release_rows
from .memo import BoundedMap
from .metering_runs import meter_pass, meter_unit
from .metrics import BrokerMetrics
from .models import (
    HELD_STATES,
    LIVE_STATES,
    NOT_ENDED,
    ClusterCreate,
    ClusterPublic,
    ClusterRecord,
    EndReason,
    Environment,
    EnvironmentCreate,
    EnvironmentWheel,
    Lease,
    LeaseCreate,
    LeasePublic,
    LeaseState,
    LeaseStateReport,
    Provider,
    ProviderRegister,
    WorkerCertificate,
)
from .periodic_process import PeriodicProcess, PeriodicProcessStopped
from .placement_asks import PlacementAsks
from .placement_process import PlacementProcess
from .placing import (
    lock_across_processes,
    lock_lab_admissions,
    lock_machine_registration,
    place_pending,
    request_of,
)
from .preemption import RecentPreemptionRates
from .replicas import IDENTITY_CHANGED, WakeupRelay, hold_leadership, is_postgresql
from .settings import BrokerSettings
from .timeouts import end_silent_providers
from .token_cache import PrincipalCache, on_identity_change
from .views import (
    PUBLIC_LEASE_COLUMNS,
    agent_leases,
    cluster_head,
    cluster_heads,
    cluster_public_json,
    clusters_public,
    leases_public,
)
from .wakeups import Wakeups

logger = logging.getLogger("parallex.broker")

#: Seconds a scale request waits for the placement pass that follows it, so that its answer
#: says where its leases went or why they wait; past it the answer shows them pending and
#: the pass still comes (agents and the cluster hear of it through their long polls).
PLACEMENT_WAIT = 5.0
#: Seconds an agent that goes offline waits for its ended leases' charge to be booked (a
#: batch with the other leases that ended meanwhile); past it the answer goes, and the
#: charge follows (or the next periodic metering pass makes it).
METERING_WAIT = 5.0
#: Seconds a heartbeat waits for its batch before it is answered 503 (the agent sends the
#: next one as usual).
HEARTBEAT_WAIT = 10.0
#: Seconds a heartbeat batch may run before heartbeats that repeat the last one wait for
#: their batch too (the database is slow or away: the agent is told with a 503), instead of
#: being answered once queued.
HEARTBEAT_STALL = 1.0
#: How the warning about a heartbeat batch that took longer than that begins.
SLOW_HEARTBEAT_BATCH = "a heartbeat batch took"
#: Seconds an agent's report of a lease's state waits for its batch before it is answered
#: 503 (the agent reports it again).
REPORT_WAIT = 10.0
#: Seconds an ended lease stays in a cluster heartbeat's answer (at least three cluster
#: timeouts).
ENDED_SHOWN = 600.0
#: Clusters ``GET /clusters`` lists at most by default (the newest): an administrator's
#: ``?all=true`` listed every cluster the federation ever had.
CLUSTERS_LISTED = 200
#: Seconds a long poll's answer waits for its lease-list batch before reading it alone.
LEASE_LIST_WAIT = 10.0
#: Providers whose lab is remembered (a few bytes each; the least recently added go first).
PROVIDER_LABS_KEPT = 200_000
#: Seconds between the leader's placement passes when nothing asked for one.
SWEEP_INTERVAL = 10.0


def dashboard_key_hash(key: str) -> str:
    """What the broker keeps of a dashboard link's secret."""
    return hashlib.sha256(key.encode()).hexdigest()


#: A cluster heartbeat's write of its last_seen (built once, as views' reads).
_SEEN = (update(ClusterRecord).where(ClusterRecord.id == bindparam("cluster_id"))
         .values(last_seen=bindparam("now")))


def confirm_joined(conn: Connection, cluster_id: str, lease_ids: list[str],
                   at: dt.datetime) -> None:
    """A cluster heartbeat's confirmation: those of ``lease_ids`` that are the cluster's and
    still starting move to running (``lease_states.move_columns``: ``started_at``, from
    which they are metered), locked in id order first (PostgreSQL;
    SQLite has one writer). Still starting in both conditions: PostgreSQL checks them again
    on a row changed since the statement began (a release or a close at the same moment),
    and leaves it out. The ids as one array on PostgreSQL (``one_of``): one statement text
    whatever their number."""
    locked = (select(Lease.id)
              .where(Lease.cluster_id == cluster_id, Lease.state == LeaseState.starting,
                     one_of(conn, Lease.id, lease_ids))
              .order_by(Lease.id).with_for_update())
    # The message goes: what the lease waited for (an environment's build) is over. Through
    # ``move`` (which keeps a lease's message for an empty one) a running lease kept showing
    # its last build step.
    values = {**move_columns((LeaseState.starting,), LeaseState.running, at=at), "message": ""}
    conn.execute(update(Lease)
                 .where(Lease.state == LeaseState.starting, col(Lease.id).in_(locked))
                 .values(values))


#: A cluster's ClusterRecord or its row in ``views.CLUSTER_HEAD``.
ClusterRow = TypeVar("ClusterRow")


def _said(beat: Heartbeat) -> tuple:
    """What a heartbeat says that recording it may change: its workers and its offer."""
    return frozenset(beat.running), beat.offering, beat.offer_note


def _owned(principal: Principal, cluster_id: str, cluster: ClusterRow | None) -> ClusterRow:
    """``cluster`` if the caller may act on it: its owner or an administrator."""
    # Another user's cluster answers exactly like an unknown one: ids are not disclosed.
    if cluster is None or (not principal.is_admin and cluster.user_id != principal.user_id):
        raise NotFound("unknown-cluster", f"no cluster {cluster_id!r} of yours")
    return cluster


def _active(cluster: ClusterRow) -> ClusterRow:
    """``cluster``, refused when it has ended."""
    if not cluster.active:
        raise Conflict("cluster-ended", f"cluster {cluster.id} was ended "
                       f"({cluster.end_reason}); start a new FederatedCluster")
    return cluster


#: How a periodic metering pass's log line begins (its duration and periods follow).
METERING_PASS_LOGGED = "metering pass took"


class Broker:
    """The broker's state beside the database (engine, settings, wake-ups) and its
    operations, one unit of work each."""

    #: The federation gateway's address workers dial (host:port), None when there is none.
    gateway_address: str | None = None
    #: The gateway's address inside the hub's network (schedulers dial it to reach workers
    #: without leaving that network), None when there is no gateway.
    gateway_internal: str | None = None

    def __init__(self, engine: Engine, settings: BrokerSettings, seed: int | None = None):
        self.engine = engine
        #: The same pool, each statement a transaction of its own: for the agents' batches
        #: and units of work that only read (``reading``).
        self.autocommit_engine = db.autocommit(engine)
        #: The agents' batchers' own pool (``db.batch_engine``; ``engine`` on SQLite), and
        #: the same with each statement a transaction of its own.
        self.batch_engine = db.batch_engine(engine, settings.db_ping_after_idle)
        self.batch_autocommit = db.autocommit(self.batch_engine)
        self.settings = settings
        #: Where users' schedulers may listen (BrokerSettings.scheduler_networks).
        self.scheduler_networks = admission.parse_networks(settings.scheduler_networks)
        self.boot_id = uuid.uuid4().hex[:8]
        self.rng = random.Random(seed)
        #: Providers' preemption rates as this replica's placement passes last read them.
        self.preemption_rates = RecentPreemptionRates()
        #: The online machines' shapes as this replica's admissions last read them.
        self.shapes_seen = admission.ShapesSeen()
        self.wakeups = Wakeups(self.boot_id)
        self._exclusive = threading.RLock()
        # Never, not monotonic time 0: that clock counts from the machine's boot, so 0 held
        # a broker's first pass back until the machine had been up for an interval (an hour
        # at a 3,600 s interval on a server booted just before).
        self._last_metering = -math.inf
        self._last_heartbeat: dict[str, float] = {}
        self._last_capacity = -math.inf
        self._last_sweep = time.monotonic()
        #: Prometheus metrics (GET /api/v1/metrics); passes time themselves into it.
        self.metrics = BrokerMetrics(self.session)
        #: Whether this replica runs the periodic passes now (always, on SQLite).
        self.is_leader = False
        #: Set while the server's leadership loop renews the leader lease
        #: (``keep_leadership``); without it (a broker used as a library) each reaper tick
        #: renews it.
        self.leadership_kept = False
        #: When the reaper tick under way began (monotonic), None between ticks.
        self._reaping_since: float | None = None
        self.metrics.leader.set_function(lambda: float(self.is_leader))
        # Several replicas on PostgreSQL: wake-ups cross them (started with the app).
        self.relay = (WakeupRelay(engine, self.boot_id, self._woken_by_replica)
                      if is_postgresql(engine) else None)
        #: The leader's periodic passes run in a process of their own (PostgreSQL only:
        #: periodic_process.py); None runs them on the reaper's thread.
        self.periodic = PeriodicProcess(engine, settings) if is_postgresql(engine) else None
        #: Placement passes run in a process of their own once the app started it
        #: (PostgreSQL only: placement_process.py); None places on the placer thread.
        self.placement_process = (PlacementProcess(engine, settings)
                                  if is_postgresql(engine) else None)
        #: Principals of API tokens seen in the last seconds (cleared on identity changes).
        self.principals = PrincipalCache(settings.token_cache)
        on_identity_change(engine, self._identity_changed)
        self.wakeups.relay = self.relay.send if self.relay is not None else None
        #: Runs placement passes for every change that frees or asks for capacity, one pass
        #: for all the asks that arrive while another runs or within --placement-spacing of
        #: its start (started with the app).
        self.placing_thread = Coalescer(self._placing_batch, "parallex-placer",
                                        spacing=self.settings.placement_spacing)
        #: Where asks for passes go: this replica's placing thread while it leads, else
        #: the leader's (placement_asks.py).
        self.placer = PlacementAsks(self.placing_thread, self.boot_id, lambda: self.is_leader,
                                    self.relay.send if self.relay is not None else None)
        self.metrics.asks_to_leader.set_function(lambda: float(self.placer.sent))
        self.metrics.long_polls.set_function(lambda: float(self.wakeups.waiting))
        self.metrics.placement_fallbacks.set_function(lambda: float(self.placer.fallbacks))
        #: Meters leases that just ended, many to a transaction (started with the app).
        self.end_meterer = Coalescer(lambda ids: self.meter(lease_ids=ids),
                                     "parallex-end-meterer",
                                     spacing=self.settings.end_metering_spacing)
        #: Records agents' heartbeats, many to a transaction (started with the app).
        self.heartbeats = Coalescer(self.record_heartbeats, "parallex-heartbeats")
        #: Records agents' reports of their leases, many to a transaction (started with the
        #: app).
        self.reports = Coalescer(self.record_reports, "parallex-reports")
        #: Reads agents' lease lists for long polls, many to a query (started with the app).
        self.lease_lists = Coalescer(self._read_lease_lists, "parallex-lease-lists")
        #: Which lab each provider seen so far belongs to (providers never change lab).
        self._provider_labs = BoundedMap(PROVIDER_LABS_KEPT)
        #: What each machine's heartbeat last recorded here said (its workers, its offer), and
        #: when (monotonic): a heartbeat that repeats it is answered once queued
        #: (agent_batches.py).
        self._beats_recorded: BoundedMap[str, tuple] = BoundedMap(PROVIDER_LABS_KEPT)

    def session(self) -> Session:
        return db.session(self.engine)

    def reading(self) -> Session:
        """A session for work that only reads: each statement a transaction of its own
        (``db.autocommit``), so a read is one round trip instead of three (psycopg's BEGIN,
        the statement, the pool's ROLLBACK on return). Not for reads that must agree with
        each other or with a write that follows: use ``session`` for those."""
        return db.session(self.autocommit_engine)

    def _identity_changed(self) -> None:
        """A token, membership, user or lab changed: what this replica remembers of tokens
        may be wrong, and the other replicas' too."""
        self.principals.clear()
        if self.relay is not None:
            self.relay.send({IDENTITY_CHANGED})

    def _woken_by_replica(self, key: str) -> None:
        """Another replica's notification: a lease list changed, or identities did."""
        if key == IDENTITY_CHANGED:
            self.principals.clear()
        elif not self.placer.heard(key):
            self.wakeups.bump(key, forward=False)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One capacity- or quota-consuming change at a time in this process."""
        with self._exclusive:
            yield

    @contextlib.contextmanager
    def _placing(self) -> Iterator[Session]:
        """A unit of work that may consume capacity or quota: exclusive here, the placement
        lock on PostgreSQL, one session (the caller commits)."""
        with self.exclusive(), self.session() as s:
            with self.metrics.placement_lock_wait.time():
                lock_across_processes(s)
            yield s

    @contextlib.contextmanager
    def _row_locked(self, autocommit: bool = False, batch: bool = False
                    ) -> Iterator[Session]:
        """A unit of work that changes held leases or one lab's providers, which a placement
        pass never writes: on PostgreSQL it locks the rows it changes (``with_for_update``)
        or the machine (``lock_machine_registration``) and does not wait for passes; SQLite, one
        process and one writer, keeps it in the exclusive section (a read transaction that
        later writes after another wrote would fail there). With ``autocommit`` each of its
        statements is a transaction of its own (``db.autocommit``); with ``batch`` it takes
        its connection from the agents' batchers' pool (``db.batch_engine``)."""
        if batch:
            engine = self.batch_autocommit if autocommit else self.batch_engine
        else:
            engine = self.autocommit_engine if autocommit else self.engine
        if is_postgresql(self.engine):
            with db.session(engine) as s:
                yield s
        else:
            with self.exclusive(), db.session(engine) as s:
                yield s

    def _place(self, s: Session) -> set[str]:
        """A placement pass inside the caller's unit of work; the providers to wake."""
        return place_pending(s, self.rng, self.settings.fair_share_half_life,
                             relayed=self.gateway_address is not None,
                             recent_rates=self.preemption_rates)

    def _placing_batch(self, asks: set) -> None:
        """The placing thread's batch: a pass, then the answers to the replicas that asked
        for it (even when it failed: their requests need not wait out their bound; the
        next pass places what this one missed)."""
        try:
            self.place_pending()
        finally:
            self.placer.pass_served(asks)

    def place_pending(self) -> int:
        """A placement pass as a unit of its own; returns how many providers got leases.
        In the placement process when it runs (placement_process.py), else here."""
        done = (self.placement_process.place(relayed=self.gateway_address is not None)
                if self.placement_process is not None else None)
        if done is not None:
            self.metrics.placement_lock_wait.observe(done.lock_wait)
            self.metrics.placement.observe(done.seconds)
            self.metrics.placement_passes.labels("placement").inc()
            placed: set[str] | frozenset[str] = done.placed
        else:
            self.metrics.placement_passes.labels("broker").inc()
            # Timed with its commit, which writes the placed leases (the ORM flushes them
            # there): the pass holds the lock until then.
            with self._placing() as s, self.metrics.placement.time():
                placed = self._place(s)
                s.commit()
        self.wakeups.bump_all(placed)
        return len(placed)

    # ---- start-up -------------------------------------------------------------------------

    def recover(self) -> None:
        """After a (re)start, give every agent and cluster a full timeout to check back in.

        The broker's own downtime must not count as their silence; agents then report which
        workers they run and the heartbeat reconciles the rest.
        """
        now = utcnow()
        with self._placing() as s:
            for p in s.exec(select(Provider).where(Provider.online == True)):  # noqa: E712
                p.last_seen = now
                s.add(p)
            for c in s.exec(select(ClusterRecord).where(ClusterRecord.active == True)):  # noqa: E712
                c.last_seen = now
                s.add(c)
            # Installed here, so reading a price never has to write one.
            ensure_default_price(s)
            placed = self._place(s)
            s.commit()
        self.wakeups.bump_all(placed)

    # ---- providers ------------------------------------------------------------------------

    def register_provider(self, principal: Principal, body: ProviderRegister) -> Provider:
        with self._row_locked() as s:
            lock_machine_registration(s, principal.lab_id, body.name)
            lab = s.get(Lab, principal.lab_id)
            admission.check_provider_limits(lab, body)
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
            provider.accepts_peers = body.accepts_peers
            provider.environment_json = (json.dumps(body.environment.model_dump())
                                         if body.environment else "{}")
            provider.online = True
            provider.last_seen = utcnow()
            s.add(provider)
            s.flush()
            environments.forget_failures(s, provider.id)
            s.commit()
            s.refresh(provider)
        logger.info("provider %s (%s) registered for lab %s: %g CPUs, %d bytes, %d GPUs",
                    provider.id, provider.name, principal.lab_name, provider.cpus,
                    provider.memory, len(body.gpus))
        self.wakeups.bump(provider.id)
        self.placer.ask()
        return provider

    def provider_for(self, principal: Principal, provider_id: str) -> Provider:
        """The caller's lab's provider ``provider_id`` (its row), else NotFound."""
        with self.reading() as s:
            provider = s.get(Provider, provider_id)
        if provider is not None:
            self._provider_labs.put(provider.id, provider.lab_id)
        # Another lab's provider answers exactly like an unknown one: ids are not disclosed.
        if provider is None or provider.lab_id != principal.lab_id:
            raise self._unknown_provider(provider_id)
        return provider

    def known_provider(self, principal: Principal, provider_id: str) -> str | None:
        """``provider_id`` when this replica knows it is the caller's lab's provider, None
        when it does not know the provider yet (``provider_for`` reads it); NotFound when
        it is another lab's. Never touches the database: safe on the event loop."""
        lab = self._provider_labs.get(provider_id)
        if lab is None:
            return None
        if lab != principal.lab_id:
            raise self._unknown_provider(provider_id)
        return provider_id

    @staticmethod
    def _unknown_provider(provider_id: str) -> NotFound:
        return NotFound("unknown-provider",
                        f"no provider {provider_id!r} of your lab; register again with POST "
                        "/api/v1/agent/register")

    @property
    def agent_heartbeat_interval(self) -> float:
        """Seconds between an agent's heartbeats, as the broker tells agents."""
        return max(0.2, self.settings.provider_timeout / 5)

    def check_heartbeat_rate(self, provider_id: str) -> None:
        """Refuse a provider heartbeat sooner than the minimum interval after the last."""
        least = min(self.settings.min_heartbeat_interval, self.agent_heartbeat_interval / 2)
        now = time.monotonic()
        last = self._last_heartbeat.get(provider_id)
        if last is not None and now - last < least:
            wait = least - (now - last)
            raise TooSoon("heartbeat-too-frequent",
                          f"heartbeats from one provider must be at least {least:g} s apart; "
                          f"retry in {wait:.2f} s", retry_after=1)
        self._last_heartbeat[provider_id] = now

    def record_heartbeats(self, beats: set[Heartbeat]) -> None:
        """A batch of agents' heartbeats as one unit of work (the heartbeat batcher's): each
        provider lives and offers as its latest heartbeat says, overdue leases end. Most
        heartbeats change nothing else, so a placement pass follows only a change."""
        batch = list(beats)
        self.metrics.heartbeat_batch_size.observe(len(batch))
        each_alone_if_refused(batch, self._record_heartbeat_batch)

    def _record_heartbeat_batch(self, batch: list[Heartbeat]) -> None:
        # Row-locked like agent reports: on SQLite that is the exclusive section (a read
        # transaction that writes after another thread wrote would fail there).
        now = utcnow()
        began = time.monotonic()
        with self.metrics.heartbeat_batch.time():
            with self._row_locked(autocommit=True, batch=True) as s:
                out = record_heartbeats(s, batch, now, self.settings)
                s.commit()
            recording = time.monotonic() - began
            if out.late:
                with self._row_locked(batch=True) as s:
                    end_late(s, out, now, self.settings)
                    s.commit()
        took = time.monotonic() - began
        if took > HEARTBEAT_WAIT:
            # Its agents were answered 503 already; which part stalled is what a site
            # (and issue 14's load runs, where one run answered 2,008 so) needs to know.
            queued = sum(beat.answered_queued for beat in batch)
            logger.warning("%s %.1f s, past the %.0f s its %d heartbeats wait (their agents "
                           "were answered 503; %d more were answered once queued): recording "
                           "them took %.1f s, ending %d overdue leases %.1f s",
                           SLOW_HEARTBEAT_BATCH, took, HEARTBEAT_WAIT, len(batch) - queued,
                           queued, recording, len(out.late), took - recording)
        for beat in sorted(batch, key=lambda b: b.arrived):  # a provider's latest last
            beat.recorded = True
            if beat.unknown:  # removed: its next heartbeat reads it again, and is refused
                self._provider_labs.discard(beat.provider_id)
                self._beats_recorded.discard(beat.provider_id)
            else:
                self._beats_recorded.put(beat.provider_id, (_said(beat), time.monotonic()))
        if out.woken:
            self.wakeups.bump_all(out.woken)
        if out.capacity_changed:
            self.placer.ask()

    async def provider_heartbeat(self, beat: Heartbeat) -> None:
        """Record one heartbeat (in the next batch; waits on the event loop, no thread).
        Raises Unavailable when its batch failed or did not finish in time (the agent
        heartbeats again), NotFound when the provider has no row."""
        # Decided before it is queued: its batch reads it.
        beat.answered_queued = self._may_answer_queued(beat)
        ticket = self.heartbeats.ask({beat})
        if beat.answered_queued:
            self.metrics.heartbeats_answered.labels("queued").inc()
            return
        await self.heartbeats.wait_async(ticket, HEARTBEAT_WAIT)
        self.metrics.heartbeats_answered.labels("recorded").inc()
        if beat.failure is not None:
            raise beat.failure
        if not beat.recorded:
            raise Unavailable("heartbeat-not-recorded",
                              "the broker could not record this heartbeat now (its database "
                              "is busy or unreachable); the agent sends the next one as usual")
        if beat.unknown:
            raise self._unknown_provider(beat.provider_id)

    @property
    def heartbeat_batch_stalled(self) -> bool:
        """Whether this replica's heartbeat batches fail or stall: heartbeats then wait for
        their batch (and are answered 503 when it cannot finish)."""
        began = self.heartbeats.busy_since
        return self.heartbeats.last_failed or (began is not None
                                               and time.monotonic() - began > HEARTBEAT_STALL)

    def _may_answer_queued(self, beat: Heartbeat) -> bool:
        """Whether ``beat`` may be answered before its batch records it: it repeats what
        the machine's last heartbeat recorded here said, less than half a provider timeout
        ago, and this replica's heartbeat batches run on their thread and neither fail nor
        stall (agent_batches.py)."""
        if not (self.settings.queued_heartbeat_answers and self.heartbeats.running):
            return False
        if self.heartbeat_batch_stalled or beat.environments is not None:
            return False
        said, at = self._beats_recorded.get(beat.provider_id) or ((), -math.inf)
        # Recorded here lately: a machine silent for a provider timeout was taken offline,
        # and its return (a pass to place on it) waits for its batch.
        return (said == _said(beat)
                and time.monotonic() - at < self.settings.provider_timeout / 2)

    def provider_leases(self, provider_id: str) -> list[dict]:
        """What the agent should run (starting, running) and stop (releasing)."""
        with self.reading() as s:
            return agent_leases(s, provider_id, gateway=self.gateway_address)

    def _read_lease_lists(self, reads: set[LeaseListRead]) -> None:
        with db.session(self.batch_autocommit) as s:
            read_lease_lists(s, list(reads), self.gateway_address)

    async def read_provider_leases(self, provider_id: str) -> list[dict]:
        """``provider_leases`` for a long poll: read in the next batch with the other polls
        that end meanwhile (waits on the event loop, no thread)."""
        read = LeaseListRead(provider_id)
        await self.lease_lists.wait_async(self.lease_lists.ask({read}), LEASE_LIST_WAIT)
        if read.leases is None:  # its batch failed or is late: read it alone
            return await asyncio.to_thread(self.provider_leases, provider_id)
        return read.leases

    def scheduler_of(self, cluster_id: str) -> str | None:
        """The gateway's route: an active cluster's scheduler as host:port, else None."""
        with self.reading() as s:
            return route_of(s.get(ClusterRecord, cluster_id))

    async def report_lease_state(self, provider_id: str, lease_id: str,
                                 body: LeaseStateReport) -> Report:
        """What the agent says of a lease's worker: it runs (or runs again after a
        suspension), it is suspended for the machine's owner, it is preempted (releasing,
        target preempted), or it ended. Recorded in the next batch of reports (waits on the
        event loop, no thread); answered once committed, not after the lease's charge."""
        if body.state == LeaseState.pending:
            raise Invalid("bad-state", "an agent can report 'starting' (progress), 'running', "
                          "'suspended', 'releasing' (preempted) or 'ended', not 'pending'")
        if body.state == LeaseState.releasing and body.reason != EndReason.preempted:
            raise Invalid("bad-reason", "an agent releases a lease only to preempt it "
                          "(reason 'preempted'); the cluster releases the others")
        if body.state == LeaseState.starting:
            lease = await asyncio.to_thread(self._starting_progress, provider_id, lease_id,
                                            body.message)
            return Report(provider_id, lease_id, body, state=lease.state,
                          end_reason=lease.end_reason, recorded=True)
        report = Report(provider_id, lease_id, body)
        await self.reports.wait_async(self.reports.ask({report}), REPORT_WAIT)
        if report.failure is not None:
            raise report.failure
        if report.refused is not None:
            raise report.refused
        if not report.recorded:
            raise Unavailable("report-not-recorded",
                              "the broker could not record this report now (its database is "
                              "busy or unreachable); report it again")
        return report

    def record_reports(self, reports: set[Report]) -> None:
        """A batch of agents' reports as one unit of work (the report batcher's)."""
        batch = list(reports)
        self.metrics.report_batch_size.observe(len(batch))
        each_alone_if_refused(batch, self._record_report_batch)

    def _record_report_batch(self, batch: list[Report]) -> None:
        with self.metrics.report_batch.time(), self._row_locked(batch=True) as s:
            out = record_reports(s, batch)
            s.commit()
        for report in batch:
            report.recorded = report.refused is None
        if out.ended:
            self.placer.ask()
            # Charged in a batch of their own: the charge may wait for the periodic metering
            # pass's hold on the labs' balances (seconds under issue 14's load), and an
            # agent has no use for it (the next metering pass charges what this misses).
            self.end_meterer.ask(out.ended)

    def _starting_progress(self, provider_id: str, lease_id: str, message: str) -> Lease:
        """A starting lease's progress (its environment's build), shown to its user."""
        with self.session() as s:
            lease = s.get(Lease, lease_id)
            if lease is None or lease.provider_id != provider_id:
                raise NotFound("unknown-lease",
                               f"no lease {lease_id!r} assigned to provider {provider_id}")
            if lease.state == LeaseState.starting and lease.message != message:
                lease.message = message
                s.add(lease)
                s.commit()
                s.refresh(lease)
        return lease

    def provider_offline(self, provider: Provider) -> int:
        """An agent that shuts down says so: no new lease goes to its machine, and what it
        held ends now (preempted: no fault of the provider) instead of after the provider
        timeout, so clusters replace those workers at once. Returns how many leases ended."""
        ended: set[str] = set()
        # In the placement section, as the reaper's end of a silent provider: a pass that
        # read the machine online must not place on it after this commit.
        with self._placing() as s:
            row = s.get(Provider, provider.id)
            row.online = False
            s.add(row)
            for lease in s.exec(select(Lease).where(Lease.provider_id == row.id, NOT_ENDED,
                                                    col(Lease.state).in_(HELD_STATES))
                                .order_by(Lease.id).with_for_update()):
                end_by_provider(s, lease, EndReason.preempted,
                                f"provider {row.name} went offline (its agent stopped)")
                s.add(lease)
                ended.add(lease.id)
            s.commit()
        logger.info("provider %s went offline; %d leases ended", provider.id, len(ended))
        self.wakeups.bump(provider.id)
        self.placer.ask()
        if ended:
            self.end_meterer.ask_and_wait(METERING_WAIT, ended, urgent=True)
        return len(ended)

    # ---- clusters -------------------------------------------------------------------------

    def create_cluster(self, principal: Principal,
                       body: ClusterCreate) -> tuple[ClusterRecord, str | None]:
        """Register a cluster; returns it and, when it has a dashboard, the secret of its
        dashboard link (only its hash is kept, so only this answer can tell it)."""
        key = secrets.token_urlsafe(32) if body.dashboard_port else None
        with self.session() as s:
            admission.check_new_cluster(s, principal, body, self.scheduler_networks)
            if body.environment:
                environments.check_usable(s, body.environment)
            cluster = ClusterRecord(id="cl_" + uuid.uuid4().hex[:12], name=body.name,
                                    user_id=principal.user_id, lab_id=principal.lab_id,
                                    scheduler_address=body.scheduler_address,
                                    ca_cert=body.ca_cert,
                                    allowed_labs_json=json.dumps(sorted(set(body.labs))),
                                    allowed_sites_json=json.dumps(sorted(set(body.sites))),
                                    dashboard_port=body.dashboard_port,
                                    environment=body.environment,
                                    dashboard_key_hash=key and dashboard_key_hash(key))
            s.add(cluster)
            s.commit()
        logger.info("cluster %s registered by %s", cluster.id, principal.user_name)
        return cluster, key

    def dashboard_target(self, cluster_id: str, key: str) -> str:
        """host:port of an active cluster's Dask dashboard, if ``key`` is its link's secret;
        otherwise NotFound, the same for every reason (ids and keys are not disclosed)."""
        with self.reading() as s:
            cluster = s.get(ClusterRecord, cluster_id)
        if (cluster is None or not cluster.active or not cluster.dashboard_port
                or not cluster.dashboard_key_hash
                or not hmac.compare_digest(cluster.dashboard_key_hash, dashboard_key_hash(key))):
            raise NotFound("unknown-dashboard", "no dashboard at this link: its cluster has "
                           "ended or the link is not its own (print cluster.dashboard_link)")
        host = cluster.scheduler_address.split("://", 1)[-1].rsplit(":", 1)[0]
        return f"{host}:{cluster.dashboard_port}"

    def cluster_for(self, principal: Principal, cluster_id: str) -> ClusterRecord:
        """The cluster, if the caller may act on it: its owner or an administrator."""
        with self.reading() as s:
            return self._cluster_of(s, principal, cluster_id)

    @staticmethod
    def _cluster_of(s: Session, principal: Principal, cluster_id: str) -> ClusterRecord:
        """``cluster_for`` inside the caller's unit of work."""
        return _owned(principal, cluster_id, s.get(ClusterRecord, cluster_id))

    def ended_shown_after(self, now: dt.datetime) -> dt.datetime:
        """Since when a cluster's view shows ended leases. Live leases and those that ended
        lately, not every lease the cluster ever had (an adaptive cluster running for days
        ends thousands, and a view of one with 10,000 took 0.2 s): a keeper whose cluster is
        still active heartbeated within the cluster timeout, so it sees each end; every
        ended lease stays in the job-record feed (``GET /usage/records``)."""
        return now - dt.timedelta(seconds=max(ENDED_SHOWN, 3 * self.settings.cluster_timeout))

    def list_clusters(self, principal: Principal, active_only: bool = True,
                      limit: int = CLUSTERS_LISTED) -> list[ClusterPublic]:
        """The caller's clusters (every cluster for an administrator), the newest ``limit``,
        oldest first, in two queries whatever their number."""
        where = []
        if active_only:
            where.append(ClusterRecord.active == True)  # noqa: E712
        if not principal.is_admin:
            where.append(ClusterRecord.user_id == principal.user_id)
        with self.reading() as s:
            return clusters_public(s, cluster_heads(s, *where, newest=limit),
                                   self.ended_shown_after(utcnow()))

    def new_leases_public(self, lease_ids: list[str]) -> list[LeasePublic]:
        """The public view of leases just asked for (their states after the placement pass),
        in the order asked."""
        with self.reading() as s:
            rows = s.exec(select(Lease).where(col(Lease.id).in_(lease_ids))).all()
            public = leases_public(s, list(rows))
        return [public[i] for i in lease_ids if i in public]

    def cluster_public(self, cluster_id: str) -> ClusterPublic:
        """One cluster's view: its leases not ended and those ended lately."""
        with self.reading() as s:
            public = clusters_public(s, [cluster_head(s, cluster_id)],
                                     self.ended_shown_after(utcnow()))[0]
        public.gateway_internal = self.gateway_internal
        return public

    def cluster_heartbeat(self, principal: Principal, cluster_id: str,
                          connected: list[str] | None = None) -> bytes:
        """Note that the cluster lives; leases whose workers it says joined its scheduler
        become running (and metered) from now. Answered with the cluster's view, as its
        JSON (``cluster_public_json``).

        Most heartbeats confirm nothing new (the keeper lists every connected worker each
        time): those read the cluster's row and its leases and write its last_seen, each
        statement a transaction of its own (``db.autocommit``), three round trips instead
        of seven (under load every round trip waits for a core, and this is the heaviest of
        the frequent requests; issue 14). One that confirms starting leases moves them and
        writes last_seen in one transaction, then reads the leases again for its answer:
        five statements in all, not eight (after each churn of issue 14's load benchmark a
        hundred clusters confirm ten leases each within seconds)."""
        now = utcnow()
        ended_after = self.ended_shown_after(now)
        with db.session(self.autocommit_engine) as s:
            head = _active(_owned(principal, cluster_id, cluster_head(s, cluster_id)))
            view, starting = cluster_public_json(s, head, ended_after)
            if not starting.intersection(connected or ()):
                # On the connection: through the session, an ORM bulk update's setup.
                s.connection().execute(_SEEN, {"cluster_id": head.id, "now": now})
                return view
        with self.session() as s:
            conn = s.connection()
            # Locked in id order, as every writer of many leases locks them (test_lock_order);
            # a lease a release or close moved on meanwhile is left out (confirm_joined).
            confirm_joined(conn, head.id, sorted(starting.intersection(connected or ())), now)
            conn.execute(_SEEN, {"cluster_id": head.id, "now": now})
            view, _starting = cluster_public_json(s, head, ended_after)
            s.commit()
        # The agents' long polls are not woken: nothing changes for a worker that joined, and
        # the one decision that depends on it (its owner back: suspend a joined worker,
        # preempt a starting one) reads the list first (agent.py, ``_confirm_joined``). A
        # wake here was about a quarter of the polls under churn (issue 14).
        return view

    def request_leases(self, cluster: ClusterRecord, body: LeaseCreate) -> list[LeasePublic]:
        """Admit the asked leases and create them (pending) as one unit of work, then ask for
        a placement pass; returns their public view as admitted (pending, on no machine yet),
        in the order asked. The route waits for the pass when asked to (``wait``, on the
        event loop: ``placer.wait_async``) and then reads them again."""
        if not cluster.active:
            raise Conflict("cluster-ended", f"cluster {cluster.id} has ended")
        spec = body.spec
        ids = [w.lease_id for w in body.workers]
        # Not the placement lock: the lab's admission lock, so two of its scale requests are
        # not both checked against one quota (a pass consumes no quota or credit). Only
        # where a quota applies: credit is what the lab owes, which no insert changes, so
        # without a quota a lab's requests do not depend on each other (under issue 14's
        # lockstep churn each waited 43 ms on average for the lab's others; a quota set at
        # the same moment as a request applies from the requests after it).
        with self.metrics.scale_admission.time(), self._row_locked() as s:
            # Read once and handed to the checks that need them: each check's own read
            # was a round trip more (the session's identity map keeps an object only while
            # something refers to it).
            lab, member, owed = admission.lab_member_and_balance(s, cluster.lab_id,
                                                                 cluster.user_id)
            if admission.quota_applies(lab, member):
                lock_lab_admissions(s, cluster.lab_id)
            probe = Lease(id="?", cluster_id=cluster.id, group=body.group, cpus=spec.cpus,
                          memory=spec.memory, gpus=spec.gpus, gpu_model=spec.gpu_model)
            admission.check_fits_somewhere(s, request_of(probe, cluster), self.shapes_seen)
            environments.check_servable(s, cluster)
            admission.check_credit_and_quotas(s, cluster, lab, member, owed, spec.cpus,
                                              spec.gpus, len(ids))
            admission.check_distinct_lease_ids(ids)
            # Rows, not Lease objects: building a model per lease and the ORM's flush of
            # them were most of the request's CPU (issue 14; for 100 leases on PostgreSQL,
            # where rows go by COPY, 12-14 against 43-48 ms). The probe holds the model's
            # defaults; each row gets its own creation time, as objects did.
            template = {c.name: getattr(probe, c.key) for c in Lease.__table__.columns}
            rows = [{**template, "id": lease_id, "created_at": utcnow()} for lease_id in ids]
            try:
                insert_rows(s, Lease.__table__, rows)
                s.commit()
            except IntegrityError:
                # Ids taken before, or by another request at the same moment (labs'
                # admissions do not wait on each other): nothing of this one was stored. Not
                # read before the insert: the primary key checks them anyway, and that read
                # was a round trip more for every scale request.
                s.rollback()
                raise admission.lease_ids_taken(s, ids) from None
        self.placer.ask()
        # As inserted: reading them back (and their machines' labs, none yet) was two round
        # trips more for what this unit just wrote.
        return [LeasePublic(**{c.key: row[c.name] for c in PUBLIC_LEASE_COLUMNS})
                for row in rows]

    def release_leases(self, cluster: ClusterRecord, lease_ids: list[str],
                       reason: EndReason = EndReason.released, message: str = "") -> int:
        with self._row_locked() as s:
            rows = s.exec(select(*RELEASE_COLUMNS).where(one_of(s, Lease.id, lease_ids))
                          .order_by(Lease.id).with_for_update()).all()
            found = {r.id for r in rows}
            # Another cluster's leases answer exactly like unknown ones.
            missing = [i for i in lease_ids if i not in found] + [
                r.id for r in rows if r.cluster_id != cluster.id]
            if missing:
                raise NotFound("unknown-lease",
                               f"no such leases in this cluster: {sorted(missing)}")
            touched = release_rows(s, rows, reason, message)
            s.commit()
        self.wakeups.bump_all(touched)
        self.placer.ask()
        return len(touched)

    def close_cluster(self, cluster_id: str, reason: str = "closed") -> None:
        lease_reason = EndReason.lost if reason == "lost" else EndReason.released
        with self._row_locked() as s:
            cluster = s.get(ClusterRecord, cluster_id)
            if cluster.active:
                cluster.active = False
                cluster.end_reason = reason
                cluster.closed_at = utcnow()
                s.add(cluster)
            live = s.exec(select(*RELEASE_COLUMNS).where(
                Lease.cluster_id == cluster_id, NOT_ENDED, col(Lease.state).in_(LIVE_STATES))
                .order_by(Lease.id).with_for_update()).all()
            touched = release_rows(s, live, lease_reason, f"cluster {reason}")
            s.commit()
        self.wakeups.bump_all(touched)
        self.placer.ask()

    # ---- software environments ------------------------------------------------------------

    def store_environment(self, principal: Principal,
                          body: EnvironmentCreate) -> tuple[str, list[str]]:
        """Keep a cluster's environment description; its hash and the wheels still missing."""
        with self.session() as s:
            digest, missing = environments.store(s, body)
            try:
                s.commit()
            except IntegrityError:  # the same environment, stored at the same moment
                s.rollback()
        return digest, missing

    def store_wheel(self, principal: Principal, sha256: str, filename: str,
                    data: bytes) -> bool:
        """Keep a wheel a user ships; False when the broker had it already."""
        if principal.user_id is None:
            raise NotAllowed("not-a-user", "wheels are shipped with a user's token")
        with self.session() as s:
            stored = environments.store_wheel(s, principal.user_id, sha256, filename, data)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                stored = False
        return stored

    def set_cluster_environment(self, cluster: ClusterRecord, digest: str) -> None:
        """The cluster's packages changed (the user installed one): leases placed from now on
        get environment ``digest``."""
        if not cluster.active:
            raise Conflict("cluster-ended", f"cluster {cluster.id} has ended")
        with self.session() as s:
            environments.check_usable(s, digest)
            row = s.get(ClusterRecord, cluster.id)
            row.environment = digest
            s.add(row)
            s.commit()
        logger.info("cluster %s now needs environment %s", cluster.id, digest)

    def environment_for_agent(self, provider: Provider, digest: str) -> dict:
        """The environment a lease of this provider needs (none other is disclosed)."""
        with self.session() as s:
            row = s.get(Environment, digest)
            if row is None or not environments.provider_may_read(s, provider.id, digest):
                raise NotFound("unknown-environment",
                               f"no environment {digest} for a lease of provider {provider.id}")
            return environments.spec_of(row).to_json()

    def wheel_for_agent(self, provider: Provider, digest: str, sha256: str) -> EnvironmentWheel:
        """A wheel of an environment a lease of this provider needs."""
        with self.session() as s:
            row = s.get(Environment, digest)
            wheel = s.get(EnvironmentWheel, sha256)
            if (row is None or wheel is None
                    or sha256 not in {p.sha256 for p in environments.spec_of(row).packages}
                    or not environments.provider_may_read(s, provider.id, digest)):
                raise NotFound("unknown-wheel", f"no wheel {sha256} of environment {digest} "
                               f"for a lease of provider {provider.id}")
            return wheel

    # ---- worker certificates (see admission: the broker relays, never holds a key) -------

    def submit_signing_request(self, provider: Provider, lease_id: str, csr_pem: str) -> None:
        """Store the agent's signing request for a starting lease and wake its cluster."""
        admission.check_signing_request(lease_id, csr_pem)
        with self.session() as s:
            lease = s.get(Lease, lease_id)
            if lease is None or lease.provider_id != provider.id:
                raise NotFound("unknown-lease",
                               f"no lease {lease_id!r} assigned to provider {provider.id}")
            admission.check_signable(lease)
            cluster_id = lease.cluster_id
            # A new request (the agent restarted, or lost its key) replaces the old one and
            # any certificate for it, both in one statement: through the ORM, a certificate
            # the cluster stored after this read stayed (the certificate was "" when read,
            # so only the request was written) over the new request.
            s.execute(update(Lease).where(col(Lease.id) == lease_id)
                      .values(worker_csr=csr_pem, worker_cert=""))
            s.commit()
        self.wakeups.bump(f"cluster:{cluster_id}")

    def signing_requests(self, cluster: ClusterRecord) -> list[dict]:
        """The cluster's starting leases whose agents wait for a certificate."""
        with self.reading() as s:
            rows = s.exec(select(Lease.id, Lease.worker_csr).where(
                Lease.cluster_id == cluster.id, Lease.state == LeaseState.starting,
                Lease.worker_csr != "", Lease.worker_cert == "")).all()
        return [{"lease_id": lease_id, "csr": csr} for lease_id, csr in rows]

    def submit_certificates(self, cluster: ClusterRecord,
                            certificates: list[WorkerCertificate]) -> int:
        """Store the cluster's certificates for its leases' signing requests (all or none
        of those refused; one whose request an agent replaced meanwhile is skipped: the
        cluster signs the new request next). Returns how many were stored."""
        touched: set[str | None] = set()
        stored = 0
        with self.session() as s:
            for item in certificates:
                lease = s.get(Lease, item.lease_id)
                if lease is None or lease.cluster_id != cluster.id:
                    raise NotFound("unknown-lease",
                                   f"no lease {item.lease_id!r} in this cluster")
                admission.check_worker_certificate(lease, item.cert, cluster)
                # Only for the request that was checked (a refusal of a later one rolls
                # this back): an agent may replace its request between the read and this
                # write, and a certificate written over the new request's (not for the
                # agent's key) left the lease starting until its start timeout, the cluster
                # seeing no request left to sign.
                written = s.execute(update(Lease).where(
                    col(Lease.id) == lease.id, col(Lease.worker_csr) == lease.worker_csr,
                    col(Lease.state) == LeaseState.starting).values(worker_cert=item.cert))
                if written.rowcount:
                    stored += 1
                    touched.add(lease.provider_id)
            s.commit()
        self.wakeups.bump_all(touched)
        return stored

    # ---- timeouts -------------------------------------------------------------------------

    @property
    def leader_ttl(self) -> float:
        """Seconds a replica's hold on the periodic passes lasts without renewal: another
        replica takes over at most this long after the leader dies, well within the
        timeouts those passes enforce."""
        return max(1.0, min(self.settings.provider_timeout, self.settings.cluster_timeout) / 3)

    def reap(self) -> None:
        """End what went silent (providers past the provider timeout, clusters past theirs),
        and run the periodic metering and capacity passes when due — on the leader replica
        only (replicas.hold_leadership)."""
        self._reaping_since = time.monotonic()
        try:
            self._reap()
        except PeriodicProcessStopped:
            pass  # the broker is shutting down: the next leader runs the passes
        finally:
            self._reaping_since = None

    def renew_leadership(self) -> bool:
        """Take or renew the leader lease (replicas.hold_leadership); True while this
        replica leads. A replica that becomes the leader places at once."""
        was = self.is_leader
        self.is_leader = hold_leadership(self.engine, self.boot_id, self.leader_ttl)
        if self.is_leader != was:
            logger.info("broker %s %s the periodic passes and placement", self.boot_id,
                        "now runs" if self.is_leader else "no longer runs")
            if self.is_leader:
                self.placer.became_leader()
        return self.is_leader

    def keep_leadership(self) -> bool:
        """The server's leadership loop: renew the leader lease apart from the reaper, whose
        tick waits for a metering pass. Renewed between ticks, the lease (10 s by default)
        ran out during passes of 4–10 s under issue 14's load: the lead moved at nearly every
        pass, and each new leader ran a pass of its own at once. Not renewed while a tick has
        run past ``--reaper-stall``: a replica whose passes hang leaves them to another."""
        since = self._reaping_since
        if since is not None and time.monotonic() - since > self.settings.reaper_stall:
            if self.is_leader:
                logger.warning("broker %s: its reaper has been in one tick for %.0f s; "
                               "leaving the periodic passes and placement to another "
                               "replica", self.boot_id, time.monotonic() - since)
                self.is_leader = False
            return False
        return self.renew_leadership()

    def _reap(self) -> None:
        if not (self.is_leader if self.leadership_kept else self.renew_leadership()):
            return
        # Runs every second: a plain session, no placement lock, unless a provider went
        # silent. Then its leases end in the placement section: a pass that read it online
        # just before would otherwise place leases on it after this commit, to wait on a dead
        # machine until their start timeout (found by test_lease_states' random sequences).
        now = utcnow()
        with self.session() as s:
            silent = end_silent_providers(s, now, self.settings)
            if not silent.providers:  # else left uncommitted, and done again below
                s.commit()
        if silent.providers:
            with self._placing() as s:
                silent = end_silent_providers(s, now, self.settings)
                s.commit()
        for pid in silent.providers:
            logger.warning("provider %s is lost; its leases ended", pid)
        self.wakeups.bump_all(silent.providers)
        if silent.providers:
            self.placer.ask()
        for cid in silent.clusters:
            logger.warning("cluster %s stopped heart-beating; ending its leases", cid)
            self.close_cluster(cid, reason="lost")
        if silent.leases:
            self.end_meterer.ask(silent.leases)
        if time.monotonic() - self._last_sweep >= SWEEP_INTERVAL:
            # A pass whose transaction failed leaves its leases pending until the next ask;
            # this one comes at the latest a sweep interval later.
            self._last_sweep = time.monotonic()
            self.placer.ask()
        if time.monotonic() - self._last_metering >= self.settings.metering_interval:
            self.meter()
        if time.monotonic() - self._last_capacity >= self.settings.capacity_interval:
            self._last_capacity = time.monotonic()
            if self.periodic is not None:
                self.periodic.sample_capacity()
            else:
                with self.session() as s:
                    record_capacity(s)
                    s.commit()

    # ---- metering -------------------------------------------------------------------------

    def meter(self, now: dt.datetime | None = None,
              lease_ids: set[str] | None = None) -> int:
        """A metering pass as a unit of its own: all running and ended leases (the periodic
        pass), or only ``lease_ids`` (leases that just ended); returns the periods charged."""
        if lease_ids is None:
            self._last_metering = time.monotonic()
        elif not lease_ids:
            return 0
        began = time.monotonic()
        if lease_ids is None and self.periodic is not None:
            with self.metrics.metering.time():
                recorded = self.periodic.meter(now or utcnow())
        else:
            timer = (self.metrics.metering.time() if lease_ids is None
                     else contextlib.nullcontext())
            with timer:
                recorded = (meter_pass(self.engine, self.settings, now or utcnow())
                            if lease_ids is None else
                            meter_unit(self.engine, self.settings, now or utcnow(), lease_ids))
        if recorded is None:
            logger.warning("metering pass collided with another; the next pass charges "
                           "what it did not")
            return 0
        if lease_ids is None:
            # A site sees its periodic charging happen (an idle one is not told every minute
            # that nothing was charged); the load benchmark reads these lines to set agents'
            # heartbeats during a pass against the others.
            logger.log(logging.INFO if recorded else logging.DEBUG,
                       "%s %.3f s: %d periods charged", METERING_PASS_LOGGED,
                       time.monotonic() - began, recorded)
        return recorded
