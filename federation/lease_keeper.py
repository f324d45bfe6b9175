"""LeaseKeeper: a cluster's leases, kept by its scheduler's process.

The keeper lives beside the Dask scheduler, in a process of the user's own that runs nothing
else, so that a notebook cell holding the GIL (a long C call, a tight loop in an extension) can
stall neither the scheduler nor the heartbeat that tells the broker the cluster is alive. It
asks the broker for leases, signs the agents' requests for worker certificates, confirms joined
workers (metering starts then), replaces workers whose lease ended and gives idle workers back.

The user's FederatedCluster drives it through scheduler handlers named ``parallex_*``; only the
cluster's client certificate may call them (a worker, or a client a task opens, may not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import uuid
from collections import Counter
from dataclasses import asdict, dataclass

from dask.utils import format_time
from distributed import Scheduler
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.metrics import time

from . import errors, gateway_comm, latency
from .client import AsyncBrokerClient
from .guard import SchedulerGuard
from .lease_states import LIVE_STATES, EndReason, LeaseState
from .sizes import format_bytes
from .tls import BadSigningRequest, ClusterAuthority

logger = logging.getLogger("parallex.cluster")

ENDED = LeaseState.ended
#: Lease states before "ended", in the order a lease passes through them.
LIVE = LIVE_STATES


@dataclass
class WorkerGroup:
    """Workers of one size; ``desired`` is how many the user asked for."""

    name: str
    cpus: float
    memory: int
    gpus: int = 0
    gpu_model: str | None = None
    desired: int = 0

    def spec(self) -> dict:
        return {"cpus": self.cpus, "memory": self.memory, "gpus": self.gpus,
                "gpu_model": self.gpu_model}


def group_name(cpus: float, memory: int, gpus: int = 0, gpu_model: str | None = None) -> str:
    """The name of an unnamed group of one worker size, e.g. ``2cpu-4GiB-1gpu``."""
    name = f"{cpus:g}cpu-{format_bytes(memory).replace(' ', '')}"
    if gpus:
        name += f"-{gpus}gpu" + (f"-{gpu_model}" if gpu_model else "")
    return name


def lease_of(worker_name: str) -> str:
    """The lease id behind a worker name (dask-cuda adds -<i> for multi-GPU leases)."""
    head, _, tail = str(worker_name).rpartition("-")
    return head if tail.isdigit() and head.startswith("ls-") else str(worker_name)


class _WorkerJoined(SchedulerPlugin):
    """Wakes the keeper's heartbeat when a worker registers, so the broker hears promptly
    that the lease's worker is really there (it is metered from then on)."""

    def __init__(self, event: asyncio.Event):
        self.event = event

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.event.set()


@dataclass
class KeeperSettings:
    """What the user's FederatedCluster decided; sent to the scheduler process at start."""

    broker_url: str
    token: str
    name: str
    ca_cert: str
    ca_key: str
    worker_cpus: float
    worker_memory: int
    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = 0
    dashboard: bool = True
    heartbeat_interval: float = 5.0
    request_timeout: float = 30.0
    lease_start_timeout: float = 120.0
    idle_timeout: float = 1200.0
    labs: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    #: "notebook": workers get this interpreter's packages (agents build them);
    #: "agent": workers run whatever the agents have (nothing is described or shipped).
    environment: str = "notebook"

    def to_json(self) -> dict:
        return asdict(self)


class LeaseKeeper:
    """The scheduler and the leases of one FederatedCluster, in the scheduler's process."""

    HANDLERS = ("state", "scale", "scale_down", "hold", "release", "wait_for_workers",
                "refresh", "end", "round_trips", "environment")

    def __init__(self, settings: KeeperSettings):
        self.settings = settings
        self.authority = ClusterAuthority.from_pem(settings.ca_cert, settings.ca_key)
        self.groups: dict[str, WorkerGroup] = {"default": WorkerGroup(
            "default", float(settings.worker_cpus), int(settings.worker_memory))}
        self.leases: dict[str, dict] = {}
        self.live: set[str] = set()
        self.cluster_id: str | None = None
        self.adaptive = False
        self.scheduler: Scheduler | None = None
        self.guard: SchedulerGuard | None = None
        self._broker: AsyncBrokerClient | None = None
        self._lock = asyncio.Lock()
        self._joined = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_scale = 0.0
        self._closing = False
        self._ended = False
        #: The broker's path of this cluster's dashboard link (None: no dashboard).
        self.dashboard_path: str | None = None
        #: Seconds of the last measured round trip to each worker, by address.
        self.round_trips: dict[str, float] = {}
        #: The hash of the environment the workers get (None: the agents' own).
        self.environment: str | None = None
        #: Why no provider can run that environment, once the broker said so.
        self.environment_error: str | None = None
        self._environment_lock = asyncio.Lock()

    # ---- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the scheduler and register the cluster with the broker."""
        from distributed.security import Security

        from .tls import ROLE_SCHEDULER

        s = self.settings
        self._broker = AsyncBrokerClient(s.broker_url, s.token, timeout=s.request_timeout)
        who = await self._broker.request("GET", "/whoami")
        if who["kind"] == "provider":
            raise errors.PermissionDenied(
                "a provider token cannot start clusters; use a user token (PARALLEX_TOKEN)")
        scheduler_ck = self.authority.issue("scheduler", ROLE_SCHEDULER)
        security = Security(tls_ca_file=self.authority.ca_pem,
                            tls_scheduler_cert=scheduler_ck.cert,
                            tls_scheduler_key=scheduler_ck.key, require_encryption=True)
        self.scheduler = Scheduler(
            host=s.scheduler_host, port=s.scheduler_port, protocol="tls", security=security,
            dashboard=bool(s.dashboard), dashboard_address=f"{s.scheduler_host}:0")
        self.guard = SchedulerGuard(self.scheduler, lambda: self.live)
        self.guard.install()
        for name in self.HANDLERS:
            self.guard.add_client_handler(f"parallex_{name}", getattr(self, f"_handle_{name}"))
        self.scheduler.add_plugin(_WorkerJoined(self._joined), name="parallex-joined")
        await self.scheduler
        if s.environment == "notebook":
            self.environment = await self._ship_environment()
        dashboard_port = (self.scheduler.http_server.port
                          if s.dashboard and self.scheduler.http_server else None)
        record = await self._broker.request("POST", "/clusters", json={
            "name": s.name, "scheduler_address": self.scheduler.address,
            "labs": list(s.labs), "sites": list(s.sites), "ca_cert": self.authority.ca_pem,
            "dashboard_port": dashboard_port, "environment": self.environment})
        self.cluster_id = record["id"]
        self.dashboard_path = record.get("dashboard_path")
        if record.get("gateway_internal"):
            # Workers are reached through the gateway; from here, by its inside address.
            gateway_comm.dial_via = record["gateway_internal"]
        self._tasks = [asyncio.create_task(self._heartbeat_loop()),
                       asyncio.create_task(self._signing_loop()),
                       asyncio.create_task(self._round_trip_loop())]
        logger.info("cluster %s started; scheduler at %s", self.cluster_id,
                    self.scheduler.address)

    async def _ship_environment(self) -> str:
        """Describe this interpreter's packages to the broker and ship the wheels of local
        ones it does not have yet; returns the environment's hash."""
        from .environment import EnvironmentProblem, describe

        try:
            spec, wheels = await asyncio.to_thread(describe)
        except EnvironmentProblem as exc:
            raise errors.RequestRejected(
                f"{exc}. Or start the cluster with environment='agent' to run the workers "
                "in the labs' own environments", 400, "environment-unshippable") from None
        body = spec.to_json()
        del body["hash"]
        answer = await self._broker.request("POST", "/environments", json=body)
        for sha in answer["missing_wheels"]:
            filename, data = wheels[sha]
            await self._broker.request("PUT", f"/environments/wheels/{sha}",
                                       params={"filename": filename}, content=data,
                                       timeout=max(60.0, self.settings.request_timeout))
        logger.info("environment %s: Python %s, %d packages (%d shipped as wheels)",
                    answer["hash"], spec.python, len(spec.packages), len(wheels))
        return answer["hash"]

    async def _handle_environment(self) -> dict:
        """Describe the packages again (the user installed some); when they changed, new
        leases get the new environment and the workers of the old one are replaced."""
        if self.settings.environment != "notebook":
            return {"changed": False, "replaced": 0, "environment": None}
        async with self._environment_lock:  # one change at a time, however many ask
            digest = await self._ship_environment()
            if digest == self.environment:
                return {"changed": False, "replaced": 0, "environment": digest}
            await self._broker.request("POST", f"/clusters/{self.cluster_id}/environment",
                                       json={"environment": digest})
            self.environment, self.environment_error = digest, None
            async with self._lock:
                old = sorted(self.live)
                await self._retire(old)
            await self._correct_state()
            return {"changed": True, "replaced": len(old), "environment": digest}

    async def end(self) -> None:
        """End every lease at the broker, remove the workers and wait (bounded) until the
        agents have stopped them. Idempotent."""
        if self._ended:
            return
        self._ended = self._closing = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._broker is not None and self.cluster_id is not None:
            try:
                answer = await self._broker.request("DELETE", f"/clusters/{self.cluster_id}")
                # The leases are now "releasing", so a worker that exits keeps the reason
                # "released"; closing them from the scheduler is orderly and faster than
                # waiting for each agent's signal.
                for address in list(self.scheduler.workers):
                    await self.scheduler.remove_worker(address=address, close=True,
                                                       stimulus_id="parallex-cluster-close")
                await self._wait_for_leases_to_end(answer)
            except errors.ParallexError as exc:
                logger.warning("could not end the leases of cluster %s at the broker (%s); the "
                               "broker ends them when the heartbeat times out", self.cluster_id,
                               exc)
        self.live.clear()

    async def close(self) -> None:
        """End the leases, then stop the scheduler and the broker connection."""
        await self.end()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self._broker is not None:
            await self._broker.close()

    async def _wait_for_leases_to_end(self, answer: dict, timeout: float = 15.0) -> None:
        """Give agents a moment to stop the workers, so close() leaves no process behind."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(lease["state"] != ENDED for lease in answer["leases"]):
            if loop.time() > deadline:
                logger.warning("some workers of cluster %s were still stopping after %g s",
                               self.cluster_id, timeout)
                return
            await asyncio.sleep(0.1)
            answer = await self._broker.request("GET", f"/clusters/{self.cluster_id}")
        self._update(answer)

    # ---- the handlers the user's FederatedCluster calls ------------------------------------

    def state(self) -> dict:
        """Everything the user's side shows: leases, groups, workers and refusals."""
        workers = [{"name": str(ws.name), "address": address, "pid": ws.pid,
                    "status": ws.status.name, "resources": dict(ws.resources),
                    "memory_limit": ws.memory_limit, "nthreads": ws.nthreads,
                    "lease": lease_of(ws.name), "round_trip": self.round_trips.get(address)}
                   for address, ws in (self.scheduler.workers.items() if self.scheduler
                                       else [])]
        return {"cluster_id": self.cluster_id, "leases": list(self.leases.values()),
                "environment": self.environment,
                "environment_error": self.environment_error,
                "live": sorted(self.live),
                "groups": {name: asdict(g) for name, g in self.groups.items()},
                "workers": workers,
                "refusals": list(self.guard.refusals[-50:]) if self.guard else []}

    async def _handle_round_trips(self) -> dict[str, float]:
        """Measure the round trip to every worker now; seconds by worker name."""
        await self._measure_round_trips()
        return {str(self.scheduler.workers[a].name): rtt for a, rtt in self.round_trips.items()
                if a in self.scheduler.workers}

    async def _measure_round_trips(self) -> None:
        found = await latency.measure(self.scheduler, list(self.scheduler.workers))
        self.round_trips = {a: rtt for a, rtt in found.items() if a in self.scheduler.workers}

    async def _round_trip_loop(self) -> None:
        """Measure every worker's round trip now and then, for %parallex and the log."""
        logged: float | None = None
        while not self._closing:
            await asyncio.sleep(latency.PROBE_INTERVAL)
            if not self.scheduler.workers:
                continue
            try:
                await self._measure_round_trips()
            except Exception:  # a probe must never take the keeper down
                logger.exception("could not measure round trips to the workers")
                continue
            # Logged when first known and when it halves or doubles, not every 10 s.
            median = statistics.median(self.round_trips.values()) if self.round_trips else None
            if median and (logged is None or not logged / 2 <= median <= logged * 2):
                logger.info("%s", latency.describe(self.round_trips))
                logged = median

    async def _handle_state(self, adaptive: bool | None = None) -> dict:
        if adaptive is not None:
            self.adaptive = bool(adaptive)
        return self.state()

    async def _handle_scale(self, n: int, group: dict | None = None,
                            adaptive: bool = False) -> dict:
        target = self._group(group)
        self.adaptive = adaptive
        self._last_scale = time()
        before = target.desired
        target.desired = int(n)
        try:
            await self._correct_state()
        except BaseException:
            target.desired = before
            raise
        return self.state()

    async def _handle_scale_down(self, workers: list[str], adaptive: bool = False) -> dict:
        self.adaptive = adaptive or self.adaptive
        leases = {lease_of(w) for w in workers} & self.live
        for lid in leases:
            group = self.groups[self.leases[lid]["group"]]
            group.desired = max(0, group.desired - 1)
        await self._retire(sorted(leases))
        return self.state()

    async def _handle_hold(self, group: dict, timeout: float | None = None) -> str:
        target = self._group(group)
        if target.desired < 1:
            target.desired = 1
            try:
                await self._correct_state()
            except BaseException:
                target.desired = 0
                raise
        loop = asyncio.get_running_loop()
        timeout = self.settings.lease_start_timeout if timeout is None else float(timeout)
        deadline = loop.time() + timeout
        while True:
            for address, ws in self.scheduler.workers.items():
                if ws.status == Status.running and self.group_of_worker(address) == target.name:
                    return address
            if loop.time() > deadline:
                raise errors.LeaseStartTimeout(
                    self._start_timeout_message(1, timeout, group=target.name))
            await asyncio.sleep(0.05)

    async def _handle_release(self, name: str) -> dict:
        if name in self.groups and name != "default":
            self.groups[name].desired = 0
            await self._correct_state()
        return self.state()

    async def _handle_wait_for_workers(self, n: int, timeout: float | None = None,
                                       total: float | None = None) -> dict:
        """Wait up to ``timeout`` seconds for ``n`` workers; ``total``: the whole wait the
        user asked for, which a timeout's message names (the user's side waits in slices to
        show progress)."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.lease_start_timeout if timeout is None else float(timeout)
        deadline = loop.time() + timeout
        while self._running_workers() < n:
            if self.environment_error:
                raise errors.EnvironmentRefused(self.environment_error, 409,
                                                "environment-refused")
            if loop.time() > deadline:
                raise errors.LeaseStartTimeout(self._start_timeout_message(
                    n, timeout if total is None else float(total)))
            await asyncio.sleep(0.05)
        # Confirm the connected workers at once, so the broker runs (and meters) their leases
        # and the user's side shows them running with their provider's lab.
        return await self._handle_refresh()

    async def _handle_refresh(self) -> dict:
        await self._handle_ended(self._update(await self._beat()))
        return self.state()

    async def _handle_end(self) -> dict:
        await self.end()
        return self.state()

    def _group(self, spec: dict | None) -> WorkerGroup:
        """The group a scale/hold names (created on first use); None is the default group."""
        if not spec:
            return self.groups["default"]
        default = self.groups["default"]
        cpus = float(spec["cpus"]) if spec.get("cpus") is not None else default.cpus
        memory = int(spec["memory"]) if spec.get("memory") is not None else default.memory
        gpus, model = int(spec.get("gpus") or 0), spec.get("gpu_model")
        name = spec.get("name") or group_name(cpus, memory, gpus, model)
        if name == "default" and (cpus, memory, gpus, model) == (default.cpus, default.memory,
                                                                 0, None):
            return default
        if name not in self.groups:
            self.groups[name] = WorkerGroup(name, cpus, memory, gpus, model)
        return self.groups[name]

    # ---- leases -----------------------------------------------------------------------------

    def _update(self, public: dict) -> list[dict]:
        """Take the broker's view; returns leases that ended without being released by us."""
        newly_ended = []
        for lease in public["leases"]:
            self.leases[lease["id"]] = lease
            if lease["id"] not in self.live:
                continue
            if lease["state"] == ENDED:
                self.live.discard(lease["id"])
                newly_ended.append(lease)
            elif (lease["state"] == LeaseState.releasing
                  and lease.get("release_reason") == EndReason.preempted):
                # The machine's owner took it back: retire the worker through the scheduler
                # (its results move to other workers) and ask for a replacement.
                self.live.discard(lease["id"])
                newly_ended.append(lease)
        return newly_ended

    def _connected_leases(self) -> list[str]:
        """Leases whose workers are registered with the scheduler right now."""
        return sorted({lease_of(ws.name) for ws in self.scheduler.workers.values()}
                      & self.live)

    async def _beat(self) -> dict:
        """One heartbeat: the broker hears which leases' workers have joined (they run and are
        metered from then) and answers with its view of the cluster."""
        return await self._broker.request("POST", f"/clusters/{self.cluster_id}/heartbeat",
                                          json={"connected": self._connected_leases()})

    async def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._closing:
            # A worker that joins wakes the loop: the broker starts metering a lease only
            # when the cluster confirms its worker, so confirm promptly. asyncio.timeout, not
            # wait_for: on Python 3.11 wait_for loses a cancellation that arrives as the event
            # is set, and close() then waited for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_interval):
                    await self._joined.wait()
            self._joined.clear()
            try:
                public = await self._beat()
            except errors.RequestRejected as exc:
                logger.error("the broker ended cluster %s: %s", self.cluster_id, exc)
                self.live.clear()
                return
            except errors.ParallexError as exc:
                failures += 1
                logger.warning("heartbeat %d to the broker failed: %s", failures, exc)
                continue
            failures = 0
            try:
                await self._handle_ended(self._update(public))
                await self._give_back_when_idle()
                await self._correct_state()
            except errors.ParallexError as exc:
                logger.warning("could not replace ended workers: %s", exc)

    async def _give_back_when_idle(self) -> None:
        """Scale to nothing once the scheduler has had no work for ``idle_timeout`` seconds:
        an idle cluster left open must not hold other labs' machines (and cost credits)."""
        idle_timeout = self.settings.idle_timeout
        if idle_timeout <= 0 or self.adaptive:
            return
        idle_since = self.scheduler.idle_since
        held = sum(group.desired for group in self.groups.values())
        # Idle counts from the last scale() as well: asking for workers is activity.
        if not held or idle_since is None or \
                time() - max(idle_since, self._last_scale) < idle_timeout:
            return
        logger.warning("cluster %s had no work for %s; giving its %d workers back (scale up "
                       "again when you need them)", self.cluster_id,
                       format_time(idle_timeout), held)
        async with self._lock:
            for group in self.groups.values():
                group.desired = 0

    async def _signing_loop(self) -> None:
        """Sign the agents' requests for this cluster's workers as they arrive (long poll).

        Each agent makes its worker's key on its own machine and sends a signing request; the
        certificate this cluster's CA returns names the lease. Requests for leases this cluster
        did not ask for, or no longer wants, are left unsigned.
        """
        version = ""
        delay = 0.2
        timeout = self.settings.request_timeout
        while not self._closing:
            try:
                answer = await self._broker.request(
                    "GET", f"/clusters/{self.cluster_id}/signing-requests",
                    params={"since": version, "wait": 20}, timeout=timeout + 25)
                version = answer["version"]
                delay = 0.2
                signed = []
                for item in answer["requests"]:
                    if item["lease_id"] not in self.live:
                        continue
                    try:
                        cert = self.authority.sign_worker_request(item["lease_id"], item["csr"])
                    except BadSigningRequest as exc:
                        logger.warning("not signing lease %s: %s", item["lease_id"], exc)
                        continue
                    signed.append({"lease_id": item["lease_id"], "cert": cert})
                if signed:
                    await self._broker.request(
                        "POST", f"/clusters/{self.cluster_id}/certificates",
                        json={"certificates": signed})
            except (errors.TokenRefused, errors.NotFound, errors.PermissionDenied):
                return  # the cluster is gone or its token revoked: the heartbeat reports it
            except errors.RequestRejected as exc:
                # A lease ended between the request and the signature; ask again shortly.
                logger.info("worker certificates not accepted: %s", exc)
                await asyncio.sleep(delay)
                version = ""
            except errors.ParallexError as exc:
                logger.warning("waiting for signing requests failed: %s; retrying in %.1f s",
                               exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
                version = ""

    async def _handle_ended(self, ended: list[dict]) -> None:
        preempted = [lease for lease in ended if lease["state"] != ENDED]
        for lease in ended:
            if lease["state"] == ENDED and lease["end_reason"] != EndReason.released:
                logger.warning("lease %s on %s ended (%s): %s", lease["id"],
                               lease.get("lab") or "no provider", lease["end_reason"],
                               lease["message"])
                await self._drop_worker(lease["id"])
            elif lease["state"] == ENDED:
                await self._drop_worker(lease["id"])
        for message, n in Counter(lease["message"] for lease in preempted).items():
            logger.warning("%s preempted: %s", f"{n} worker{'s' if n > 1 else ''}", message)
        wanted = {lease["id"] for lease in preempted}
        names = [ws.name for ws in self.scheduler.workers.values()
                 if lease_of(ws.name) in wanted]
        if names:
            await self.scheduler.retire_workers(names=names, close_workers=True, remove=True,
                                                stimulus_id="parallex-preempted")

    async def _drop_worker(self, lease_id: str) -> None:
        for address, ws in list(self.scheduler.workers.items()):
            if lease_of(ws.name) == lease_id:
                await self.scheduler.remove_worker(address=address, close=True,
                                                   stimulus_id=f"lease-ended-{lease_id}")

    def _live_in(self, group: str) -> list[str]:
        return [lid for lid in self.live if self.leases[lid]["group"] == group]

    async def _correct_state(self) -> None:
        async with self._lock:
            for group in self.groups.values():
                live = self._live_in(group.name)
                if len(live) < group.desired:
                    await self._request(group, group.desired - len(live))
                elif len(live) > group.desired:
                    await self._shrink(group, live, len(live) - group.desired)

    async def _request(self, group: WorkerGroup, n: int) -> None:
        ids = [f"ls-{uuid.uuid4().hex[:16]}" for _ in range(n)]
        workers = [{"lease_id": lease_id} for lease_id in ids]
        # Allowed before the broker hears of them, so a fast worker is never refused.
        for lease_id in ids:
            self.leases[lease_id] = {"id": lease_id, "group": group.name,
                                     "state": LeaseState.pending}
        self.live.update(ids)
        try:
            # Answered once admitted (refusals still come at once), not after the placement
            # pass: where they went comes with the next heartbeat, and their workers join
            # as soon as they start either way. Waiting for the pass was most of a scale's
            # time under load (issue 14) and held up the adaptive loop.
            created = await self._broker.request(
                "POST", f"/clusters/{self.cluster_id}/leases", params={"wait": 0},
                json={"spec": group.spec(), "group": group.name, "workers": workers})
            self.environment_error = None
        except errors.EnvironmentRefused as exc:
            self.environment_error = str(exc)
            self.live.difference_update(ids)
            for lease_id in ids:
                self.leases.pop(lease_id, None)
            raise
        except BaseException:
            self.live.difference_update(ids)
            for lease_id in ids:
                self.leases.pop(lease_id, None)
            raise
        for lease in created:
            self.leases[lease["id"]] = lease

    async def _shrink(self, group: WorkerGroup, live: list[str], n: int) -> None:
        order = {state: i for i, state in enumerate(LIVE_STATES)}
        by_name = {ws.name: ws for ws in self.scheduler.workers.values()}

        def cost(lid: str) -> tuple:
            ws = by_name.get(lid)
            return (order.get(self.leases[lid]["state"], 3), ws.nbytes if ws else 0)

        await self._retire(sorted(live, key=cost)[:n])

    async def _retire(self, lease_ids: list[str]) -> None:
        """Release leases at the broker, then retire their workers through the scheduler.

        Releasing first matters: once a lease is "releasing", a worker that exits ends it as
        released, never as failed; the agent gives it a grace period to move its data away.
        """
        if not lease_ids:
            return
        self.live.difference_update(lease_ids)
        await self._broker.request("POST", f"/clusters/{self.cluster_id}/leases/release",
                                   json={"lease_ids": lease_ids})
        wanted = set(lease_ids)
        names = [ws.name for ws in self.scheduler.workers.values()
                 if lease_of(ws.name) in wanted]
        if names:
            await self.scheduler.retire_workers(names=names, close_workers=True, remove=True,
                                                stimulus_id="parallex-scale-down")

    def group_of_worker(self, worker: str) -> str | None:
        """The group of a worker (by name or address), None when it is not ours."""
        name = worker
        if worker in self.scheduler.workers:
            name = self.scheduler.workers[worker].name
        lease = self.leases.get(lease_of(str(name)))
        return lease["group"] if lease else None

    def _live_in(self, group: str | None) -> set[str]:
        """The live leases, of ``group`` only when given."""
        return {lid for lid in self.live
                if group is None or self.leases[lid].get("group") == group}

    def _running_workers(self, group: str | None = None) -> int:
        live = self._live_in(group)
        return sum(1 for ws in self.scheduler.workers.values()
                   if ws.status == Status.running and lease_of(ws.name) in live)

    def _start_timeout_message(self, n: int, timeout: float, group: str | None = None) -> str:
        live = self._live_in(group)
        states = Counter(self.leases[lid]["state"] for lid in live)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "no live leases"
        waiting = sorted({self.leases[lid].get("message") for lid in live
                          if self.leases[lid]["state"] == LeaseState.pending} - {None, ""})
        hint = (f" Pending leases wait: {'; '.join(waiting)}." if waiting else
                " Pending leases wait for a provider with free capacity; see "
                "cluster.leases for each lease's state and message.")
        which = f"workers ({group})" if group else "workers"
        return (f"{self._running_workers(group)} of {n} {which} connected after {timeout:g} s "
                f"(leases: {detail}).{hint}")


def worker_news(leases: list[dict]) -> list[str]:
    """Lines for the user about workers their machines' owners took back or that failed,
    grouped: "2 workers preempted: owner activity on lab-physics-server-3"."""
    groups: Counter[tuple[str, str]] = Counter()
    for lease in leases:
        if EndReason.preempted in (lease.get("release_reason"), lease.get("end_reason")):
            groups[("preempted", lease.get("message") or "")] += 1
        elif lease.get("state") == LeaseState.suspended:
            groups[("suspended", lease.get("message") or "")] += 1
        elif lease.get("end_reason") == EndReason.failed:
            groups[("failed", lease.get("message") or "")] += 1
    return [f"{n} worker{'s' if n > 1 else ''} {what}: {message}"
            for (what, message), n in sorted(groups.items())]


def starting_news(leases: list[dict]) -> Counter[str]:
    """What starting leases do before their workers can start ("building the environment on
    lab-x-server (37 of 112 packages)"), with how many leases each."""
    return Counter(lease["message"] for lease in leases
                   if lease.get("state") == LeaseState.starting and lease.get("message"))


def pending_reasons(leases: list[dict]) -> Counter[str]:
    """How many pending leases wait for each reason the broker gave."""
    return Counter(lease.get("message") or "waiting for a provider with free capacity"
                   for lease in leases if lease.get("state") == LeaseState.pending)


__all__ = ["KeeperSettings", "LeaseKeeper", "WorkerGroup", "group_name", "lease_of",
                      "pending_reasons", "starting_news", "worker_news", "ENDED", "LIVE"]
