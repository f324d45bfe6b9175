"""ParallexKernel: an IPython kernel whose dask work runs on the federation's pooled machines."""

from __future__ import annotations

import contextlib
import sys
import threading

from ipykernel.ipkernel import IPythonKernel

from .magics import ParallexMagics
from .pool import Pool

START_DELAY = 1.0  # seconds after start at the latest before the pool starts connecting


class ParallexKernel(IPythonKernel):
    """IPython plus a FederatedCluster prepared in the background (see pool.Pool)."""

    implementation = "parallex"
    implementation_version = "0.1"
    banner = ("Parallex kernel: dask runs on your federation's pooled machines "
              "(%parallex shows the pool, %parallex help the commands).")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pool = Pool()
        self.shell.register_magics(ParallexMagics(self.shell, self.pool))
        self.shell.user_ns["parallex_pool"] = self.pool
        self.shell.events.register("pre_run_cell", self._tell_pool_news)
        self.shell.events.register("pre_run_cell", self._sync_packages)
        self._told: set[str] = set()
        # The pool starts connecting in the background START_DELAY seconds after the kernel
        # starts, so importing distributed and building the scheduler do not compete with the
        # kernel's first answers (starting it right after the first execute cost 0.15 s of
        # that answer). Dask work asked for earlier starts it at once and waits for it: dask
        # is routed to the pool before any cell that uses it.
        self.shell.events.register("pre_run_cell", self._route_dask)
        timer = threading.Timer(START_DELAY, self.pool.start)
        timer.daemon = True
        timer.start()

    def _route_dask(self, info=None) -> None:
        if "dask" in sys.modules or "dask" in (getattr(info, "raw_cell", "") or ""):
            self.pool.route_dask_here()

    def _sync_packages(self, info=None) -> None:
        """After a `%pip install`, the pool's workers get the new packages too."""
        try:
            news = self.pool.sync_packages()
        except Exception:  # a cell must run whatever the pool does
            self.log.exception("could not give the workers the new packages")
            return
        if news:
            print(news, file=sys.stderr)

    def _tell_pool_news(self, info=None) -> None:
        """Say once, before a cell runs, why dask runs locally or why scaling was refused."""
        if self.pool.state == "local":
            self.pool.explain_once()
        news = []
        cluster = self.pool.cluster
        if cluster is not None and cluster.scale_error is not None:
            news.append(f"Parallex: no new workers — {cluster.scale_error}")
        if cluster is not None:
            with contextlib.suppress(Exception):  # news must never stop a cell from running
                news += [f"Parallex: {line}" for line in cluster.worker_news()]
                news += [f"Parallex: {line}" for line in cluster.progress()]
        for line in news:
            if line not in self._told:
                self._told.add(line)
                print(line, file=sys.stderr)

    def do_shutdown(self, restart):
        # Leases end with the kernel; the broker would end them after the cluster timeout
        # anyway, but an orderly close frees them at once.
        try:
            self.pool.stop()
        except Exception:  # shutting down must not fail because the broker did
            self.log.exception("closing the Parallex cluster failed")
        return super().do_shutdown(restart)
