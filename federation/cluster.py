"""FederatedCluster: a Dask cluster whose workers are leases on lab machines of the federation.

The Dask scheduler runs inside the user's own process, so the code clients send it runs with the
user's rights and nobody else's. The broker only places leases; each lease's worker joins the
scheduler over TLS with a certificate that this cluster's CA issued for that lease alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from dask.utils import format_time
from distributed import Scheduler
from distributed.core import Status, rpc
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.metrics import time
from distributed.security import Security
from distributed.utils import format_dashboard_link

from . import config, errors
from .client import AsyncBrokerClient
from .estimate import Estimate
from .guard import SchedulerGuard
from .sizes import format_bytes, parse_memory
from .tls import ROLE_CLIENT, ROLE_SCHEDULER, BadSigningRequest, ClusterAuthority

logger = logging.getLogger("parallex.cluster")

ENDED = "ended"
LIVE = ("pending", "starting", "running")


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


class FederatedAdaptive(Adaptive):
    """Dask's Adaptive, but releasing leases before retiring their workers (see _retire),
    touching only the default group (named groups, e.g. a %%remote worker, are held on
    purpose), and keeping a refusal (credit, quota) on ``cluster.scale_error`` instead of
    logging it every second."""

    async def scale_up(self, n: int) -> None:
        try:
            await super().scale_up(n)
        except errors.ParallexError as exc:
            if str(exc) != str(self.cluster.scale_error):
                logger.warning("adaptive scale-up refused: %s", exc)
            self.cluster.scale_error = exc
        else:
            self.cluster.scale_error = None

    async def scale_down(self, workers: list[str]) -> None:
        workers = [w for w in workers if self.cluster.group_of_worker(w) == "default"]
        if workers:
            await self.cluster.scale_down(workers)


class _WorkerJoined(SchedulerPlugin):
    """Wakes the cluster's heartbeat when a worker registers, so the broker hears promptly
    that the lease's worker is really there (it is metered from then on)."""

    def __init__(self, event: asyncio.Event):
        self.event = event

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.event.set()


def lease_of(worker_name: str) -> str:
    """The lease id behind a worker name (dask-cuda adds -<i> for multi-GPU leases)."""
    head, _, tail = str(worker_name).rpartition("-")
    return head if tail.isdigit() and head.startswith("ls-") else str(worker_name)


class FederatedCluster(Cluster):
    """A Dask cluster on the Parallex federation.

    Parameters
    ----------
    broker_url, token:
        The broker and the user's API token; default to PARALLEX_BROKER_URL / PARALLEX_TOKEN,
        then the dask config keys ``parallex.broker-url`` / ``parallex.token``.
    worker_cpus, worker_memory:
        Size of one worker of the default group (config ``parallex.worker``).
    scheduler_host, scheduler_port:
        Where the scheduler listens; workers on lab machines must reach it.
    heartbeat_interval:
        Seconds between heartbeats to the broker (``parallex.heartbeat-interval``).
    lease_start_timeout:
        Seconds ``wait_for_workers`` waits before raising LeaseStartTimeout.
    labs, sites:
        Only these labs' (or sites') machines may host this cluster's workers, e.g. for
        sensitive data (``parallex.labs`` / ``parallex.sites``; empty means any).
    idle_timeout:
        Seconds without work after which the cluster gives its workers back
        (``parallex.idle-timeout``, 20 minutes; 0 never). Adaptive clusters scale themselves.

    Examples
    --------
    >>> with FederatedCluster() as cluster:
    ...     cluster.scale(4)
    ...     client = cluster.get_client()
    """

    def __init__(self, broker_url: str | None = None, token: str | None = None, *,
                 name: str | None = None, worker_cpus: float | None = None,
                 worker_memory: str | int | None = None, scheduler_host: str | None = None,
                 scheduler_port: int | None = None, dashboard: bool | None = None,
                 heartbeat_interval: float | None = None,
                 lease_start_timeout: float | None = None,
                 idle_timeout: float | None = None, labs: list[str] | None = None,
                 sites: list[str] | None = None, asynchronous: bool = False,
                 loop: Any = None, quiet: bool = False):
        self._broker_url = config.broker_url(broker_url)
        self._token = config.token(token)
        cpus = float(worker_cpus if worker_cpus is not None else config.get("worker.cpus"))
        memory = parse_memory(worker_memory if worker_memory is not None
                              else config.get("worker.memory"))
        if cpus <= 0:
            raise ValueError(f"worker_cpus must be more than 0; got {cpus:g}")
        self._groups: dict[str, WorkerGroup] = {"default": WorkerGroup("default", cpus, memory)}
        self._scheduler_host = scheduler_host or config.get("scheduler.host")
        self._scheduler_port = int(scheduler_port if scheduler_port is not None
                                   else config.get("scheduler.port"))
        self._dashboard = dashboard if dashboard is not None else config.get("scheduler.dashboard")
        self._heartbeat_interval = float(heartbeat_interval or config.get("heartbeat-interval"))
        self.labs = sorted(labs if labs is not None else config.get("labs") or [])
        self.sites = sorted(sites if sites is not None else config.get("sites") or [])
        self.idle_timeout = float(idle_timeout if idle_timeout is not None
                                  else config.get("idle-timeout"))
        self.lease_start_timeout = float(lease_start_timeout or
                                         config.get("lease-start-timeout"))
        self._request_timeout = float(config.get("request-timeout"))
        self._leases: dict[str, dict] = {}
        self._live: set[str] = set()
        self._broker: AsyncBrokerClient | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._signing_task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        self._joined: asyncio.Event | None = None
        self._last_scale = 0.0
        self._closing = False
        self.scheduler: Scheduler | None = None
        self.security: Security | None = None
        self.guard: SchedulerGuard | None = None
        self.authority: ClusterAuthority | None = None
        self.cluster_id: str | None = None
        self.scale_error: errors.ParallexError | None = None
        super().__init__(asynchronous=asynchronous, loop=loop, quiet=quiet, name=name)
        if not self.called_from_running_loop:
            self._loop_runner.start()
            try:
                self.sync(self._start)
            except BaseException:
                self._loop_runner.stop()
                raise

    def __await__(self):
        async def _():
            if self.status == Status.created:
                await self._start()
            return self

        return _().__await__()

    # ---- start and stop ---------------------------------------------------------------------

    async def _start(self) -> None:
        if self.status != Status.created:
            return
        self.status = Status.starting
        self._lock = asyncio.Lock()
        try:
            self._broker = AsyncBrokerClient(self._broker_url, self._token,
                                             timeout=self._request_timeout)
            who = await self._broker.request("GET", "/whoami")
            if who["kind"] == "provider":
                raise errors.PermissionDenied(
                    "a provider token cannot start clusters; use a user token (PARALLEX_TOKEN)")
            self.authority = ClusterAuthority(self.name)
            scheduler_ck = self.authority.issue("scheduler", ROLE_SCHEDULER)
            client_ck = self.authority.issue("client", ROLE_CLIENT)
            self.security = Security(
                tls_ca_file=self.authority.ca_pem,
                tls_scheduler_cert=scheduler_ck.cert, tls_scheduler_key=scheduler_ck.key,
                tls_client_cert=client_ck.cert, tls_client_key=client_ck.key,
                require_encryption=True,
            )
            self.scheduler = Scheduler(
                host=self._scheduler_host, port=self._scheduler_port, protocol="tls",
                security=self.security, dashboard=bool(self._dashboard),
                dashboard_address=f"{self._scheduler_host}:0",
            )
            self.guard = SchedulerGuard(self.scheduler, lambda: self._live)
            self.guard.install()
            self._joined = asyncio.Event()
            self.scheduler.add_plugin(_WorkerJoined(self._joined), name="parallex-joined")
            await self.scheduler
            self.scheduler_comm = rpc(self.scheduler.address,
                                      connection_args=self.security.get_connection_args("client"))
            record = await self._broker.request("POST", "/clusters", json={
                "name": self.name, "scheduler_address": self.scheduler.address,
                "labs": self.labs, "sites": self.sites,
                "ca_cert": self.authority.ca_pem})
            self.cluster_id = record["id"]
            await super()._start()
        except BaseException:
            self.status = Status.failed
            await self._close()
            raise
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        self._signing_task = asyncio.create_task(self._signing_loop())
        logger.info("cluster %s started; scheduler at %s", self.cluster_id,
                    self.scheduler.address)

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        self._closing = True
        for task in (self._heartbeat_task, self._signing_task):
            if task is not None:
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
        self._live.clear()
        await super()._close()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self._broker is not None:
            await self._broker.close()
        self.status = Status.closed

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

    def close(self, timeout: float | None = None) -> Any:
        """End every lease of this cluster, stop the scheduler and return."""
        result = super().close(timeout=timeout)
        if not self.asynchronous:
            self._loop_runner.stop()
        return result

    def __exit__(self, exc_type, exc_value, traceback):
        self.close()

    # ---- leases -----------------------------------------------------------------------------

    @property
    def leases(self) -> list[dict]:
        """Every lease of this cluster as the broker last reported it."""
        return list(self._leases.values())

    def _update(self, public: dict) -> list[dict]:
        """Take the broker's view; returns leases that ended without being released by us."""
        newly_ended = []
        for lease in public["leases"]:
            self._leases[lease["id"]] = lease
            if lease["state"] == ENDED and lease["id"] in self._live:
                self._live.discard(lease["id"])
                newly_ended.append(lease)
        return newly_ended

    def _connected_leases(self) -> list[str]:
        """Leases whose workers are registered with the scheduler right now."""
        return sorted({lease_of(ws.name) for ws in self.scheduler.workers.values()}
                      & self._live)

    async def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._closing:
            # A worker that joins wakes the loop: the broker starts metering a lease only
            # when the cluster confirms its worker, so confirm promptly. asyncio.timeout, not
            # wait_for: on Python 3.11 wait_for loses a cancellation that arrives as the event
            # is set, and close() then waited for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat_interval):
                    await self._joined.wait()
            self._joined.clear()
            try:
                public = await self._beat()
            except errors.RequestRejected as exc:
                logger.error("the broker ended cluster %s: %s", self.cluster_id, exc)
                self._live.clear()
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
        if self.idle_timeout <= 0 or self._adaptive is not None:
            return
        idle_since = self.scheduler.idle_since
        held = sum(group.desired for group in self._groups.values())
        # Idle counts from the last scale() as well: asking for workers is activity.
        if not held or idle_since is None or \
                time() - max(idle_since, self._last_scale) < self.idle_timeout:
            return
        logger.warning("cluster %s had no work for %s; giving its %d workers back (scale up "
                       "again when you need them)", self.cluster_id,
                       format_time(self.idle_timeout), held)
        async with self._lock:
            for group in self._groups.values():
                group.desired = 0

    async def _signing_loop(self) -> None:
        """Sign the agents' requests for this cluster's workers as they arrive (long poll).

        Each agent makes its worker's key on its own machine and sends a signing request; the
        certificate this cluster's CA returns names the lease. Requests for leases this cluster
        did not ask for, or no longer wants, are left unsigned.
        """
        version = ""
        delay = 0.2
        while not self._closing:
            try:
                answer = await self._broker.request(
                    "GET", f"/clusters/{self.cluster_id}/signing-requests",
                    params={"since": version, "wait": 20}, timeout=self._request_timeout + 25)
                version = answer["version"]
                delay = 0.2
                signed = []
                for item in answer["requests"]:
                    if item["lease_id"] not in self._live:
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
        for lease in ended:
            if lease["end_reason"] != "released":
                logger.warning("lease %s on %s ended (%s): %s", lease["id"],
                               lease.get("lab") or "no provider", lease["end_reason"],
                               lease["message"])
            await self._drop_worker(lease["id"])

    async def _drop_worker(self, lease_id: str) -> None:
        for address, ws in list(self.scheduler.workers.items()):
            if lease_of(ws.name) == lease_id:
                await self.scheduler.remove_worker(address=address, close=True,
                                                   stimulus_id=f"lease-ended-{lease_id}")

    def _live_in(self, group: str) -> list[str]:
        return [lid for lid in self._live if self._leases[lid]["group"] == group]

    async def _correct_state(self) -> None:
        async with self._lock:
            for group in self._groups.values():
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
            self._leases[lease_id] = {"id": lease_id, "group": group.name, "state": "pending"}
        self._live.update(ids)
        try:
            created = await self._broker.request(
                "POST", f"/clusters/{self.cluster_id}/leases",
                json={"spec": group.spec(), "group": group.name, "workers": workers})
        except BaseException:
            self._live.difference_update(ids)
            for lease_id in ids:
                self._leases.pop(lease_id, None)
            raise
        for lease in created:
            self._leases[lease["id"]] = lease

    async def _shrink(self, group: WorkerGroup, live: list[str], n: int) -> None:
        order = {"pending": 0, "starting": 1, "running": 2}
        by_name = {ws.name: ws for ws in self.scheduler.workers.values()}

        def cost(lid: str) -> tuple:
            ws = by_name.get(lid)
            return (order.get(self._leases[lid]["state"], 3), ws.nbytes if ws else 0)

        await self._retire(sorted(live, key=cost)[:n])

    async def _retire(self, lease_ids: list[str]) -> None:
        """Release leases at the broker, then retire their workers through the scheduler.

        Releasing first matters: once a lease is "releasing", a worker that exits ends it as
        released, never as failed; the agent gives it a grace period to move its data away.
        """
        if not lease_ids:
            return
        self._live.difference_update(lease_ids)
        await self._broker.request("POST", f"/clusters/{self.cluster_id}/leases/release",
                                   json={"lease_ids": lease_ids})
        wanted = set(lease_ids)
        names = [ws.name for ws in self.scheduler.workers.values()
                 if lease_of(ws.name) in wanted]
        if names:
            await self.scheduler.retire_workers(names=names, close_workers=True, remove=True,
                                                stimulus_id="parallex-scale-down")

    # ---- scaling ----------------------------------------------------------------------------

    def _group_for(self, gpus: int, cpus: float | None, memory: str | int | None,
                   gpu_model: str | None) -> WorkerGroup:
        default = self._groups["default"]
        if not gpus and cpus is None and memory is None and gpu_model is None:
            return default
        size = (float(cpus) if cpus is not None else default.cpus,
                parse_memory(memory) if memory is not None else default.memory)
        name = f"{size[0]:g}cpu-{format_bytes(size[1]).replace(' ', '')}"
        if gpus:
            name += f"-{gpus}gpu" + (f"-{gpu_model}" if gpu_model else "")
        if name not in self._groups:
            self._groups[name] = WorkerGroup(name, size[0], size[1], int(gpus), gpu_model)
        return self._groups[name]

    def scale(self, n: int, gpus: int = 0, *, cpus: float | None = None,
              memory: str | int | None = None, gpu_model: str | None = None) -> Any:
        """Ask for ``n`` workers of a size; ``gpus=k`` makes a GPU group advertising GPU=k.

        Raises NoProviderFits at once when no provider could ever host such a worker.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"scale() needs a whole number of workers >= 0; got {n!r}")
        if not isinstance(gpus, int) or gpus < 0:
            raise ValueError(f"gpus must be a whole number >= 0; got {gpus!r}")
        if cpus is not None and cpus <= 0:
            raise ValueError(f"cpus must be more than 0; got {cpus!r}")
        return self.sync(self._scale, n, gpus, cpus, memory, gpu_model)

    async def _scale(self, n: int, gpus: int, cpus, memory, gpu_model) -> None:
        group = self._group_for(gpus, cpus, memory, gpu_model)
        self._last_scale = time()
        before = group.desired
        group.desired = n
        try:
            await self._correct_state()
        except BaseException:
            group.desired = before
            raise

    async def scale_down(self, workers: list[str]) -> None:
        """Release the leases of these workers (names) and lower their groups' targets."""
        leases = {lease_of(w) for w in workers} & self._live
        for lid in leases:
            group = self._groups[self._leases[lid]["group"]]
            group.desired = max(0, group.desired - 1)
        await self._retire(sorted(leases))

    def group_of_worker(self, worker: str) -> str | None:
        """The group of a worker (by name or address), None when it is not ours."""
        name = worker
        if self.scheduler is not None and worker in self.scheduler.workers:
            name = self.scheduler.workers[worker].name
        lease = self._leases.get(lease_of(str(name)))
        return lease["group"] if lease else None

    def hold(self, group: str, *, cpus: float | None = None, memory: str | int | None = None,
             gpus: int = 0, gpu_model: str | None = None, timeout: float | None = None) -> str:
        """Keep one worker in the named ``group`` (adaptive scaling leaves it alone) and
        return its address once it is connected."""
        return self.sync(self._hold, group, cpus, memory, gpus, gpu_model, timeout)

    async def _hold(self, name, cpus, memory, gpus, gpu_model, timeout) -> str:
        default = self._groups["default"]
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = WorkerGroup(
                name, float(cpus) if cpus is not None else default.cpus,
                parse_memory(memory) if memory is not None else default.memory,
                int(gpus), gpu_model)
        if group.desired < 1:
            group.desired = 1
            try:
                await self._correct_state()
            except BaseException:
                group.desired = 0
                raise
        loop = asyncio.get_running_loop()
        timeout = self.lease_start_timeout if timeout is None else float(timeout)
        deadline = loop.time() + timeout
        while True:
            for address, ws in self.scheduler.workers.items():
                if ws.status == Status.running and self.group_of_worker(address) == name:
                    return address
            if loop.time() > deadline:
                raise errors.LeaseStartTimeout(self._start_timeout_message(1, timeout))
            await asyncio.sleep(0.05)

    def release(self, group: str) -> None:
        """Give back the workers of a named group."""
        return self.sync(self._release_group, group)

    async def _release_group(self, name: str) -> None:
        if name in self._groups and name != "default":
            self._groups[name].desired = 0
            await self._correct_state()

    def adapt(self, Adaptive: type[Adaptive] | None = None, **kwargs: Any) -> Adaptive:
        """Scale between ``minimum`` and ``maximum`` workers with Dask's adaptive policy."""
        return super().adapt(Adaptive=Adaptive or FederatedAdaptive, **kwargs)

    @property
    def plan(self) -> set[str]:
        return set(self._live)

    @property
    def requested(self) -> set[str]:
        return set(self._live)

    async def _wait_for_workers(self, n_workers: int = 0, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.lease_start_timeout if timeout is None else float(timeout)
        deadline = loop.time() + timeout
        while self._running_workers() < n_workers:
            if loop.time() > deadline:
                raise errors.LeaseStartTimeout(self._start_timeout_message(n_workers, timeout))
            await asyncio.sleep(0.05)
        # Confirm the connected workers at once, so the broker runs (and meters) their leases
        # and cluster.leases shows them running with their provider's lab.
        await self._refresh()

    async def _refresh(self) -> None:
        await self._handle_ended(self._update(await self._beat()))

    async def _beat(self) -> dict:
        """One heartbeat: the broker hears which leases' workers have joined (they run and are
        metered from then) and answers with its view of the cluster."""
        return await self._broker.request("POST", f"/clusters/{self.cluster_id}/heartbeat",
                                          json={"connected": self._connected_leases()})

    def _running_workers(self) -> int:
        return sum(1 for ws in self.scheduler.workers.values()
                   if ws.status == Status.running and lease_of(ws.name) in self._live)

    def _start_timeout_message(self, n: int, timeout: float) -> str:
        states = Counter(self._leases[lid]["state"] for lid in self._live)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "no live leases"
        hint = (" Pending leases wait for a provider with free capacity; see "
                "cluster.leases for each lease's state and message.")
        return (f"{self._running_workers()} of {n} workers connected after {timeout:g} s "
                f"(leases: {detail}).{hint}")

    # ---- cost -------------------------------------------------------------------------------

    @property
    def cost(self) -> Decimal:
        """PCU this cluster has cost its lab so far, including time not yet metered (work on
        the lab's own machines is free). ``cost_details()`` has the breakdown."""
        return self.sync(self._cost)

    async def _cost(self) -> Decimal:
        return Decimal((await self._cost_details())["pcu"])

    def cost_details(self) -> dict:
        """Metered and accrued PCU, self-use, the current rate and the cloud equivalent."""
        return self.sync(self._cost_details)

    async def _cost_details(self) -> dict:
        return await self._broker.request("GET", f"/clusters/{self.cluster_id}/cost")

    def estimate(self, n: int | None = None, gpus: int = 0, *, cpus: float | None = None,
                 memory: str | int | None = None, gpu_model: str | None = None) -> Estimate:
        """PCU per hour of the current workers and, given ``n``, of ``n`` workers of a size
        (the arguments of ``scale``) at today's list price."""
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"estimate() needs a whole number of workers >= 0; got {n!r}")
        return self.sync(self._estimate, n, gpus, cpus, memory, gpu_model)

    async def _estimate(self, n, gpus, cpus, memory, gpu_model) -> Estimate:
        now = await self._cost_details()
        planned = None
        if n is not None:
            default = self._groups["default"]
            spec = {"cpus": float(cpus) if cpus is not None else default.cpus,
                    "memory": parse_memory(memory) if memory is not None else default.memory,
                    "gpus": int(gpus), "gpu_model": gpu_model}
            planned = await self._broker.request("POST", "/prices/quote",
                                                 json={"spec": spec, "workers": n})
        return Estimate.from_answers(now, planned)

    # ---- display ----------------------------------------------------------------------------

    def workers_by_lab(self) -> dict[str, int]:
        """Connected workers per providing lab."""
        connected = {lease_of(ws.name) for ws in (self.scheduler.workers.values()
                                                  if self.scheduler else [])}
        return dict(Counter(self._leases[lid].get("lab") or "?" for lid in connected
                            if lid in self._leases))

    def _pending(self) -> int:
        return sum(1 for lid in self._live if self._leases[lid]["state"] in ("pending",
                                                                              "starting"))

    def __repr__(self) -> str:
        return (f"FederatedCluster({self.cluster_id}, {self.scheduler_address!r}, "
                f"workers={sum(self.workers_by_lab().values())}, pending={self._pending()}, "
                f"labs={self.workers_by_lab()})")

    def _scaling_status(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(lab)}</td><td>{n}</td></tr>"
                       for lab, n in sorted(self.workers_by_lab().items()))
        return (f"<table><tr><th>Lab</th><th>Workers</th></tr>{rows}"
                f"<tr><td>pending</td><td>{self._pending()}</td></tr></table>")

    def _repr_html_(self, cluster_status=None) -> str:
        link = self.dashboard_link
        return (f"<div><strong>FederatedCluster</strong> {html.escape(str(self.cluster_id))}"
                f"<br>Scheduler: {html.escape(self.scheduler_address)}"
                f"<br>Dashboard: <a href='{link}' target='_blank'>{html.escape(link)}</a>"
                f"{self._scaling_status()}</div>")

    @property
    def dashboard_link(self) -> str:
        if self.scheduler is None or "dashboard" not in self.scheduler.services:
            return ""
        port = self.scheduler.services["dashboard"].port
        return format_dashboard_link(self._scheduler_host, port)
