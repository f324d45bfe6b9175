"""The kernel's connection to the pool: a FederatedCluster prepared in the background.

The kernel answers at once; the cluster is made on a background thread, scales adaptively from
0 to the user's quota (an idle notebook holds no workers and costs nothing) and its client
becomes dask's default. Anything that stops it — no broker configured, broker unreachable,
token refused, lab over its credit limit — is kept as a message, and dask keeps running
locally in the kernel.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from decimal import Decimal
from typing import Any

from federation import errors
from federation.environment import site_fingerprint

from .logs import send_logging_to_file

logger = logging.getLogger("parallex.kernel")

DEFAULT_MAX_WORKERS = 8


def kernel_token() -> str | None:
    """PARALLEX_TOKEN, else the notebook server's JupyterHub token (the hub gives it the
    broker's scope)."""
    return os.environ.get("PARALLEX_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN")


class Pool:
    """State of the kernel's pool connection: starting, ready, local (with a reason) or stopped."""

    def __init__(self, broker_url: str | None = None, token: str | None = None,
                 max_workers: int | None = None):
        # dask (and so federation.config) is imported on the background thread, not here.
        self.broker_url = broker_url or os.environ.get("PARALLEX_BROKER_URL")
        self.token = token or kernel_token()
        self.max_workers_setting = max_workers
        self.state = "starting"
        self.problem: str | None = None
        self.cluster: Any = None  # a FederatedCluster once ready
        self.client: Any = None
        self.me: dict = {}
        self.adapt_range: tuple[int, int] = (0, 0)
        self.ready = threading.Event()
        self.log_file = None  # where Dask's and Parallex's logging goes once connected
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._routed = False
        self._explained = False
        #: The package folders as they were when the cluster described its environment.
        self.packages_seen: tuple = ()

    # ---- start and stop -----------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; returns at once, and does nothing when already started.
        Dask work submitted before the connection is ready waits for it (_get_when_ready)."""
        with self._start_lock:
            if self._thread is not None:
                return
            self.route_dask_here()
            self._start_thread()

    def route_dask_here(self) -> None:
        """Make dask's default scheduler wait for the pool (the Client takes over once made)."""
        if not self._routed:
            import dask

            dask.config.set(scheduler=self._get_when_ready)
            self._routed = True

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._connect, name="parallex-pool", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            self._connect_or_raise()
        except errors.ParallexError as exc:
            self._go_local(str(exc))
        except Exception as exc:  # a kernel must survive whatever the pool does
            logger.exception("could not prepare the Parallex cluster")
            self._go_local(f"{exc.__class__.__name__}: {exc}")
        finally:
            self.ready.set()

    def _connect_or_raise(self) -> None:
        from federation import config as parallex_config

        self.broker_url = parallex_config.broker_url(self.broker_url)
        if not self.broker_url:
            raise errors.ParallexError("PARALLEX_BROKER_URL is not set, so this kernel is not "
                                       "connected to a Parallex federation")
        if not self.token:
            raise errors.TokenRefused("no token: set PARALLEX_TOKEN (JupyterHub servers get "
                                      "JUPYTERHUB_API_TOKEN automatically)")
        # Imported here, on the background thread: distributed takes a third of a second.
        from distributed import Client

        self.log_file = send_logging_to_file()

        from federation.client import BrokerClient
        from federation.cluster import FederatedCluster

        broker = BrokerClient(self.broker_url, self.token)
        try:
            self.me = broker.request("GET", "/whoami")
            if self.me.get("lab"):
                books = broker.request("GET", f"/labs/{self.me['lab']}/balance")
                balance, limit = Decimal(books["balance"]), Decimal(books["credit_limit"])
                if balance < -limit:
                    raise errors.CreditLimitExceeded(
                        f"lab {self.me['lab']} is over its credit limit (balance "
                        f"{balance:,.2f} PCU, limit {limit:,.2f} PCU), so no new workers can "
                        "start; ask your PI")
        finally:
            broker.close()
        # The scheduler runs in a process of its own (a cell holding the GIL cannot stall
        # it); its log joins this kernel's, which %parallex log shows.
        self.packages_seen = site_fingerprint()
        cluster = FederatedCluster(self.broker_url, self.token, quiet=True,
                                   name=f"kernel-{os.getpid()}", scheduler_log=self.log_file)
        try:
            maximum = self._max_workers(cluster)
            cluster.adapt(minimum=0, maximum=maximum)
            client = Client(cluster, set_as_default=True)
        except BaseException:
            cluster.close()
            raise
        # This kernel checks before each cell (sync_packages) and tells the user there.
        cluster.watch_packages = False
        self.cluster, self.client = cluster, client
        self.adapt_range = (0, maximum)
        self.state = "ready"

    def _max_workers(self, cluster) -> int:
        import dask

        if self.max_workers_setting:
            return self.max_workers_setting
        configured = int(dask.config.get("parallex.kernel.max-workers", DEFAULT_MAX_WORKERS))
        quota = self.me.get("max_cpus")
        if quota is None:
            return configured
        return max(0, math.floor(float(quota) / cluster.worker_cpus))

    def _get_when_ready(self, dsk, keys, **kwargs):
        """Dask's scheduler until the pool is ready: wait for it, then run there (or, if it
        could not be had, in local threads). The Client replaces it once connected."""
        self.start()
        if not self.ready.is_set():
            print("Parallex: waiting for the pool connection…", file=sys.stderr, flush=True)
        import dask
        from dask.threaded import get as threaded_get

        self.ready.wait(float(dask.config.get("parallex.kernel.connect-timeout", 120)))
        if self.client is not None:
            return self.client.get(dsk, keys, **kwargs)
        self.explain_once()
        return threaded_get(dsk, keys, **kwargs)

    def explain_once(self) -> None:
        """Tell (on stderr, once) why dask runs in this kernel instead of on the pool."""
        if self.ready.is_set() and self.problem and not self._explained:
            self._explained = True
            print(f"Parallex: {self.problem}. Dask runs in this kernel.", file=sys.stderr,
                  flush=True)

    def _go_local(self, reason: str) -> None:
        import dask

        self.state = "local"
        self.problem = reason
        # Dask's own default (threads in this process) keeps plain dask code working.
        dask.config.set(scheduler="threads")

    def stop(self) -> None:
        """Close the client and the cluster (all leases end); dask runs locally after this."""
        if self._thread is None:
            self.ready.set()
            self.state, self.problem = "stopped", "the pool was stopped before it was used"
            return
        self.ready.wait(120)
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None
        if self.state == "ready":
            self.state = "stopped"
            self.problem = "the pool was stopped with %parallex stop"
            import dask

            dask.config.set(scheduler="threads")

    def sync_packages(self) -> str | None:
        """When the user's packages changed since the cluster described them, give the
        workers the new ones; returns what to tell the user, or None."""
        if self.state != "ready" or self.cluster is None:
            return None
        seen = site_fingerprint()
        if seen == self.packages_seen:
            return None
        self.packages_seen = seen
        try:
            result = self.cluster.refresh_environment()
        except errors.ParallexError as exc:
            return f"Parallex: the workers could not get your new packages: {exc}"
        if not result["changed"]:
            return None
        replaced = result["replaced"]
        return ("Parallex: your packages changed; the pool's workers get them now"
                + (f" ({replaced} worker{'s' if replaced != 1 else ''} replaced: what they "
                   "held in memory is computed again when needed)" if replaced else ""))

    # ---- what the magics show -----------------------------------------------------------

    def status(self) -> dict:
        """Workers by lab, CPUs and GPUs held, cost so far and the lab's balance."""
        out: dict[str, Any] = {"state": self.state, "problem": self.problem,
                               "user": self.me.get("user"), "lab": self.me.get("lab")}
        if self.cluster is None:
            return out
        from federation.lease_keeper import pending_reasons
        from federation.lease_states import LeaseState

        leases = self.cluster.leases
        held = [le for le in leases if le["state"] in (LeaseState.starting, LeaseState.running)]
        out.update(workers_by_lab=self.cluster.workers_by_lab(),
                   cpus=sum(le["cpus"] for le in held), gpus=sum(le["gpus"] for le in held),
                   pending=sum(1 for le in leases if le["state"] == LeaseState.pending),
                   waiting=dict(pending_reasons(leases)),
                   starting=self.cluster.progress(),
                   adapt=self.adapt_range,
                   scale_error=str(self.cluster.scale_error) if self.cluster.scale_error
                   else None,
                   dashboard=self.cluster.dashboard_link)
        if self.cluster.connected_workers():
            from federation.latency import describe

            try:
                out["round_trips"] = describe(self.cluster.round_trips())
            except errors.ParallexError as exc:
                out["round_trips"] = f"round trip to workers not measured: {exc}"
        try:
            from federation.client import BrokerClient

            cost = self.cluster.cost_details()
            out.update(cost_pcu=cost["pcu"], pcu_per_hour=cost["pcu_per_hour"])
            broker = BrokerClient(self.broker_url, self.token)
            try:
                out["balance"] = broker.request("GET", f"/labs/{self.me['lab']}/balance")[
                    "balance"]
            finally:
                broker.close()
        except errors.ParallexError as exc:
            out["books_error"] = str(exc)
        return out
