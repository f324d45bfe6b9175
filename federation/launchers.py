"""How a provider agent runs a lease's worker: the WorkerLauncher seam.

The agent decides *which* leases run (it follows the broker); a launcher decides *how* a
worker runs: a plain process (ProcessLauncher, today's), and later a cgroup, a container or a
batch job. Like JupyterHub's Spawner, a subclass writes five methods:

``start(lease, account) -> handle``
    Start the worker of ``lease`` (a dict from the broker: id, scheduler address, size, GPU
    indices; its key, certificate and CA are already in the lease's folder) under
    ``account`` (a uid of its own, or the agent's). Return a handle the other methods take.
    Raise OSError/ValueError when it cannot start; the agent reports the lease failed.
``poll(handle) -> int | None``
    None while the worker runs; its exit code once it has gone (-1 when unknown). 0 means it
    left its scheduler cleanly (not the provider's fault).
``stop(handle, timeout)``
    Stop the worker: politely first (a Dask worker closes cleanly on SIGTERM), for sure after
    ``timeout`` seconds. Returns once it has gone.
``adopt(lease_id, state) -> handle | None``
    After an agent restart: the handle of a worker still running from ``state`` (what
    ``save(handle)`` returned before), or None when that very worker is gone.
``save(handle) -> dict``
    What ``adopt`` needs, as JSON (the agent keeps it in workers.json, mode 0600).

A handle also carries ``uid`` (the account, for the agent's accounting of uids) and
``log_tail()`` (a few last lines for the user when the worker fails). A lease turns
``running``, and is metered, only when its worker has joined the cluster's scheduler and the
cluster says so; what a launcher reports is only whether the worker still runs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any, Protocol

from .worker_accounts import WorkerAccount
from .worker_process import WorkerProcess, start_worker

logger = logging.getLogger("parallex.agent")


class WorkerHandle(Protocol):
    """What the agent holds for a running worker."""

    lease_id: str
    uid: int | None

    def log_tail(self, lines: int = 8) -> str: ...


class WorkerLauncher:
    """Base class of the ways an agent runs workers; see the module docstring."""

    def start(self, lease: dict, account: WorkerAccount) -> Any:
        raise NotImplementedError

    def poll(self, handle: Any) -> int | None:
        raise NotImplementedError

    async def stop(self, handle: Any, timeout: float) -> None:
        raise NotImplementedError

    def adopt(self, lease_id: str, state: dict) -> Any | None:
        raise NotImplementedError

    def save(self, handle: Any) -> dict:
        raise NotImplementedError

    async def wait(self, handle: Any, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the worker to leave by itself; its exit code, or
        None if it still runs (polls; a launcher with a better signal overrides this)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (code := self.poll(handle)) is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return code


class ProcessLauncher(WorkerLauncher):
    """Each worker a `dask worker` process in its own process group, in the lease's folder
    under ``workdir/leases``, without a nanny (the agent is the nanny)."""

    def __init__(self, workdir: Path, host: str | None = None):
        self.workdir = Path(workdir)
        self.host = host

    def start(self, lease: dict, account: WorkerAccount) -> WorkerProcess:
        return start_worker(lease, self.workdir, host=self.host, account=account)

    def poll(self, handle: WorkerProcess) -> int | None:
        return handle.exit_code()

    async def stop(self, handle: WorkerProcess, timeout: float) -> None:
        handle.signal_group(signal.SIGTERM)  # a dask worker closes cleanly on SIGTERM
        if await self.wait(handle, timeout) is None:
            logger.warning("lease %s: worker did not stop in %g s; killing it",
                           handle.lease_id, timeout)
            handle.signal_group(signal.SIGKILL)
            await self.wait(handle, float("inf"))

    def adopt(self, lease_id: str, state: dict) -> WorkerProcess | None:
        return WorkerProcess.adopt(lease_id, state)

    def save(self, handle: WorkerProcess) -> dict:
        return handle.to_state()
