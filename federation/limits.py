"""Holding a lease's worker to its size, and pausing it for the machine's owner.

Two ways, chosen when the agent starts:

- ``CgroupLimits``: the kernel enforces (a cgroup per lease: CPU quota, memory maximum, pids
  limit; the freezer suspends). Needs root or a delegated cgroup subtree.
- ``WatchdogLimits``: the fallback. An RLIMIT_NPROC on the worker (per account, so only with
  worker accounts), and the agent's monitor loop kills a worker whose processes' resident
  memory passes the lease's; SIGSTOP/SIGCONT of its processes suspend and resume it. Memory is
  checked every monitor tick (0.25 s), so a fast allocation can overshoot until then.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
from dataclasses import dataclass

import psutil

from .cgroups import Cgroups, LeaseGroup, LeaseLimits, remove_scope
from .sizes import format_bytes

logger = logging.getLogger("parallex.agent")

#: Processes plus threads one lease may have, unless the agent is told otherwise.
DEFAULT_LEASE_PIDS = 1024


def _size(n: int) -> str:
    """'2 GiB' rather than '2.00 GiB'; '2.3 GiB' rather than '2.30 GiB'."""
    number, unit = format_bytes(n).split(" ")
    return f"{float(number):.1f}".removesuffix(".0") + f" {unit}"


def memory_message(lease_id: str, used: int | None, limit: int) -> str:
    """What the user reads when a worker is stopped for memory, e.g. "worker ls-… used
    2.3 GiB of its 2 GiB …"."""
    used_text = _size(used) if used else "all"
    return (f"worker {lease_id} used {used_text} of its {_size(limit)} and was stopped "
            f"at its lease's memory limit; ask for bigger workers (memory=...) or process the "
            f"data in smaller pieces")


@dataclass
class Confined:
    """What the limits know of one worker."""

    lease_id: str
    pid: int
    limits: LeaseLimits
    group: LeaseGroup | None = None
    killed_for_memory: int | None = None  # bytes it used when the watchdog killed it


class LeaseLimitsBase:
    """How workers are held to their lease's size; subclasses write each step."""

    enforced_by = ""

    def __init__(self) -> None:
        self.confined: dict[str, Confined] = {}

    def describe(self) -> str:
        return self.enforced_by

    def confine(self, lease_id: str, pid: int, limits: LeaseLimits) -> None:
        """Hold the just-started process ``pid`` (and all it starts) to ``limits``."""
        raise NotImplementedError

    def spawn_prefix(self, isolated: bool, pids: int) -> list[str]:
        """What goes before a worker's command line so it starts limited (default nothing);
        ``isolated``: it runs under a worker account of its own."""
        return []

    def adopt(self, lease_id: str, pid: int, limits: LeaseLimits) -> None:
        """After an agent restart: the worker already runs, confined or not."""
        self.confined[lease_id] = Confined(lease_id, pid, limits)

    def check(self, lease_id: str) -> None:
        """Called every monitor tick while the worker runs."""

    def suspend(self, lease_id: str) -> None:
        raise NotImplementedError

    def resume(self, lease_id: str) -> None:
        raise NotImplementedError

    def exit_message(self, lease_id: str) -> str | None:
        """Why the lease's worker died, when the limits killed it (memory); else None."""
        return None

    def release(self, lease_id: str) -> None:
        """The lease is over: kill what is left of it and forget it."""
        self.confined.pop(lease_id, None)

    def close(self) -> None:
        """The agent stops."""


class CgroupLimits(LeaseLimitsBase):
    """A cgroup per lease (see federation.cgroups)."""

    def __init__(self, cgroups: Cgroups):
        super().__init__()
        self.cgroups = cgroups
        self.enforced_by = cgroups.describe()

    def confine(self, lease_id: str, pid: int, limits: LeaseLimits) -> None:
        group = self.cgroups.create(lease_id, limits)
        group.add(pid)
        self.confined[lease_id] = Confined(lease_id, pid, limits, group)

    def adopt(self, lease_id: str, pid: int, limits: LeaseLimits) -> None:
        self.confined[lease_id] = Confined(lease_id, pid, limits, self.cgroups.find(lease_id))

    def _group(self, lease_id: str) -> LeaseGroup:
        found = self.confined.get(lease_id)
        return found.group if found and found.group else self.cgroups.find(lease_id)

    def suspend(self, lease_id: str) -> None:
        self._group(lease_id).freeze()

    def resume(self, lease_id: str) -> None:
        self._group(lease_id).thaw()

    def exit_message(self, lease_id: str) -> str | None:
        found = self.confined.get(lease_id)
        if found is None or found.group is None or found.group.oom_kills() == 0:
            return None
        return memory_message(lease_id, found.group.memory_peak(), found.limits.memory)

    def release(self, lease_id: str) -> None:
        group = self._group(lease_id)
        group.kill()
        # The kernel empties a group a moment after the kills; a group still busy now is
        # left for the agent's stop (remove_scope), never waited for on the event loop.
        group.remove()
        super().release(lease_id)

    def close(self) -> None:
        remove_scope(self.cgroups)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class WatchdogLimits(LeaseLimitsBase):
    """The fallback without cgroups: rlimits and the agent's watchdog."""

    def __init__(self, reason: str = ""):
        super().__init__()
        self._prlimit = shutil.which("prlimit")
        self.enforced_by = "rlimits and a memory watchdog" + (f" ({reason})" if reason else "")
        if self._prlimit is None:
            self.enforced_by += "; no prlimit program (util-linux): forks are not limited"

    def spawn_prefix(self, isolated: bool, pids: int) -> list[str]:
        # RLIMIT_NPROC counts per account: a worker account runs its lease alone, so this
        # bounds the lease's forks (the agent's own account runs more than one lease). Set
        # by util-linux's prlimit as the process starts: changing another account's limit
        # later needs CAP_SYS_RESOURCE, which containers often lack.
        if not isolated or self._prlimit is None:
            return []
        return [self._prlimit, f"--nproc={pids}:{pids}", "--"]

    def confine(self, lease_id: str, pid: int, limits: LeaseLimits) -> None:
        self.confined[lease_id] = Confined(lease_id, pid, limits)

    def check(self, lease_id: str) -> None:
        found = self.confined.get(lease_id)
        if found is None or found.killed_for_memory is not None:
            return
        procs = _tree(found.pid)
        used = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                used += proc.memory_info().rss
        if used > found.limits.memory:
            logger.warning("lease %s: worker uses %s of its %s; killing it", lease_id,
                           format_bytes(used), format_bytes(found.limits.memory))
            found.killed_for_memory = used
            self._signal(procs, signal.SIGKILL)

    @staticmethod
    def _signal(procs: list[psutil.Process], sig: int) -> None:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def suspend(self, lease_id: str) -> None:
        found = self.confined.get(lease_id)
        if found is not None:
            self._signal(_tree(found.pid), signal.SIGSTOP)

    def resume(self, lease_id: str) -> None:
        found = self.confined.get(lease_id)
        if found is not None:
            self._signal(_tree(found.pid), signal.SIGCONT)

    def exit_message(self, lease_id: str) -> str | None:
        found = self.confined.get(lease_id)
        if found is None or found.killed_for_memory is None:
            return None
        return memory_message(lease_id, found.killed_for_memory, found.limits.memory)

    def release(self, lease_id: str) -> None:
        found = self.confined.get(lease_id)
        if found is not None:
            procs = _tree(found.pid)
            self._signal(procs, signal.SIGCONT)  # a stopped process must run to die of TERM
        super().release(lease_id)


def lease_limits(lease: dict, pids: int = DEFAULT_LEASE_PIDS) -> LeaseLimits:
    """The limits of a lease from the broker's description of it."""
    return LeaseLimits(cpus=float(lease.get("cpus") or 1), memory=int(lease["memory"]),
                       pids=pids)


def choose(workdir, want: str = "auto") -> LeaseLimitsBase:
    """Cgroups when this machine lets the agent use them (``want``: auto, v1, v2, off),
    otherwise the watchdog; a cgroup version asked for by name that cannot be used raises
    CgroupUnavailable."""
    from .cgroups import CgroupUnavailable, detect

    if want == "off":
        return WatchdogLimits("--cgroups off")
    try:
        return CgroupLimits(detect(workdir, want))
    except CgroupUnavailable as exc:
        if want != "auto":
            raise
        logger.warning("lease sizes are not enforced by cgroups: %s; falling back to rlimits "
                       "and a memory watchdog", exc)
        return WatchdogLimits(str(exc))
