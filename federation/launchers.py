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

Optional hooks: ``account_for(lease, accounts)`` picks the account a lease's worker runs
under (default: a fresh one from ``accounts``), and ``keep_ready(accounts, free_cpus)`` /
``close(accounts)`` let a launcher keep resources ready between leases (the process
launcher's warm interpreters) and let them go when the agent stops; ``suspend(handle)`` /
``resume(handle)`` pause a worker for the machine's owner; ``exit_message(handle)`` says why a
worker died when its limits killed it; ``forget(lease_id)`` runs once the lease's worker is
gone for good.

A handle also carries ``uid`` (the account, for the agent's accounting of uids) and
``log_tail()`` (a few last lines for the user when the worker fails). A lease turns
``running``, and is metered, only when its worker has joined the cluster's scheduler and the
cluster says so; what a launcher reports is only whether the worker still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from .cgroups import LeaseLimits
from .limits import DEFAULT_LEASE_PIDS, LeaseLimitsBase, WatchdogLimits, lease_limits
from .worker_accounts import WorkerAccount, WorkerAccountError, WorkerAccounts
from .worker_process import (
    WorkerProcess,
    account_kwargs,
    prepare_lease_folder,
    start_worker,
    worker_command,
    worker_environment,
)

logger = logging.getLogger("parallex.agent")

#: Bytes of a warm interpreter's standard error the agent reads when it died before a lease.
WARM_ERRORS_SHOWN = 2048
#: Warm interpreters in a row that may exit before they are ready before the pool pauses.
WARM_EXITS_TO_PAUSE = 3
#: Seconds of the first such pause; each next one (without a ready interpreter between
#: them) lasts twice as long, up to WARM_PAUSE_MAX.
WARM_PAUSE_FIRST = 30.0
WARM_PAUSE_MAX = 600.0


class WorkerHandle(Protocol):
    """What the agent holds for a running worker."""

    lease_id: str
    uid: int | None

    def log_tail(self, lines: int = 8) -> str: ...


class WorkerLauncher:
    """Base class of the ways an agent runs workers; see the module docstring."""

    def start(self, lease: dict, account: WorkerAccount) -> Any:
        raise NotImplementedError

    def account_for(self, lease: dict, accounts: WorkerAccounts) -> WorkerAccount:
        """The account the lease's worker will run under."""
        return accounts.acquire(lease["id"])

    def keep_ready(self, accounts: WorkerAccounts, free_cpus: float) -> None:
        """Called often (every monitor tick) with the CPUs no lease holds; nothing by default."""

    def close(self, accounts: WorkerAccounts) -> None:
        """The agent stops: let go of whatever ``keep_ready`` holds."""

    def finish(self) -> None:
        """The agent has stopped every worker and is about to exit."""

    def ready_count(self) -> int:
        """How many workers could start at once from what ``keep_ready`` holds."""
        return 0

    def poll(self, handle: Any) -> int | None:
        raise NotImplementedError

    def suspend(self, handle: Any) -> None:
        """Stop the worker using the CPU at once (the owner needs it), keeping its state."""
        raise NotImplementedError

    def resume(self, handle: Any) -> None:
        """Undo ``suspend``."""
        raise NotImplementedError

    def exit_message(self, handle: Any) -> str | None:
        """Why the worker died, when the launcher's limits killed it; None otherwise."""
        return None

    def forget(self, lease_id: str) -> None:
        """The lease's worker is gone for good: let go of what the launcher kept for it."""

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


@dataclass
class WarmInterpreter:
    """A `python -m federation.warm_worker` waiting for a lease (see that module)."""

    holder: str  # the key its account is held under until a lease takes it
    popen: subprocess.Popen
    create_time: float
    ready: bool = False
    #: The interpreter: the agent's, or a cluster's environment's (federation.environment_cache).
    python: str = sys.executable
    #: Where its standard error goes until it takes a lease (in the agent's folder): why it
    #: died before that, should it (the agent logs the file's last lines).
    errors: Path | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def last_words(self) -> str:
        """The last lines it wrote on standard error before it took a lease ("" if none)."""
        if self.errors is None:
            return ""
        try:
            with open(self.errors, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - WARM_ERRORS_SHOWN))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-4:])

    def forget_errors(self) -> None:
        """Remove its standard-error file (it took a lease, writing to the lease's log from
        then on, or it is gone)."""
        if self.errors is not None:
            with contextlib.suppress(OSError):
                self.errors.unlink()

    def check_ready(self) -> bool:
        """True once the interpreter has imported Dask (it says "warm" on its pipe)."""
        if not self.ready and self.popen.stdout is not None:
            with contextlib.suppress(BlockingIOError, OSError, ValueError):
                self.ready = b"warm" in (self.popen.stdout.read(16) or b"")
        return self.ready

    def retire(self) -> None:
        """Close its input (it exits) and, should it not, kill its process group."""
        self.forget_errors()
        with contextlib.suppress(OSError):
            self.popen.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(2)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


class ProcessLauncher(WorkerLauncher):
    """Each worker a `dask worker` process in its own process group, in the lease's folder
    under ``workdir/leases``, without a nanny (the agent is the nanny).

    ``warm`` interpreters (at most; never more than the free CPUs) are kept started with Dask
    imported, each under the account its lease will use; a CPU lease then starts by handing
    one its arguments instead of starting Python (GPU leases start cold: dask-cuda's worker
    is another program). 0 turns the pool off.

    ``limits`` holds each worker to its lease's size (a cgroup, else rlimits and a watchdog;
    federation.limits); ``lease_pids`` is the most processes plus threads a lease may run."""

    def __init__(self, workdir: Path, host: str | None = None, warm: int = 0,
                 death_timeout: float = 60, limits: LeaseLimitsBase | None = None,
                 lease_pids: int = DEFAULT_LEASE_PIDS):
        self.limits = limits or WatchdogLimits()
        self.lease_pids = lease_pids
        self.workdir = Path(workdir)
        self.host = host
        self.warm = max(0, int(warm))
        self.death_timeout = death_timeout
        self._pool: list[WarmInterpreter] = []
        self._claimed: dict[str, WarmInterpreter] = {}
        self._serial = 0
        #: Warm interpreters in a row that exited before they were ready.
        self._early_exits = 0
        #: Until when (monotonic) no warm interpreter is started, after WARM_EXITS_TO_PAUSE
        #: early exits in a row, and how long the next pause lasts.
        self._paused_until = 0.0
        self._pause = WARM_PAUSE_FIRST
        #: The interpreter the last lease started with: the pool keeps that one warm.
        self._demand = sys.executable

    # ---- the warm pool ------------------------------------------------------------------

    def keep_ready(self, accounts: WorkerAccounts, free_cpus: float) -> None:
        for interp in [i for i in self._pool if not i.alive()]:
            self._pool.remove(interp)
            accounts.release(interp.holder)
            self._lost(interp)
        if time.monotonic() < self._paused_until:
            return
        target = min(self.warm, max(0, int(free_cpus)))
        stale = [i for i in self._pool if i.python != self._demand]
        if stale and len(self._pool) >= target:
            # Leases now come in another environment: one interpreter a tick moves over.
            self._pool.remove(stale[0])
            stale[0].retire()
            accounts.release(stale[0].holder)
        while len(self._pool) > target:
            interp = self._pool.pop()
            interp.retire()
            accounts.release(interp.holder)
        while len(self._pool) < target:
            try:
                self._pool.append(self._start_warm(accounts, self._demand))
            except (OSError, WorkerAccountError) as exc:
                logger.warning("cannot start a warm interpreter (%s); leases start cold", exc)
                return
        for interp in self._pool:
            if interp.check_ready():
                self._early_exits = 0
                self._pause = WARM_PAUSE_FIRST

    def _lost(self, interp: WarmInterpreter) -> None:
        """A warm interpreter exited without a lease: say why, and stop starting them for a
        while when they keep failing (an interpreter that cannot import Dask would otherwise
        be started again every second, and every one would fail)."""
        said = interp.last_words() or "nothing on its standard error"
        interp.forget_errors()
        if interp.check_ready():
            logger.warning("warm interpreter pid %d exited with code %s (it said: %s); "
                           "replacing it", interp.popen.pid, interp.popen.returncode, said)
            return
        self._early_exits += 1
        logger.warning("warm interpreter pid %d (%s) exited with code %s before it was ready "
                       "(it said: %s)", interp.popen.pid, interp.python,
                       interp.popen.returncode, said)
        if self._early_exits >= WARM_EXITS_TO_PAUSE:
            logger.warning("%d warm interpreters in a row exited before they were ready; "
                           "leases start cold, and the pool tries again in %.0f s. Check that "
                           "%s can import distributed", self._early_exits, self._pause,
                           interp.python)
            self._paused_until = time.monotonic() + self._pause
            self._pause = min(WARM_PAUSE_MAX, 2 * self._pause)
            self._early_exits = 0

    def _start_warm(self, accounts: WorkerAccounts, python: str) -> WarmInterpreter:
        self._serial += 1
        holder = f"~warm-{self._serial}"  # never a lease id (those start with a letter)
        account = accounts.acquire(holder)
        # Its standard error until it takes a lease, in the agent's own folder: the agent
        # opens it and the interpreter only inherits the descriptor, so an isolated account
        # needs no access to the folder.
        errors = self.workdir / "warm" / f"{self._serial}.err"
        try:
            errors.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            err_fd = os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                             0o600)
        except OSError:
            accounts.release(holder)
            raise
        try:
            env = worker_environment([], Path("/"))
            env["TMPDIR"] = "/tmp"  # noqa: S108 - the lease's own folder replaces it
            popen = subprocess.Popen(
                [*self.limits.spawn_prefix(account.isolated, self.lease_pids),
                 python, "-m", "federation.warm_worker"], cwd="/", env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_fd,
                start_new_session=True, close_fds=True, **account_kwargs(account))
        except OSError:
            accounts.release(holder)
            with contextlib.suppress(OSError):
                errors.unlink()
            raise
        finally:
            os.close(err_fd)
        os.set_blocking(popen.stdout.fileno(), False)
        return WarmInterpreter(holder, popen, psutil.Process(popen.pid).create_time(),
                               python=python, errors=errors)

    def ready_count(self) -> int:
        return sum(1 for i in self._pool if i.ready and i.alive())

    def account_for(self, lease: dict, accounts: WorkerAccounts) -> WorkerAccount:
        python = lease.get("python") or sys.executable
        if python != self._demand:
            # Another interpreter: whatever made the last one fail may not concern it.
            self._early_exits, self._paused_until, self._pause = 0, 0.0, WARM_PAUSE_FIRST
        self._demand = python
        if int(lease.get("gpus") or 0) == 0:
            live = [i for i in self._pool if i.alive() and i.python == python]
            if live:
                # A ready one first; one still importing is still ahead of a cold start.
                interp = next((i for i in live if i.check_ready()), live[0])
                self._pool.remove(interp)
                self._claimed[lease["id"]] = interp
                return accounts.hand_over(interp.holder, lease["id"])
        try:
            return accounts.acquire(lease["id"])
        except WorkerAccountError:
            if not self._pool:
                raise
            # Waiting interpreters hold the last free uids: a lease comes first.
            interp = self._pool.pop()
            interp.retire()
            accounts.release(interp.holder)
            return accounts.acquire(lease["id"])

    def close(self, accounts: WorkerAccounts) -> None:
        for interp in self._pool:
            interp.retire()
            accounts.release(interp.holder)
        self._pool.clear()

    def finish(self) -> None:
        self.limits.close()

    # ---- workers --------------------------------------------------------------------------

    def start(self, lease: dict, account: WorkerAccount) -> WorkerProcess:
        interp = self._claimed.pop(lease["id"], None)
        limits = lease_limits(lease, self.lease_pids)
        if interp is None or not interp.alive():
            worker = start_worker(lease, self.workdir, host=self.host, account=account,
                                  death_timeout=self.death_timeout,
                                  prefix=self.limits.spawn_prefix(account.isolated,
                                                                  self.lease_pids))
            try:
                self.limits.confine(lease["id"], worker.pid, limits)
            except BaseException:
                worker.signal_group(signal.SIGKILL)
                worker.popen.wait()
                raise
            return worker
        try:
            # Confined before it takes the lease: everything the lease runs is held to its size.
            self.limits.confine(lease["id"], interp.popen.pid, limits)
            folder = prepare_lease_folder(lease, self.workdir, account)
            cmd = worker_command(lease, folder, self.host, self.death_timeout)
            env = worker_environment(lease.get("gpu_indices") or [], folder, lease["id"])
            order = {"cwd": str(folder / "scratch"), "log": str(folder / "worker.log"),
                     "env": {k: env[k] for k in ("HOME", "TMPDIR", "CUDA_VISIBLE_DEVICES",
                                                 "WORKER_LEASE_ID", "PYTHONPATH") if k in env},
                     "args": cmd[3:]}  # after "python -m distributed.cli.dask_worker"
            interp.popen.stdin.write(json.dumps(order).encode() + b"\n")
            interp.popen.stdin.close()
            interp.popen.stdout.close()  # it wrote "warm" there; its output goes to the log now
            interp.forget_errors()  # and its errors too (warm_worker._take_order)
        except BaseException:
            interp.retire()  # it never took the lease: no waiting interpreter is left behind
            raise
        logger.info("lease %s: worker started in warm interpreter pid %d%s", lease["id"],
                    interp.popen.pid, f" as uid {account.uid}" if account.isolated else "")
        return WorkerProcess(lease["id"], interp.popen.pid, interp.create_time, folder,
                             interp.popen, uid=account.uid)

    def poll(self, handle: WorkerProcess) -> int | None:
        self.limits.check(handle.lease_id)
        return handle.exit_code()

    def suspend(self, handle: WorkerProcess) -> None:
        self.limits.suspend(handle.lease_id)

    def resume(self, handle: WorkerProcess) -> None:
        self.limits.resume(handle.lease_id)

    def exit_message(self, handle: WorkerProcess) -> str | None:
        return self.limits.exit_message(handle.lease_id)

    def forget(self, lease_id: str) -> None:
        self.limits.release(lease_id)

    async def stop(self, handle: WorkerProcess, timeout: float) -> None:
        self.limits.resume(handle.lease_id)  # a suspended worker must run to leave cleanly
        handle.signal_group(signal.SIGTERM)  # a dask worker closes cleanly on SIGTERM
        if await self.wait(handle, timeout) is None:
            logger.warning("lease %s: worker did not stop in %g s; killing it",
                           handle.lease_id, timeout)
            handle.signal_group(signal.SIGKILL)
            await self.wait(handle, float("inf"))

    def adopt(self, lease_id: str, state: dict) -> WorkerProcess | None:
        worker = WorkerProcess.adopt(lease_id, state)
        if worker is not None and state.get("memory"):
            self.limits.adopt(lease_id, worker.pid, LeaseLimits(
                float(state.get("cpus") or 1), int(state["memory"]), self.lease_pids))
        return worker

    def save(self, handle: WorkerProcess) -> dict:
        found = self.limits.confined.get(handle.lease_id)
        size = {"cpus": found.limits.cpus, "memory": found.limits.memory} if found else {}
        return {**handle.to_state(), **size}
