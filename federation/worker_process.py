"""One lease's Dask worker as an operating-system process, owned by the provider agent.

The agent's token never reaches the worker: the environment is scrubbed, the command line holds
only the lease's TLS file paths, and those files sit in a per-lease folder that only the lease's
own account can open (mode 0700) and that is deleted when the lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from .environment_cache import install_private
from .ids import check_lease_id, path_inside
from .worker_accounts import SHARED, WorkerAccount

logger = logging.getLogger("parallex.agent")

SECRET_ENV_PREFIXES = ("PARALLEX_",)


@dataclass
class WorkerProcess:
    """A running (or adopted) worker process of one lease."""

    lease_id: str
    pid: int
    create_time: float
    folder: Path
    popen: subprocess.Popen | None = None
    uid: int | None = None

    def exit_code(self) -> int | None:
        """None while running; the exit code (or -1 when unknown) once it has gone."""
        if self.popen is not None:
            return self.popen.poll()
        return None if _still_running(self.pid, self.create_time) else -1

    async def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to exit; its exit code, or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (code := self.exit_code()) is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return code

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = (self.folder / "worker.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def to_state(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time, "folder": str(self.folder),
                "uid": self.uid}

    @classmethod
    def adopt(cls, lease_id: str, state: dict) -> WorkerProcess | None:
        """The worker from a previous agent run, if that very process still runs."""
        try:
            check_lease_id(lease_id)
            pid, create_time = int(state["pid"]), float(state["create_time"])
            folder = Path(state["folder"])
            uid = None if state.get("uid") is None else int(state["uid"])
        except (KeyError, TypeError, ValueError):
            return None
        if not _still_running(pid, create_time):
            return None
        return cls(lease_id, pid, create_time, folder, uid=uid)


def _still_running(pid: int, create_time: float) -> bool:
    """True when ``pid`` is still the process started at ``create_time`` and not a zombie
    (a recycled pid belongs to someone else)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_environment(gpu_indices: list[int], folder: Path,
                       lease_id: str = "") -> dict[str, str]:
    """The worker's environment: the agent's minus every Parallex secret, GPUs pinned, home
    and temporary files in the lease's own folder, the lease's id (not a secret: the
    gateway listener parks connections under it) and, first on its Python path, the user's
    own packages installed in its folder (federation.environment_cache)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SECRET_ENV_PREFIXES) and "TOKEN" not in k.upper()}
    env["HOME"] = str(folder)
    env["TMPDIR"] = str(folder / "scratch")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_indices)
    env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    env["WORKER_LEASE_ID"] = lease_id
    if (folder / "packages").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(folder / "packages"), env.get("PYTHONPATH")) if p)
    return env


def worker_command(lease: dict, folder: Path, host: str | None,
                   death_timeout: float) -> list[str]:
    """The command line of a lease's worker: `dask worker`, or `dask cuda worker` for GPUs."""
    gpus = int(lease.get("gpus") or 0)
    # The interpreter of the cluster's software environment (federation.environment_cache);
    # the agent's own when nothing had to be built.
    python = lease.get("python") or sys.executable
    use_cuda = gpus > 0 and importlib.util.find_spec("dask_cuda") is not None
    if use_cuda:
        # GPU machines only: dask-cuda starts one worker process per visible GPU and names them
        # <lease>-<i> when there are several; the scheduler guard accepts those names.
        cmd = [python, "-m", "dask", "cuda", "worker", lease["scheduler_address"],
               "--resources", f"GPU={1 if gpus > 1 else gpus}"]
    else:
        cmd = [python, "-m", "distributed.cli.dask_worker", lease["scheduler_address"],
               "--no-nanny"]
        if gpus:
            cmd += ["--resources", f"GPU={gpus}"]
    cmd += [
        "--name", lease["id"],
        "--nthreads", str(max(1, int(round(float(lease["cpus"]))))),
        "--memory-limit", str(int(lease["memory"])),
        "--tls-ca-file", str(folder / "ca.pem"),
        "--tls-cert", str(folder / "cert.pem"),
        "--tls-key", str(folder / "key.pem"),
        "--local-directory", str(folder / "scratch"),
        "--death-timeout", str(int(death_timeout)),
        "--no-dashboard",
        # --no-dashboard still leaves the worker's HTTP server (health, metrics) listening on
        # every interface; nothing of Parallex reads it, and a lab's firewall should see no
        # listener, so it stays on the machine's loopback.
        "--dashboard-address", "127.0.0.1:0",
    ]
    if lease["scheduler_address"].startswith("parallex://"):
        # Through the federation gateway both ways: the worker dials its scheduler there and
        # is dialled there (connections parked at the gateway), accepting nothing inbound.
        # The lease id reaches the listener through WORKER_LEASE_ID (worker_environment).
        gateway = lease["scheduler_address"].removeprefix("parallex://").partition("/")[0]
        cmd += ["--listen-address", f"parallex://{gateway}",
                "--contact-address", f"parallex://{gateway}/{lease['id']}"]
    elif host:
        cmd += ["--host", host]
    return cmd


def lease_folder(workdir: Path, lease_id: str) -> Path:
    """The lease's folder under ``workdir/leases``; a malformed id or one that would lead
    elsewhere raises UnsafeIdentifier (a ValueError) before anything is touched."""
    return path_inside(workdir / "leases", check_lease_id(lease_id))


def remove_lease_folder(workdir: Path, lease_id: str) -> None:
    """Delete the lease's folder with its key, scratch space and log."""
    folder = lease_folder(workdir, lease_id)
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # fd-based: never follows symlinks


def prepare_lease_folder(lease: dict, workdir: Path, account: WorkerAccount) -> Path:
    """Write the lease's credentials into a fresh folder only the lease's account can open,
    with an empty log file; returns the folder."""
    folder = lease_folder(workdir, lease["id"])
    folder.parent.mkdir(mode=0o711, exist_ok=True)
    remove_lease_folder(workdir, lease["id"])
    folder.mkdir(mode=0o700)
    (folder / "scratch").mkdir(mode=0o700)
    for name, text in (("ca.pem", lease["ca_cert"]), ("cert.pem", lease["cert"]),
                       ("key.pem", lease["key"]), ("worker.log", "")):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    if lease.get("private_wheels"):
        # The user's own code: in this lease's folder only, never in a shared environment.
        install_private(lease.get("python") or sys.executable, list(lease["private_wheels"]),
                        folder / "packages")
    if account.isolated:
        for root, dirs, files in os.walk(folder):
            os.chown(root, account.uid, account.gid, follow_symlinks=False)
            for name in dirs + files:
                os.chown(os.path.join(root, name), account.uid, account.gid,
                         follow_symlinks=False)
    return folder


def account_kwargs(account: WorkerAccount) -> dict:
    """subprocess.Popen's arguments that run a process under ``account``."""
    if not account.isolated:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def start_worker(lease: dict, workdir: Path, *, host: str | None = None,
                 account: WorkerAccount = SHARED, death_timeout: float = 60,
                 prefix: list[str] | None = None) -> WorkerProcess:
    """Start the lease's worker as a new process under the lease's account, in its own
    process group (a cold start: the interpreter starts and imports Dask now); ``prefix``
    goes before the command (e.g. prlimit)."""
    folder = prepare_lease_folder(lease, workdir, account)
    log_fd = os.open(folder / "worker.log", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        popen = subprocess.Popen(
            [*(prefix or []), *worker_command(lease, folder, host, death_timeout)],
            cwd=folder / "scratch",
            env=worker_environment(lease.get("gpu_indices") or [], folder, lease["id"]),
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, **account_kwargs(account),
        )
    finally:
        os.close(log_fd)
    create_time = psutil.Process(popen.pid).create_time()
    logger.info("lease %s: started worker pid %d%s", lease["id"], popen.pid,
                f" as uid {account.uid}" if account.isolated else "")
    return WorkerProcess(lease["id"], popen.pid, create_time, folder, popen, uid=account.uid)
