"""The provider agent (`parallex provide`): offers a lab machine's capacity to the broker and
runs one Dask worker process per lease assigned to it.

The agent only opens outbound HTTPS connections. It long-polls the broker for the list of leases
it must run or stop and reconciles its worker processes with that list; it heartbeats with the
leases whose workers are alive and reports every state change. Worker processes live in their
own process groups and are recorded in ``workdir/workers.json``, so an agent that restarts
adopts the workers still running and stops those whose leases have ended.

Each lease's worker runs under an account of its own (``WorkerAccounts``); its folder, key
included, is deleted and whatever its account still runs is killed when the lease ends.

With an owner policy other than "always" (federation.owner_policy) the agent watches the
machine owner's activity: it withholds its capacity while the owner works, suspends its
leases' workers when the owner comes back, resumes them when the owner leaves, and preempts
them (retired through their schedulers, ended "preempted") when the owner stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from . import errors
from .client import AsyncBrokerClient
from .environment import EnvironmentProblem, EnvironmentSpec, Package
from .environment_cache import EnvironmentCache, Prepared
from .ids import UnsafeIdentifier, check_lease_id, url_segment
from .inventory import Capacity
from .launchers import ProcessLauncher, WorkerLauncher
from .lease_states import EndReason, LeaseState
from .owner_activity import OwnerMeter
from .owner_policy import Decision, OwnerPolicy, OwnerWatch
from .tls import key_matches, worker_key_and_request
from .worker_accounts import WorkerAccountError, WorkerAccounts
from .worker_process import remove_lease_folder

logger = logging.getLogger("parallex.agent")


class ProviderAgent:
    """Runs the workers of the leases the broker assigns to this machine."""

    def __init__(self, broker_url: str, token: str, capacity: Capacity, *,
                 workdir: str | Path, name: str | None = None, site: str | None = None,
                 worker_host: str | None = None, accounts: WorkerAccounts | None = None,
                 stop_timeout: float = 10.0, release_grace: float = 10.0,
                 monitor_interval: float = 0.25, launcher: WorkerLauncher | None = None,
                 warm_workers: int = 4, policy: OwnerPolicy | None = None,
                 owner_meter: OwnerMeter | None = None, owner_interval: float = 0.25,
                 accepts_peers: bool = True, environments: EnvironmentCache | None = None):
        self.client = AsyncBrokerClient(broker_url, token)
        self.capacity = capacity
        self.workdir = Path(workdir)
        self.name = name or socket.gethostname()
        self.site = site
        self.accepts_peers = accepts_peers
        self.worker_host = worker_host
        # How workers run (a process each by default); see federation.launchers.
        self.launcher = launcher or ProcessLauncher(self.workdir, worker_host,
                                                    warm=warm_workers)
        self.accounts = accounts or WorkerAccounts(None)
        self.stop_timeout = stop_timeout
        self.release_grace = release_grace
        self.monitor_interval = monitor_interval
        self.provider_id: str | None = None
        self.heartbeat_interval = 5.0
        self.poll_timeout = 20.0
        self.workers: dict[str, Any] = {}  # lease id -> the launcher's handle
        self._sizes: dict[str, float] = {}  # lease id -> CPUs (what the warm pool leaves free)
        # Keys made here for starting leases, until their worker starts (then only on disk,
        # readable by the lease's account alone).
        self._keys: dict[str, str] = {}
        self._requesting: set[str] = set()
        self._prepared = False
        self._stopping: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._report_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.registered = asyncio.Event()
        # Called with the number of workers the launcher holds ready, when it changes.
        self.on_ready: Callable[[int], None] | None = None
        self._ready = 0
        # The owner's policy: None (or "always") offers the capacity all the time.
        self.policy = policy if policy is not None and policy.offer != ("always",) else None
        self.owner_meter = owner_meter
        self.owner_interval = owner_interval
        self.offering, self.offer_note = True, ""
        self._states: dict[str, str] = {}  # lease id -> its state at the broker, last heard
        self._suspended: set[str] = set()
        self._beat_now = asyncio.Event()
        # Set once the broker recorded the current offer (a heartbeat carrying it answered):
        # lease reports wait for it, so the broker hears "withholding" before "suspended" and
        # places nothing new on the machine in between.
        self._offer_told = asyncio.Event()
        self._offer_told.set()
        # Called with each owner-policy decision that changes what the agent does.
        self.on_decision: Callable[[Decision], None] | None = None
        #: True once one of its loops failed (a bug): the agent stopped, and exits non-zero.
        self.failed = False
        #: Prometheus metrics (federation.agent_metrics.AgentMetrics) when served.
        self.metrics: Any = None
        #: Clusters' software environments: built here with uv, or (fixed) checked.
        self.environments = environments or EnvironmentCache(
            self.workdir / "environments", where=self.name)
        self._runs_with: dict[str, Prepared] = {}  # lease id -> what its worker runs with
        self._env_of: dict[str, str] = {}  # lease id -> environment hash, while it runs
        self._preparing: set[str] = set()
        self._latest: dict[str, dict] = {}  # lease id -> the broker's latest word on it
        self._specs: dict[str, EnvironmentSpec] = {}
        self._told_environments: list[str] | None = None  # last list the broker accepted

    # ---- state file -------------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.workdir / "workers.json"

    def _save_state(self) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            # With its environment's key, so a restarted agent never evicts what runs.
            f.write(json.dumps({lid: {**self.launcher.save(w),
                                      "environment": self._env_of.get(lid)}
                                for lid, w in self.workers.items()}))
        os.replace(tmp, self._state_file)

    def _adopt(self) -> None:
        try:
            saved = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            saved = {}
        for lease_id, state in saved.items():
            worker = self.launcher.adopt(lease_id, state)
            if worker is not None:
                logger.info("adopted the running worker of lease %s", lease_id)
                self.workers[lease_id] = worker
                self.accounts.adopt(lease_id, worker.uid)
                if state.get("environment"):
                    self._hold_environment(lease_id, state["environment"])
                self.launcher.resume(worker)  # suspended when the last agent stopped
        self._save_state()

    # ---- life cycle -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Make the work folder and check that workers can run under their accounts; raises
        WorkerAccountError with what to change."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Worker accounts must pass through (not list) the work folder to their own lease
        # folder; everything else in it is the agent's alone.
        os.chmod(self.workdir, 0o711 if self.accounts.isolated else 0o700)
        (self.workdir / "leases").mkdir(mode=0o711, exist_ok=True)
        os.chmod(self.workdir / "leases", 0o711 if self.accounts.isolated else 0o700)
        self.accounts.check(folders=(self.workdir / "leases",))
        self._prepared = True

    async def run(self) -> None:
        """Register, then poll, heartbeat and watch workers until stop() is called."""
        if not self._prepared:
            self.prepare()
        self._adopt()
        registering = asyncio.create_task(self._register())
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({registering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not registering.done():
            # Stopped while the broker was still unreachable: nothing to report to.
            registering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await registering
            await self._shutdown_workers(report=False)
            await self.client.close()
            return
        stopping.cancel()
        registering.result()
        coros = [self._poll_loop(), self._heartbeat_loop(), self._monitor_loop()]
        if self.policy is not None:
            coros.append(self._owner_loop())
        loops = [asyncio.create_task(coro) for coro in coros]
        for task in loops:
            task.add_done_callback(self._loop_ended)
        try:
            await self._stop.wait()
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                # A loop that failed was logged (and stopped the agent); shut down cleanly.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._shutdown_workers()
            # Said last, after the workers' own reports: until the next registration the broker
            # places nothing here (otherwise it would until the provider timeout).
            with contextlib.suppress(errors.ParallexError):
                await self.client.request("POST", f"{self._base}/offline")
            await self.client.close()

    def stop(self) -> None:
        """Ask run() to stop every worker and return."""
        self._stop.set()

    async def _register(self) -> None:
        delay = 0.2
        while True:
            try:
                answer = await self.client.request("POST", "/agent/register", json={
                    "name": self.name, "site": self.site, "cpus": self.capacity.cpus,
                    "memory": self.capacity.memory, "gpus": self.capacity.gpus,
                    "accepts_peers": self.accepts_peers,
                    "environment": self.environments.describe()})
                break
            except errors.BrokerUnreachable as exc:
                logger.warning("%s; retrying in %.1f s", exc, delay)
            except errors.BrokerError as exc:
                logger.warning("registration failed: %s; retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)
        self.provider_id = answer["provider_id"]
        self._told_environments = None  # the next heartbeat tells the list again
        self.environments.where = f"{self.name} (lab {answer['lab']})"
        self.heartbeat_interval = float(answer["heartbeat_interval"])
        self.poll_timeout = float(answer["poll_timeout"])
        logger.info("registered as provider %s of lab %s offering %s", self.provider_id,
                    answer["lab"], self.capacity.describe())
        self.registered.set()

    async def _shutdown_workers(self, report: bool = True) -> None:
        self.launcher.close(self.accounts)
        leases = list(self.workers)
        if not leases:
            self.launcher.finish()
            return
        logger.info("stopping %d workers", len(leases))
        await asyncio.gather(*(self._stop_worker(lid) for lid in leases))
        self.launcher.finish()
        for lease_id in leases if report else ():
            with contextlib.suppress(errors.ParallexError):
                await self._report(lease_id, LeaseState.ended, EndReason.preempted,
                                   "the provider agent shut down", attempts=1)

    # ---- loops ------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        version: str | None = None
        delay = 0.2
        while True:
            try:
                answer = await self.client.request(
                    "GET", f"{self._base}/leases",
                    params={"since": version or "", "wait": self.poll_timeout},
                    timeout=self.poll_timeout + 10)
                version = answer["version"]
                delay = 0.2
                self._reconcile(answer["leases"])
            except errors.NotFound:
                logger.warning("the broker no longer knows this provider; registering again")
                await self._register()
            except errors.ParallexError as exc:
                logger.warning("lease poll failed: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
                version = None

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                async with self._report_lock:
                    # Built under the lock that also guards state reports, so a lease's
                    # "running" report never overtakes a heartbeat that predates its worker
                    # (a heartbeat that repeats the last one is answered before the broker
                    # records it; the broker then judges by its arrival which leases it
                    # could have listed).
                    running = [lid for lid in self.workers if lid not in self._stopping]
                    timer = (self.metrics.heartbeat.time() if self.metrics is not None
                             else contextlib.nullcontext())
                    warm = self.environments.warm()[:1000]
                    offering = self.offering
                    with timer:
                        await self.client.request("POST", f"{self._base}/heartbeat", json={
                            "running": running, "offering": offering,
                            "offer_note": self.offer_note[:300],
                            # The list only when it changed: None leaves the broker's.
                            "environments": warm if warm != self._told_environments
                            else None})
                    self._told_environments = warm
                    if offering == self.offering:  # not changed again meanwhile
                        self._offer_told.set()
            except errors.ParallexError as exc:
                logger.warning("heartbeat failed: %s", exc)
            # The owner policy wakes it early when the offer changes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._beat_now.wait()
            self._beat_now.clear()

    async def _monitor_loop(self) -> None:
        while True:
            held = sum(self._sizes.get(lid, 0.0) for lid in self.workers)
            self.launcher.keep_ready(self.accounts, self.capacity.cpus - held)
            ready = self.launcher.ready_count()
            if ready != self._ready:
                self._ready = ready
                logger.info("%d warm worker interpreters ready", ready)
                if self.on_ready is not None:
                    self.on_ready(ready)
            for lease_id, worker in list(self.workers.items()):
                if lease_id in self._stopping:
                    continue
                code = self.launcher.poll(worker)
                if code is not None:
                    del self.workers[lease_id]
                    self._save_state()
                    tail = worker.log_tail()
                    killed = self.launcher.exit_message(worker)
                    self._clean_up(lease_id)
                    if code == 0:
                        # A worker leaves cleanly only when its scheduler closed it or went
                        # away (the user's process died): not this provider's failure.
                        logger.info("lease %s: worker left its scheduler", lease_id)
                        self._spawn(self._report(
                            lease_id, LeaseState.ended, EndReason.released,
                            "the worker left its scheduler (exit code 0): the cluster closed "
                            "it or stopped answering"))
                        continue
                    logger.warning("lease %s: worker exited with code %s", lease_id, code)
                    self._spawn(self._report(
                        lease_id, LeaseState.ended, EndReason.failed,
                        killed or f"worker process exited with code {code}; last log "
                                  f"lines:\n{tail}"))
            await asyncio.sleep(self.monitor_interval)

    # ---- the machine's owner ------------------------------------------------------------------

    async def _owner_loop(self) -> None:
        watch = OwnerWatch(self.policy)
        meter = self.owner_meter or OwnerMeter()
        meter.read()  # the first reading only starts the count
        last: tuple | None = None
        while True:
            await asyncio.sleep(self.owner_interval)
            decision = watch.observe(dt.datetime.now(dt.UTC), meter.read())
            key = (decision.offer, decision.suspend, decision.preempt)
            if key != last:
                last = key
                logger.info("owner policy: %s%s%s — %s",
                            "offer" if decision.offer else "withhold",
                            ", suspend leases" if decision.suspend else "",
                            ", preempt leases" if decision.preempt else "", decision.why)
                if self.on_decision is not None:
                    self.on_decision(decision)
            if decision.suspend and not decision.preempt and self._unconfirmed():
                await self._confirm_joined()
            self.apply(decision)

    def _unconfirmed(self) -> list[str]:
        """Leases whose workers run here but that were starting when last heard: the broker
        does not wake the lease poll when a cluster confirms a worker joined."""
        return [lid for lid in self.workers if lid not in self._stopping
                and lid not in self._suspended
                and self._states.get(lid) == LeaseState.starting]

    async def _confirm_joined(self) -> None:
        """Read which starting leases the cluster has since confirmed (running), before the
        owner policy suspends the joined ones and preempts the others. Only those states are
        taken from this answer: the poll loop's lists stay the ones reconciled."""
        try:
            answer = await self.client.request("GET", f"{self._base}/leases", timeout=10)
        except errors.ParallexError as exc:
            # Decided on what was last heard: a joined worker may be preempted, not suspended.
            logger.warning("could not read which leases joined their clusters: %s", exc)
            return
        for lease in answer.get("leases", []):
            lid = lease.get("id")
            if (self._states.get(lid) == LeaseState.starting
                    and lease.get("state") in (LeaseState.running, LeaseState.suspended)):
                self._states[lid] = lease["state"]

    def apply(self, decision: Decision) -> None:
        """Do what the owner policy decided: offer or withhold the capacity, suspend, resume
        or preempt the leases' workers."""
        if (decision.offer, decision.why) != (self.offering, self.offer_note):
            changed = decision.offer != self.offering
            self.offering, self.offer_note = decision.offer, decision.why
            if changed:
                self._offer_told.clear()
                self._beat_now.set()
        why = f"owner activity on {self.name}"
        for lid, worker in list(self.workers.items()):
            if lid in self._stopping:
                continue
            joined = self._states.get(lid) in (LeaseState.running, LeaseState.suspended)
            if decision.preempt or (decision.suspend and not joined):
                # A lease still starting holds no results: it makes way at once.
                self._preempt(lid, worker, why)
            elif decision.suspend and lid not in self._suspended:
                self.launcher.suspend(worker)
                self._suspended.add(lid)
                logger.info("lease %s: suspended (%s)", lid, decision.why)
                self._spawn(self._report(lid, LeaseState.suspended, message=why))
            elif not decision.suspend and lid in self._suspended:
                self.launcher.resume(worker)
                self._suspended.discard(lid)
                logger.info("lease %s: resumed (%s)", lid, decision.why)
                self._spawn(self._report(lid, LeaseState.running,
                                         message=f"resumed: {decision.why}"))

    def _preempt(self, lease_id: str, worker: Any, why: str) -> None:
        self.launcher.resume(worker)  # it must run to hand its data over
        self._suspended.discard(lease_id)
        self._stopping.add(lease_id)
        logger.warning("lease %s: preempted (%s)", lease_id, why)

        async def preempt() -> None:
            await self._report(lease_id, LeaseState.releasing, EndReason.preempted, why)
            await self._release(lease_id, grace=self.policy.vacate_time if self.policy
                                else self.release_grace)

        self._spawn(preempt())

    # ---- reconciling --------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A loop ends only when the agent stops; one that fails stops the agent, loudly
        (an agent that no longer polls or watches its workers must not look alive)."""
        if not task.cancelled() and task.exception() is not None:
            logger.critical("agent loop %s failed; stopping", task.get_coro().__qualname__,
                            exc_info=task.exception())
            self.failed = True
            self.stop()

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug must show in the agent's log, not vanish with its task.
            logger.error("agent task %s failed", task.get_coro().__qualname__,
                         exc_info=task.exception())

    @property
    def _base(self) -> str:
        return f"/agent/{url_segment(self.provider_id)}"

    def _reconcile(self, leases: list[dict]) -> None:
        """Make the local workers match the broker's list of leases for this provider."""
        safe = []
        for lease in leases:
            try:
                check_lease_id(lease.get("id"))
            except UnsafeIdentifier as exc:
                # The broker refuses such ids; one that arrives anyway is never used as a
                # path or a URL.
                logger.error("ignoring a lease from the broker: %s", exc)
                continue
            safe.append(lease)
        leases = safe
        listed = {lease["id"] for lease in leases}
        self._states = {lease["id"]: lease["state"] for lease in leases}
        self._latest = {lease["id"]: lease for lease in leases}
        for lease in leases:
            lid, state = lease["id"], lease["state"]
            if lid in self._stopping:
                continue
            if state == LeaseState.starting and lid not in self.workers:
                self._start_when_certified(lease)
            elif state == LeaseState.releasing:
                self._stopping.add(lid)
                self._spawn(self._release(lid))
        for lid in list(self.workers):
            if lid not in listed and lid not in self._stopping:
                logger.info("lease %s is no longer assigned here; stopping its worker", lid)
                self._stopping.add(lid)
                self._spawn(self._stop_worker(lid))
        starting = {lease["id"] for lease in leases if lease["state"] == LeaseState.starting}
        for lid in set(self._keys) - starting:
            del self._keys[lid]  # ended or started: the key is on disk or no longer needed
        for lid in set(self._runs_with) - listed - set(self.workers):
            del self._runs_with[lid]  # ended before its worker started
            self._let_go_of_environment(lid)

    def _start_when_certified(self, lease: dict) -> None:
        """Start the worker once the cluster has certified the key made here; until then
        make the key and send its signing request (once)."""
        lid = lease["id"]
        prepared = self._runs_with.get(lid)
        if prepared is None and not lease.get("environment"):
            prepared = self._runs_with[lid] = Prepared(sys.executable)
        if prepared is None and lid not in self._preparing:
            # Built (or found ready) while the cluster certifies the worker's key.
            self._preparing.add(lid)
            self._spawn(self._prepare_environment(lid, lease["environment"]))
        key = self._keys.get(lid)
        cert = lease.get("cert") or ""
        if key is not None and cert and key_matches(cert, key):
            if prepared is not None:
                self._start({**lease, "key": key, "python": prepared.python,
                             "private_wheels": list(prepared.private_wheels)}, prepared.key)
            return
        if lid in self._requesting or (key is not None and not cert):
            # The request is on its way or waits for the cluster's signature. (A key is kept
            # only while its request was sent or is being sent: a failed one is dropped. The
            # broker's csr_sent was read here before, and a lease list older than the
            # request, handed back when the lease's environment was ready, made a second key
            # and request: the cluster's certificate for the first could then be refused.)
            return
        # No key yet (first time, or this agent restarted), or a certificate for another key
        # than this agent's (a request it replaced): ask for one for a new key.
        key, csr = worker_key_and_request(lid)
        self._keys[lid] = key
        self._requesting.add(lid)
        self._spawn(self._send_signing_request(lid, csr))

    async def _prepare_environment(self, lease_id: str, digest: str) -> None:
        """Find or build the lease's environment, telling the user how the build goes; a
        build that cannot succeed ends the lease (failed, never billed) with the reason."""
        async def progress(done: int, total: int) -> None:
            with contextlib.suppress(errors.ParallexError):
                await self._report(lease_id, LeaseState.starting, message=(
                    f"building the environment on {self.name} ({done} of {total} "
                    "packages)"), attempts=1)

        async def fetch(package: Package) -> bytes:
            return await self.client.request_bytes(
                "GET", f"{self._base}/environments/{digest}/wheels/{package.sha256}",
                timeout=300)

        try:
            spec = self._specs.get(digest)
            if spec is None:
                spec = EnvironmentSpec.from_json(await self.client.request(
                    "GET", f"{self._base}/environments/{digest}"))
                self._specs[digest] = spec
            prepared = await self.environments.prepare(spec, fetch, progress)
        except EnvironmentProblem as exc:
            logger.warning("lease %s: environment %s: %s", lease_id, digest, exc)
            self._spawn(self._report(lease_id, LeaseState.ended, EndReason.failed, str(exc),
                                     environment_error=True))
            return
        except errors.ParallexError as exc:
            # The lease ended meanwhile, or the broker is away: the next lease list retries.
            logger.warning("lease %s: environment %s not prepared: %s", lease_id, digest, exc)
            return
        finally:
            self._preparing.discard(lease_id)
        self._runs_with[lease_id] = prepared
        if prepared.key:
            # In use from now: no other build may evict it while the key is being certified.
            self._hold_environment(lease_id, prepared.key)
        lease = self._latest.get(lease_id)
        if (lease is not None and self._states.get(lease_id) == LeaseState.starting
                and lease_id not in self.workers and lease_id not in self._stopping):
            self._start_when_certified(lease)

    async def _send_signing_request(self, lease_id: str, csr: str) -> None:
        try:
            await self.client.request(
                "POST", f"{self._base}/leases/{url_segment(lease_id)}/csr", json={"csr": csr})
        except errors.ParallexError as exc:
            # The next lease list retries with a new key (the lease may also have ended).
            logger.warning("lease %s: signing request failed: %s", lease_id, exc)
            self._keys.pop(lease_id, None)
        finally:
            self._requesting.discard(lease_id)

    def _start(self, lease: dict, environment: str | None = None) -> None:
        try:
            account = self.launcher.account_for(lease, self.accounts)
            worker = self.launcher.start(lease, account)
        except EnvironmentProblem as exc:
            logger.error("lease %s: cannot start worker: %s", lease["id"], exc)
            self._clean_up(lease["id"])
            self._spawn(self._report(lease["id"], LeaseState.ended, EndReason.failed,
                                     f"{exc} on {self.environments.where}",
                                     environment_error=True))
            return
        except (OSError, KeyError, ValueError, WorkerAccountError, psutil.Error) as exc:
            logger.error("lease %s: cannot start worker: %s", lease["id"], exc)
            self._clean_up(lease["id"])
            self._spawn(self._report(lease["id"], LeaseState.ended, EndReason.failed,
                                     f"the agent could not start the worker: {exc}"))
            return
        self.workers[lease["id"]] = worker
        self._sizes[lease["id"]] = float(lease.get("cpus") or 0)
        if environment:
            self._hold_environment(lease["id"], environment)
        self._keys.pop(lease["id"], None)
        self._save_state()

    async def _release(self, lease_id: str, grace: float | None = None) -> None:
        # The cluster retires the worker through its scheduler right after releasing the lease
        # (moving its results away); give it that long to leave before signalling it.
        worker = self.workers.get(lease_id)
        if worker is not None:
            self._thaw(lease_id, worker)
            await self.launcher.wait(worker, self.release_grace if grace is None else grace)
        await self._stop_worker(lease_id)
        await self._report(lease_id, LeaseState.ended)

    def _thaw(self, lease_id: str, worker: Any) -> None:
        """A suspended worker that is released runs again for its grace: frozen, it could
        not leave its scheduler (its results move) before the stop kills it."""
        if lease_id in self._suspended:
            self.launcher.resume(worker)
            self._suspended.discard(lease_id)
            logger.info("lease %s: resumed to stop", lease_id)

    async def _stop_worker(self, lease_id: str) -> None:
        """Stop gracefully (SIGTERM), then kill the process group after the stop timeout."""
        self._stopping.add(lease_id)
        try:
            worker = self.workers.get(lease_id)
            if worker is None:
                return
            await self.launcher.stop(worker, self.stop_timeout)
            self.workers.pop(lease_id, None)
            self._save_state()
            self._clean_up(lease_id)
            logger.info("lease %s: worker stopped", lease_id)
        finally:
            self._stopping.discard(lease_id)

    async def _report(self, lease_id: str, state: LeaseState, reason: EndReason | None = None,
                      message: str = "", attempts: int = 20,
                      environment_error: bool = False) -> None:
        # A worker's output may hold NUL characters, which the broker's database refuses.
        body = {"state": state, "reason": reason,
                "message": message.replace("\x00", "")[-2000:],
                "environment_error": environment_error}
        delay = 0.2
        # After the heartbeat that tells a new offer, within a heartbeat's interval (a broker
        # that does not answer it must not hold the report up for longer).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.heartbeat_interval):
                await self._offer_told.wait()
        for _attempt in range(attempts):
            try:
                async with self._report_lock:
                    await self.client.request(
                        "POST", f"{self._base}/leases/{url_segment(lease_id)}/state",
                        json=body)
                return
            except (errors.BrokerUnreachable, errors.BrokerError) as exc:
                logger.warning("reporting lease %s %s failed: %s", lease_id, state, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
            except errors.ParallexError as exc:
                logger.warning("the broker refused the report of lease %s %s: %s", lease_id,
                               state, exc)
                return

    def _hold_environment(self, lease_id: str, key: str) -> None:
        self._env_of[lease_id] = key
        self.environments.in_use.setdefault(key, set()).add(lease_id)

    def _let_go_of_environment(self, lease_id: str) -> None:
        key = self._env_of.pop(lease_id, None)
        if key is not None:
            self.environments.in_use.get(key, set()).discard(lease_id)

    def _clean_up(self, lease_id: str) -> None:
        """The lease's worker is gone: kill what its account still runs, delete its folder
        (key and scratch included) so nothing of it outlives the lease."""
        self.launcher.forget(lease_id)
        self._suspended.discard(lease_id)
        self._runs_with.pop(lease_id, None)
        self._let_go_of_environment(lease_id)
        self.accounts.release(lease_id)
        self._sizes.pop(lease_id, None)
        try:
            remove_lease_folder(self.workdir, lease_id)
        except (OSError, UnsafeIdentifier) as exc:
            logger.warning("lease %s: could not delete its folder: %s", lease_id, exc)
