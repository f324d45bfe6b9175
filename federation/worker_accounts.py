"""One operating-system account per lease: a pool of uids the agent runs workers under.

Two leases on one machine belong to different users, who trust neither each other nor the
machine's owner. Under distinct uids the kernel keeps them apart: one lease's task cannot read
another's memory (/proc/<pid>/mem, environ), folder or key, cannot signal its worker, and cannot
read the agent's token or memory. A uid is handed out again only after every process it ran has
been killed and every file it left in the shared temporary folders removed; a uid that runs
processes this agent did not start is never used (nor are those processes touched).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger("parallex.agent")

#: Lowest uid the pool accepts: below it live system and login accounts.
MIN_WORKER_UID = 1000
#: Shared folders where a worker could leave files for the next lease under its uid.
SHARED_TEMP_DIRS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))


class WorkerAccountError(RuntimeError):
    """The worker accounts cannot be used; the message says what to change."""


@dataclass(frozen=True)
class WorkerAccount:
    """The uid and gid one lease's worker runs under; None for the agent's own account."""

    uid: int | None
    gid: int | None

    @property
    def isolated(self) -> bool:
        return self.uid is not None


SHARED = WorkerAccount(None, None)


def parse_uid_range(text: str) -> range:
    """'20000-20063' → range(20000, 20064); refuses system uids, root and empty ranges."""
    try:
        low_text, _, high_text = text.partition("-")
        low, high = int(low_text), int(high_text or low_text)
    except ValueError as exc:
        raise WorkerAccountError(f"--worker-uids {text!r} is not a range such as "
                                 "20000-20063") from exc
    if low < MIN_WORKER_UID or high < low or high >= 2**31 - 1:
        raise WorkerAccountError(
            f"--worker-uids {text!r}: give a range of unused uids from {MIN_WORKER_UID} up, "
            "low-high, e.g. 20000-20063 (one uid per lease that may run at once)")
    return range(low, high + 1)


def uids_running() -> set[int]:
    """The real and effective uids of every live process (one scan of the process table)."""
    found: set[int] = set()
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids is not None:
            found.update((uids.real, uids.effective))
    return found


def processes_of(uid: int) -> list[psutil.Process]:
    """Every live process whose real or effective uid is ``uid``."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info.get("uids")
        if uids is not None and uid in (uids.real, uids.effective):
            found.append(proc)
    return found


def kill_everything_of(uid: int) -> int:
    """SIGKILL every process of ``uid`` (a task may have forked daemons that left the
    worker's process group); returns how many were signalled."""
    victims = processes_of(uid)
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=5)
    return len(victims)


def remove_shared_temp_files(uid: int) -> None:
    """Remove what ``uid`` left at the top of the shared temporary folders."""
    for folder in SHARED_TEMP_DIRS:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)  # never follows symlinks
                else:
                    os.unlink(entry.path)
            except OSError as exc:
                logger.warning("could not remove %s left by uid %d: %s", entry.path, uid, exc)


class WorkerAccounts:
    """Hands each lease a uid of its own from a pool, and takes it back clean.

    ``uids`` None means every worker runs as the agent's own account (development only).
    """

    def __init__(self, uids: range | None):
        self.uids = uids
        self._in_use: dict[str, int] = {}

    @property
    def isolated(self) -> bool:
        return self.uids is not None

    def describe(self) -> str:
        if self.uids is None:
            return "the agent's own account (development only: workers are not isolated)"
        return f"one account per lease from uids {self.uids.start}-{self.uids.stop - 1}"

    def check(self, python: str = sys.executable, folders: tuple[Path, ...] = ()) -> None:
        """Refuse to start when worker accounts could not work: the agent is not root, a uid
        is taken by a login account, or an account cannot run ``python`` or reach ``folders``.
        """
        if self.uids is None:
            return
        if os.geteuid() != 0:
            raise WorkerAccountError(
                "--worker-uids needs the agent to run as root (it starts each worker under "
                "its own uid); run it as root, or drop --worker-uids on a development machine "
                "with --insecure-shared-account")
        for uid in (self.uids.start, self.uids.stop - 1):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwuid(uid)
                if entry.pw_shell not in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"):
                    raise WorkerAccountError(
                        f"uid {uid} in --worker-uids belongs to the login account "
                        f"{entry.pw_name!r}; choose uids that no person uses")
        for folder in folders:
            blocked = _untraversable_ancestor(folder)
            if blocked is not None:
                raise WorkerAccountError(
                    f"worker accounts cannot reach {folder}: {blocked} is mode "
                    f"{blocked.stat().st_mode & 0o777:04o}; choose a --workdir whose parent "
                    "folders others may traverse (e.g. /var/lib/parallex)")
        uid = self.uids.start
        probe = subprocess.run(
            [python, "-c", "import distributed"], user=uid, group=uid, extra_groups=[],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/"}, cwd="/",
            capture_output=True, text=True, timeout=120, check=False)
        if probe.returncode != 0:
            lines = probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"]
            raise WorkerAccountError(
                f"worker accounts cannot run {python} with Dask (as uid {uid}): {lines[-1]}. "
                "Install Parallex where other accounts can read it, e.g. a virtual "
                "environment under /opt made from a Python outside /root")

    def acquire(self, lease_id: str) -> WorkerAccount:
        """A uid for ``lease_id`` that no other lease holds and no process runs under."""
        if self.uids is None:
            return SHARED
        if lease_id in self._in_use:
            uid = self._in_use[lease_id]
            return WorkerAccount(uid, uid)
        taken = set(self._in_use.values())
        running = uids_running()
        busy = []
        for uid in self.uids:
            if uid in taken:
                continue
            if uid in running:
                # Not ours (ours are adopted from workers.json): another agent's range overlaps
                # this one, or a worker outlived an agent that lost its state. Never touch it.
                busy.append(uid)
                continue
            self._in_use[lease_id] = uid
            return WorkerAccount(uid, uid)
        hint = (f"; uids {', '.join(map(str, busy[:5]))} run processes this agent did not "
                "start (overlapping --worker-uids of another agent, or leftovers to stop)"
                if busy else "")
        raise WorkerAccountError(
            f"all {len(self.uids)} worker uids are in use{hint}; give --worker-uids a larger "
            "range of its own (one uid per lease that may run at once)")

    def hand_over(self, holder: str, lease_id: str) -> WorkerAccount:
        """Give the account ``holder`` (a warm interpreter) holds to ``lease_id``."""
        if self.uids is None:
            return SHARED
        uid = self._in_use.pop(holder)
        self._in_use[lease_id] = uid
        return WorkerAccount(uid, uid)

    def adopt(self, lease_id: str, uid: int | None) -> None:
        """Record the uid of a worker that survived an agent restart."""
        if uid is not None and self.uids is not None and uid in self.uids:
            self._in_use[lease_id] = uid

    def release(self, lease_id: str) -> None:
        """The lease ended: kill what its uid still runs, remove its temporary files."""
        uid = self._in_use.pop(lease_id, None)
        if uid is None:
            return
        killed = kill_everything_of(uid)
        if killed:
            logger.info("lease %s: killed %d leftover processes of uid %d", lease_id, killed,
                        uid)
        remove_shared_temp_files(uid)


def _untraversable_ancestor(folder: Path) -> Path | None:
    """The first existing ancestor of ``folder`` that other accounts cannot enter."""
    for parent in reversed([folder, *folder.parents]):
        try:
            mode = parent.stat().st_mode
        except FileNotFoundError:
            return None
        if not mode & 0o001:
            return parent
    return None
