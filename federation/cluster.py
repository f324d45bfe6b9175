"""FederatedCluster: a Dask cluster whose workers are leases on lab machines of the federation.

The Dask scheduler runs in a process of the user's own (federation.scheduler_process) beside
the LeaseKeeper that asks the broker for leases and heartbeats for them. It does not share the
notebook's process: a cell that holds the GIL for minutes would otherwise stall the scheduler
and the heartbeat, and the broker would end the cluster as lost. The code clients send the
scheduler still runs with the user's rights and nobody else's. The broker only places leases;
each lease's worker joins the scheduler over TLS with a certificate that this cluster's CA
issued for that lease alone.

This object is the user's handle: it starts that process, forwards scale/hold/release to the
keeper (scheduler handlers only the cluster's client certificate may call) and shows its state.
Closing it, or the end of the user's process, ends every lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import dask.config
from distributed.core import Status, rpc
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.security import Security
from tornado.ioloop import PeriodicCallback

from . import config, errors
from .client import AsyncBrokerClient
from .environment import site_fingerprint
from .estimate import Estimate
from .lease_keeper import ENDED, LIVE, KeeperSettings, lease_of, pending_reasons, starting_news
from .lease_states import LeaseState
from .sizes import parse_memory
from .tls import ROLE_CLIENT, ClusterAuthority

logger = logging.getLogger("parallex.cluster")

__all__ = ["FederatedCluster", "FederatedAdaptive", "ENDED", "LIVE", "lease_of"]

#: Seconds the scheduler process may take to start and register the cluster.
START_TIMEOUT = 90.0
#: Milliseconds between refreshes of the copy of the keeper's state that displays read.
STATE_REFRESH_MS = 1000
#: Seconds between the progress lines wait_for_workers prints (an environment's build).
PROGRESS_INTERVAL = 2.0
#: How an agent's words on a starting lease begin while it builds the lease's environment.
BUILDING = "building the environment on "
#: Seconds close() waits for the scheduler process to end the leases and exit.
CLOSE_TIMEOUT = 45.0


#: distributed's own default for distributed.dashboard.link.
DASK_DEFAULT_LINK = "{scheme}://{host}:{port}/status"


class FederatedAdaptive(Adaptive):
    """Dask's Adaptive, but releasing leases before retiring their workers (the keeper's
    scale_down), touching only the default group (named groups, e.g. a %%remote worker, are
    held on purpose), and keeping a refusal (credit, quota) on ``cluster.scale_error`` instead
    of logging it every second."""

    async def recommendations(self, target: int) -> dict:
        await self.cluster._refresh_state()
        return await super().recommendations(target)

    async def scale_up(self, n: int) -> None:
        try:
            await self.cluster._scale(n, None, adaptive=True)
        except errors.ParallexError as exc:
            if str(exc) != str(self.cluster.scale_error):
                logger.warning("adaptive scale-up refused: %s", exc)
            self.cluster.scale_error = exc
        else:
            self.cluster.scale_error = None

    async def scale_down(self, workers: list[str]) -> None:
        workers = [w for w in workers if self.cluster.group_of_worker(w) == "default"]
        if workers:
            await self.cluster._scale_down(workers, adaptive=True)


def _json_safe(value: Any) -> Any:
    """``value`` without what JSON cannot carry (callables in dask's config, e.g. a scheduler
    function the Parallex kernel sets)."""
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _json_safe(v)) for k, v in value.items())
                if v is not _DROP}
    if isinstance(value, list | tuple):
        return [v for v in map(_json_safe, value) if v is not _DROP]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return _DROP


_DROP = object()


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from ``stream`` (a pipe), waiting at most ``timeout`` seconds; b"" at its end."""
    fd = stream.fileno()
    data = b""
    end = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk
    return data


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
    environment:
        ``"notebook"`` (the default, config ``parallex.environment``): the workers get this
        interpreter's packages, built by each lab's agent and cached (local and editable
        packages are shipped as wheels); ``"agent"``: the workers run the labs' own
        environments.
    scheduler_log:
        File the scheduler process's log is appended to; None (the default) leaves it on this
        process's stderr, as Dask's own LocalCluster does.

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
                 sites: list[str] | None = None, environment: str | None = None,
                 scheduler_log: str | os.PathLike | None = None,
                 asynchronous: bool = False, loop: Any = None, quiet: bool = False):
        self._broker_url = config.broker_url(broker_url)
        self._token = config.token(token)
        cpus = float(worker_cpus if worker_cpus is not None else config.get("worker.cpus"))
        if cpus <= 0:
            raise ValueError(f"worker_cpus must be more than 0; got {cpus:g}")
        self.worker_cpus = cpus
        self.worker_memory = parse_memory(worker_memory if worker_memory is not None
                                          else config.get("worker.memory"))
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
        self.scheduler_log = Path(scheduler_log) if scheduler_log else None
        self.environment_mode = environment or config.get("environment") or "notebook"
        #: With the "notebook" environment: notice packages installed after the start (every
        #: second) and give them to the workers (refresh_environment).
        self.watch_packages = True
        self._packages_seen = site_fingerprint()
        if self.environment_mode not in ("notebook", "agent"):
            raise ValueError("environment must be 'notebook' (workers get this Python's "
                             "packages) or 'agent' (the labs' own); got "
                             f"{self.environment_mode!r}")
        #: Where the broker serves this cluster's Dask dashboard (None: no dashboard).
        self.broker_dashboard_link: str | None = None
        self._state: dict[str, Any] = {"leases": [], "live": [], "groups": {}, "workers": [],
                                       "refusals": []}
        self._process: subprocess.Popen | None = None
        self._broker: AsyncBrokerClient | None = None
        self.security: Security | None = None
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
        try:
            self._broker = AsyncBrokerClient(self._broker_url, self._token,
                                             timeout=self._request_timeout)
            self.authority = ClusterAuthority(self.name)
            client_ck = self.authority.issue("client", ROLE_CLIENT)
            self.security = Security(
                tls_ca_file=self.authority.ca_pem, tls_client_cert=client_ck.cert,
                tls_client_key=client_ck.key, require_encryption=True)
            ready = await asyncio.to_thread(self._launch)
            self.cluster_id = ready["cluster_id"]
            if ready.get("dashboard_path"):
                # The broker's URL as a browser sees it: inside JupyterHub the kernel's broker
                # URL is the hub's internal one, and the hub says the public path.
                public = os.environ.get("PARALLEX_BROKER_PUBLIC_URL") or self._broker_url
                self.broker_dashboard_link = (public.rstrip("/") + ready["dashboard_path"]
                                              + "status")
            self.scheduler_comm = rpc(ready["address"],
                                      connection_args=self.security.get_connection_args("client"))
            # Displays (repr, the widget, %parallex) read a copy at most a second old.
            self.periodic_callbacks["parallex-state"] = PeriodicCallback(
                self._refresh_quietly, STATE_REFRESH_MS)
            await super()._start()
            await self._refresh_state()
        except BaseException:
            self.status = Status.failed
            await self._close()
            raise
        logger.info("cluster %s started; scheduler at %s (process %s)", self.cluster_id,
                    ready["address"], ready["pid"])

    def _launch(self) -> dict:
        """Start the scheduler process and wait for its one line: ready, or why not."""
        settings = KeeperSettings(
            broker_url=self._broker_url, token=self._token, name=self.name,
            ca_cert=self.authority.ca_pem, ca_key=self.authority.key_pem,
            worker_cpus=self.worker_cpus, worker_memory=self.worker_memory,
            scheduler_host=self._scheduler_host, scheduler_port=self._scheduler_port,
            dashboard=bool(self._dashboard), heartbeat_interval=self._heartbeat_interval,
            request_timeout=self._request_timeout,
            lease_start_timeout=self.lease_start_timeout, idle_timeout=self.idle_timeout,
            labs=tuple(self.labs), sites=tuple(self.sites),
            environment=self.environment_mode)
        env = dict(os.environ)
        # The scheduler process imports this very package, installed or not.
        here = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        log = None
        if self.scheduler_log is not None:
            self.scheduler_log.parent.mkdir(parents=True, exist_ok=True)
            log = self.scheduler_log.open("ab")
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "federation.scheduler_process"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, env=env,
                # Its own session: a Ctrl-C or a kernel interrupt is for the user's code.
                start_new_session=True)
        finally:
            if log is not None:
                log.close()
        payload = {"settings": settings.to_json(),
                   "dask_config": _json_safe(dask.config.config)}
        self._process.stdin.write(json.dumps(payload).encode() + b"\n")
        self._process.stdin.flush()
        try:
            line = _read_line(self._process.stdout, START_TIMEOUT)
        except TimeoutError:
            raise errors.ParallexError(
                f"the cluster's scheduler process did not start within {START_TIMEOUT:g} s"
                f"{self._log_hint()}") from None
        finally:
            self._process.stdout.close()
        if not line:
            try:
                code = self._process.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            raise errors.ParallexError(
                f"the cluster's scheduler process ended (exit code {code}) before it started"
                f"{self._log_hint()}")
        ready = json.loads(line)
        if "error" in ready:
            kind = getattr(errors, ready["error"], None)
            if not (isinstance(kind, type) and issubclass(kind, errors.ParallexError)):
                kind = errors.ParallexError
            raise kind(ready["message"])
        return ready

    def _log_hint(self) -> str:
        return (f"; its log is in {self.scheduler_log}" if self.scheduler_log
                else "; its log is above, on this process's stderr")

    async def _call(self, op: str, **kwargs: Any) -> Any:
        """Call a keeper handler; a gone scheduler process is a ParallexError saying so."""
        try:
            return await getattr(self.scheduler_comm, op)(**kwargs)
        except errors.ParallexError:
            raise  # LeaseStartTimeout is a TimeoutError, hence an OSError: not a lost process
        except OSError as exc:
            code = self._process.poll() if self._process else None
            gone = f"exited with code {code}" if code is not None else f"is unreachable ({exc})"
            raise errors.ParallexError(
                f"the scheduler process of cluster {self.cluster_id} {gone}"
                f"{self._log_hint()}") from exc

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        if self.scheduler_comm is not None and self._process is not None \
                and self._process.poll() is None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    self._state = await self._call("parallex_end")
            except (errors.ParallexError, TimeoutError) as exc:
                logger.warning("could not end the leases of cluster %s (%s); the broker ends "
                               "them when the heartbeat times out", self.cluster_id, exc)
        await super()._close()
        await asyncio.to_thread(self._stop_process)
        if self._broker is not None:
            await self._broker.close()
        self.status = Status.closed

    def _stop_process(self) -> None:
        """Close the process's stdin (its signal to stop) and wait, bounded, for it to exit."""
        process = self._process
        if process is None:
            return
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            logger.warning("the scheduler process %d did not exit; terminating it", process.pid)
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self, timeout: float | None = None) -> Any:
        """End every lease of this cluster, stop the scheduler process and return."""
        result = super().close(timeout=timeout)
        if not self.asynchronous:
            self._loop_runner.stop()
        return result

    def __exit__(self, exc_type, exc_value, traceback):
        self.close()

    # ---- state ------------------------------------------------------------------------------

    async def _refresh_state(self, **kwargs: Any) -> dict:
        self._state = await self._call("parallex_state", **kwargs)
        return self._state

    async def _refresh_quietly(self, **kwargs: Any) -> None:
        if self.status == Status.running:
            with contextlib.suppress(errors.ParallexError):
                await self._follow_packages()
                await self._refresh_state(**kwargs)

    async def _follow_packages(self) -> None:
        """After a `pip install` in this process's environment, the workers get it too."""
        if not self.watch_packages or self.environment_mode != "notebook":
            return
        seen = site_fingerprint()
        if seen == self._packages_seen:
            return
        self._packages_seen = seen
        result = await self._call("parallex_environment")
        if result["changed"]:
            line = ("your packages changed; new workers of cluster "
                    f"{self.cluster_id} get them ({result['replaced']} replaced)")
            logger.warning(line)
            if not self.quiet:
                print(f"Parallex: {line}", file=sys.stderr, flush=True)

    def _fresh(self) -> None:
        """Fetch the keeper's state first when called from the user's (synchronous) code."""
        if self.status == Status.running and not self.asynchronous:
            self.sync(self._refresh_state)

    @property
    def _leases(self) -> dict[str, dict]:
        return {lease["id"]: lease for lease in self._state["leases"]}

    @property
    def _live(self) -> set[str]:
        return set(self._state["live"])

    @property
    def live(self) -> set[str]:
        """The ids of the leases this cluster holds or waits for (not yet ended)."""
        self._fresh()
        return set(self._state["live"])

    @property
    def leases(self) -> list[dict]:
        """Every lease of this cluster as the broker last reported it."""
        self._fresh()
        return list(self._state["leases"])

    def worker_news(self) -> list[str]:
        """What happened to this cluster's workers that the user should read: workers
        preempted by their machine's owner ("2 workers preempted: owner activity on
        lab-physics-server-3"), suspended, or stopped at their memory limit."""
        from federation.lease_keeper import worker_news

        self._fresh()
        return worker_news(self._state["leases"])

    def round_trips(self) -> dict[str, float]:
        """Measure the round trip from the scheduler to each worker now: seconds by worker
        name. Across sites it is what every task hand-over costs (docs: README, "Latency")."""
        return self.sync(self._call, "parallex_round_trips")

    def connected_workers(self) -> list[dict]:
        """The workers registered with the scheduler now: name, address, lease, status, pid
        and resources of each."""
        self._fresh()
        return list(self._state["workers"])

    def groups(self) -> dict[str, dict]:
        """The worker groups: each one's size and how many workers it should have."""
        self._fresh()
        return dict(self._state["groups"])

    @property
    def refusals(self) -> list[str]:
        """The scheduler's latest refusals (worker registrations, calls to its handlers)."""
        self._fresh()
        return list(self._state["refusals"])

    async def _refresh(self) -> None:
        """Heartbeat now and take the broker's answer (leases confirmed, ended leases)."""
        self._state = await self._call("parallex_refresh")

    # ---- scaling ----------------------------------------------------------------------------

    def _group_spec(self, gpus: int, cpus: float | None, memory: str | int | None,
                    gpu_model: str | None) -> dict | None:
        """None for the default group, else the size that names a group."""
        if not gpus and cpus is None and memory is None and gpu_model is None:
            return None
        return {"cpus": float(cpus) if cpus is not None else None,
                "memory": parse_memory(memory) if memory is not None else None,
                "gpus": int(gpus), "gpu_model": gpu_model}

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
        return self.sync(self._scale, n, self._group_spec(gpus, cpus, memory, gpu_model))

    async def _scale(self, n: int, group: dict | None, adaptive: bool = False) -> None:
        try:
            self._state = await self._call("parallex_scale", n=n, group=group,
                                           adaptive=adaptive)
        except errors.ParallexError:
            # The keeper lists a request's leases before the broker answers, so a state
            # refresh during a refused request saw leases the refusal took back: read it
            # again, or ``plan`` keeps them until the next refresh.
            with contextlib.suppress(errors.ParallexError):
                await self._refresh_state()
            raise

    async def scale_down(self, workers: list[str]) -> None:
        """Release the leases of these workers (names) and lower their groups' targets."""
        await self._scale_down(workers)

    async def _scale_down(self, workers: list[str], adaptive: bool = False) -> None:
        self._state = await self._call("parallex_scale_down", workers=list(workers),
                                       adaptive=adaptive)

    def group_of_worker(self, worker: str) -> str | None:
        """The group of a worker (by name or address), None when it is not ours."""
        name = worker
        if worker in self.scheduler_info.get("workers", {}):
            name = self.scheduler_info["workers"][worker]["name"]
        lease = self._leases.get(lease_of(str(name)))
        return lease.get("group") if lease else None

    def hold(self, group: str, *, cpus: float | None = None, memory: str | int | None = None,
             gpus: int = 0, gpu_model: str | None = None, timeout: float | None = None) -> str:
        """Keep one worker in the named ``group`` (adaptive scaling leaves it alone) and
        return its address once it is connected."""
        spec = {"name": group, "cpus": cpus,
                "memory": parse_memory(memory) if memory is not None else None,
                "gpus": int(gpus), "gpu_model": gpu_model}
        return self.sync(self._hold, spec, timeout)

    async def _hold(self, spec: dict, timeout: float | None) -> str:
        address = await self._call("parallex_hold", group=spec, timeout=timeout)
        await self._refresh_state()
        return address

    def release(self, group: str) -> None:
        """Give back the workers of a named group."""
        return self.sync(self._release_group, group)

    async def _release_group(self, name: str) -> None:
        self._state = await self._call("parallex_release", name=name)

    def adapt(self, Adaptive: type[Adaptive] | None = None, **kwargs: Any) -> Adaptive:
        """Scale between ``minimum`` and ``maximum`` workers with Dask's adaptive policy."""
        adaptive = super().adapt(Adaptive=Adaptive or FederatedAdaptive, **kwargs)
        # The keeper leaves an adaptive cluster's idle workers to the adaptive policy.
        if self.asynchronous:
            self.loop.add_callback(self._refresh_quietly, adaptive=True)
        else:
            self.sync(self._refresh_state, adaptive=True)
        return adaptive

    @property
    def plan(self) -> set[str]:
        return self._live

    @property
    def requested(self) -> set[str]:
        return self._live

    async def _wait_for_workers(self, n_workers: int = 0, timeout: float | None = None) -> None:
        timeout = self.lease_start_timeout if timeout is None else float(timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        told: set[str] = set()
        while True:
            left = max(0.0, deadline - loop.time())
            try:
                # In slices, so what the workers wait for (an environment's build) is shown.
                self._state = await self._call(
                    "parallex_wait_for_workers", n=n_workers,
                    timeout=min(left, PROGRESS_INTERVAL), total=timeout)
                return
            except errors.LeaseStartTimeout:
                # A heartbeat, so the leases' words (a build's progress) are the broker's now.
                self._state = await self._call("parallex_refresh")
                lines = self._progress_lines()
                if any(line.startswith(BUILDING) and line not in told for line in lines):
                    # Each step of a build restarts the start timeout: a cold environment may
                    # take minutes, a build that stops moving still times out.
                    deadline = max(deadline, loop.time() + timeout)
                elif left <= PROGRESS_INTERVAL:
                    raise
            for line in lines:
                if line not in told:
                    told.add(line)
                    if not self.quiet:
                        print(f"Parallex: {line}", file=sys.stderr, flush=True)

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
            spec = {"cpus": float(cpus) if cpus is not None else self.worker_cpus,
                    "memory": parse_memory(memory) if memory is not None
                    else self.worker_memory, "gpus": int(gpus), "gpu_model": gpu_model}
            planned = await self._broker.request("POST", "/prices/quote",
                                                 json={"spec": spec, "workers": n})
        return Estimate.from_answers(now, planned)

    # ---- display ----------------------------------------------------------------------------

    def workers_by_lab(self) -> dict[str, int]:
        """Connected workers per providing lab."""
        self._fresh()
        return self._workers_by_lab()

    def _workers_by_lab(self) -> dict[str, int]:
        leases = self._leases
        connected = {w["lease"] for w in self._state["workers"]}
        return dict(Counter(leases[lid].get("lab") or "?" for lid in connected
                            if lid in leases))

    @property
    def environment(self) -> str | None:
        """The hash of the software environment new workers get (None: the agents' own)."""
        self._fresh()
        return self._state.get("environment")

    def refresh_environment(self) -> dict:
        """Give the workers this Python's packages again, after installing some (``pip
        install`` in the notebook): new workers get them, and the current workers are
        replaced (what they held in memory is lost; compute it again). The cluster does this
        by itself within a second of an install (``watch_packages``). Returns
        ``{"changed": bool, "replaced": workers replaced, "environment": its hash}``."""
        return self.sync(self._call, "parallex_environment")

    def progress(self) -> list[str]:
        """What starting workers wait for now, e.g. "building the environment on
        lab-x-server (37 of 112 packages)" (with how many leases, when several)."""
        self._fresh()
        return self._progress_lines()

    def pending(self) -> dict[str, int]:
        """Pending leases by the reason they wait (as the broker words it)."""
        self._fresh()
        return dict(pending_reasons(self._state["leases"]))

    def _pending(self) -> int:
        leases = self._leases
        return sum(1 for lid in self._live if leases.get(lid, {}).get("state") in
                   (LeaseState.pending, LeaseState.starting))

    def __repr__(self) -> str:
        return (f"FederatedCluster({self.cluster_id}, {self.scheduler_address!r}, "
                f"workers={sum(self._workers_by_lab().values())}, pending={self._pending()}, "
                f"labs={self._workers_by_lab()})")

    def _scaling_status(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(lab)}</td><td>{n}</td></tr>"
                       for lab, n in sorted(self._workers_by_lab().items()))
        news = "".join(f"<p>{html.escape(line)}</p>" for line in self._progress_lines())
        return (f"<table><tr><th>Lab</th><th>Workers</th></tr>{rows}"
                f"<tr><td>pending</td><td>{self._pending()}</td></tr></table>{news}")

    def _progress_lines(self) -> list[str]:
        return [line if n == 1 else f"{line} ({n} workers)"
                for line, n in sorted(starting_news(self._state["leases"]).items())]

    @property
    def dashboard_link(self) -> str:
        """The Dask dashboard's link. Dask's own (distributed.dashboard.link) unless this runs
        in a JupyterHub server whose site set no link through the server (no
        jupyter-server-proxy): the browser cannot reach the scheduler's port there, and the
        broker serves the dashboard instead (``broker_dashboard_link``)."""
        if (self.broker_dashboard_link and os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
                and dask.config.get("distributed.dashboard.link") == DASK_DEFAULT_LINK):
            return self.broker_dashboard_link
        return super().dashboard_link

    def _repr_html_(self, cluster_status=None) -> str:
        link = self.dashboard_link
        return (f"<div><strong>FederatedCluster</strong> {html.escape(str(self.cluster_id))}"
                f"<br>Scheduler: {html.escape(self.scheduler_address)}"
                f"<br>Dashboard: <a href='{link}' target='_blank'>{html.escape(link)}</a>"
                f"{self._scaling_status()}</div>")
