"""Enforced lease sizes: one control group per lease (CPU quota, memory maximum, pids limit,
freezer), on cgroup v2 or v1, detected at start.

The agent creates its groups under the cgroup it runs in, so it works as root and under a
systemd unit with ``Delegate=yes`` alike; where it may not write there, ``detect`` says why and
the agent falls back to rlimits and a memory watchdog (federation.limits).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .ids import check_lease_id

logger = logging.getLogger("parallex.agent")

ROOT = Path("/sys/fs/cgroup")
#: cgroup v1 hierarchies a lease uses; each must be mounted and writable.
V1_CONTROLLERS = ("memory", "cpu", "pids", "freezer")
#: cgroup v2 controllers a lease uses (freezing is built into v2).
V2_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000


class CgroupUnavailable(RuntimeError):
    """Control groups cannot be used here; the message says why and what to change."""


@dataclass(frozen=True)
class LeaseLimits:
    """What a lease may use: CPU cores (a quota, not a pinning), bytes of memory (swap
    included where the kernel counts it) and processes plus threads."""

    cpus: float
    memory: int
    pids: int


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _counter(path: Path, name: str) -> int:
    """A counter from a cgroup file of "name value" lines (0 when absent)."""
    with contextlib.suppress(OSError, ValueError):
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    return 0


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller, and under "" its v2 cgroup."""
    out: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _id, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def scope_name(workdir: Path) -> str:
    """The name of one agent's group of lease groups: stable across restarts of the agent
    (so it finds its leases again), distinct between agents with different work folders."""
    digest = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:10]
    return f"parallex-{digest}"


class LeaseGroup:
    """One lease's control group. Subclasses write the version's file names."""

    version = ""

    def __init__(self, lease_id: str, dirs: dict[str, Path]):
        self.lease_id = lease_id
        self.dirs = dirs  # controller ("" on v2) -> the group's folder

    def add(self, pid: int) -> None:
        """Move process ``pid`` (and the threads it has) into the group."""
        for folder in self.dirs.values():
            _write(folder / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        folder = next(iter(self.dirs.values()))
        with contextlib.suppress(OSError):
            return [int(p) for p in _read(folder / "cgroup.procs").split()]
        return []

    def kill(self) -> None:
        """SIGKILL every process in the group (what the lease's account started included)."""
        self.thaw()  # a frozen process dies only once thawed
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Delete the group; one whose processes have not all gone yet stays (EBUSY)."""
        for folder in self.dirs.values():
            with contextlib.suppress(OSError):
                folder.rmdir()

    def freeze(self) -> None:
        raise NotImplementedError

    def thaw(self) -> None:
        raise NotImplementedError

    def memory_peak(self) -> int | None:
        """The most memory the group has used, in bytes (None when the kernel does not say)."""
        raise NotImplementedError

    def oom_kills(self) -> int:
        """How many of the group's processes the kernel killed for the memory maximum."""
        raise NotImplementedError


class V1LeaseGroup(LeaseGroup):
    version = "v1"

    def freeze(self) -> None:
        _write(self.dirs["freezer"] / "freezer.state", "FROZEN")

    def thaw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            _write(self.dirs["freezer"] / "freezer.state", "THAWED")

    def memory_peak(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(_read(self.dirs["memory"] / "memory.max_usage_in_bytes"))
        return None

    def oom_kills(self) -> int:
        return _counter(self.dirs["memory"] / "memory.oom_control", "oom_kill")


class V2LeaseGroup(LeaseGroup):
    version = "v2"

    def freeze(self) -> None:
        _write(self.dirs[""] / "cgroup.freeze", "1")

    def thaw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            _write(self.dirs[""] / "cgroup.freeze", "0")

    def memory_peak(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(_read(self.dirs[""] / "memory.peak"))  # Linux 5.19+
        return None

    def oom_kills(self) -> int:
        return _counter(self.dirs[""] / "memory.events", "oom_kill")

    def kill(self) -> None:
        try:
            _write(self.dirs[""] / "cgroup.kill", "1")  # Linux 5.14+: atomic, fork-proof
        except OSError:
            super().kill()


class Cgroups:
    """Makes and finds lease groups under one agent's scope folder(s)."""

    version = ""

    def __init__(self, scopes: dict[str, Path]):
        self.scopes = scopes  # controller ("" on v2) -> the agent's scope folder

    def describe(self) -> str:
        return (f"cgroup {self.version} "
                f"({', '.join(str(p) for p in sorted(set(self.scopes.values())))})")

    def _dirs(self, lease_id: str) -> dict[str, Path]:
        check_lease_id(lease_id)
        return {name: scope / lease_id for name, scope in self.scopes.items()}

    def create(self, lease_id: str, limits: LeaseLimits) -> LeaseGroup:
        """The lease's group, made fresh with ``limits``; raises OSError when it cannot."""
        group = self.find(lease_id)
        group.kill()
        group.remove()
        for folder in group.dirs.values():
            folder.mkdir()
        try:
            self._limit(group, limits)
        except OSError:
            group.remove()
            raise
        return group

    def find(self, lease_id: str) -> LeaseGroup:
        """The lease's group (it may not exist)."""
        raise NotImplementedError

    def _limit(self, group: LeaseGroup, limits: LeaseLimits) -> None:
        raise NotImplementedError


class CgroupsV1(Cgroups):
    version = "v1"

    def find(self, lease_id: str) -> LeaseGroup:
        return V1LeaseGroup(lease_id, self._dirs(lease_id))

    def _limit(self, group: LeaseGroup, limits: LeaseLimits) -> None:
        memory = group.dirs["memory"]
        _write(memory / "memory.limit_in_bytes", str(limits.memory))
        with contextlib.suppress(FileNotFoundError, PermissionError):
            # Swap counts too where the kernel accounts it (memsw), so a lease cannot page
            # its way past its size.
            _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory))
        _write(group.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(group.dirs["cpu"] / "cpu.cfs_quota_us",
               str(max(1000, int(limits.cpus * CPU_PERIOD_US))))
        _write(group.dirs["pids"] / "pids.max", str(limits.pids))


class CgroupsV2(Cgroups):
    version = "v2"

    def find(self, lease_id: str) -> LeaseGroup:
        return V2LeaseGroup(lease_id, self._dirs(lease_id))

    def _limit(self, group: LeaseGroup, limits: LeaseLimits) -> None:
        folder = group.dirs[""]
        _write(folder / "memory.max", str(limits.memory))
        with contextlib.suppress(FileNotFoundError):
            _write(folder / "memory.swap.max", "0")
        _write(folder / "cpu.max",
               f"{max(1000, int(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")
        _write(folder / "pids.max", str(limits.pids))


def _writable_scope(parent: Path, name: str) -> Path:
    scope = parent / name
    try:
        scope.mkdir(exist_ok=True)
    except OSError as exc:
        raise CgroupUnavailable(
            f"cannot create {scope}: {exc.strerror}; run the agent as root or in a systemd "
            "unit with Delegate=yes (parallex provide --print-systemd-unit)") from exc
    return scope


def _detect_v2(workdir: Path, own: str) -> CgroupsV2:
    available = set(_read(ROOT / "cgroup.controllers").split())
    missing = [c for c in V2_CONTROLLERS if c not in available]
    if missing:
        raise CgroupUnavailable(f"cgroup v2 lacks the {', '.join(missing)} controller(s)")
    home = ROOT / own.lstrip("/")
    if own not in ("", "/"):
        # v2 allows processes only in leaves of a subtree with controllers enabled: the
        # agent moves itself into a leaf of its (delegated) cgroup first.
        leaf = _writable_scope(home, "agent")
        try:
            for pid in _read(home / "cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError, OSError):
                    _write(leaf / "cgroup.procs", pid)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot move the agent into {leaf}: {exc}") from exc
    try:
        _write(home / "cgroup.subtree_control", " ".join(f"+{c}" for c in V2_CONTROLLERS))
        scope = _writable_scope(home, scope_name(workdir))
        _write(scope / "cgroup.subtree_control", " ".join(f"+{c}" for c in V2_CONTROLLERS))
    except OSError as exc:
        raise CgroupUnavailable(f"cannot enable cgroup v2 controllers under {home}: "
                                f"{exc.strerror}; delegate the subtree (Delegate=yes)") from exc
    return CgroupsV2({"": scope})


def _detect_v1(workdir: Path, own: dict[str, str]) -> CgroupsV1:
    scopes = {}
    for controller in V1_CONTROLLERS:
        mount = ROOT / controller
        if not (mount / "cgroup.procs").exists():
            raise CgroupUnavailable(f"the cgroup v1 {controller} hierarchy is not mounted at "
                                    f"{mount}")
        parent = mount / own.get(controller, "/").lstrip("/")
        scopes[controller] = _writable_scope(parent, scope_name(workdir))
    with contextlib.suppress(OSError):
        # Memory limits of the scope apply to the groups below it, counted together.
        _write(scopes["memory"] / "memory.use_hierarchy", "1")
    return CgroupsV1(scopes)


def detect(workdir: Path, want: str = "auto") -> Cgroups:
    """The cgroup version this machine runs, ready for lease groups under this agent's own
    cgroup; ``want`` is auto, v1 or v2. Raises CgroupUnavailable with the reason."""
    if want not in ("auto", "v1", "v2"):
        raise ValueError(f"--cgroups must be auto, v1, v2 or off, not {want!r}")
    try:
        own = _own_paths()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self/cgroup: {exc}") from exc
    pure_v2 = (ROOT / "cgroup.controllers").exists()
    if want == "v2" or (want == "auto" and pure_v2):
        if not pure_v2:
            raise CgroupUnavailable(f"{ROOT} is not a cgroup v2 mount")
        return _detect_v2(workdir, own.get("", "/"))
    return _detect_v1(workdir, own)


def remove_scope(cgroups: Cgroups) -> None:
    """Delete the agent's (empty) scope folders when it stops."""
    for scope in set(cgroups.scopes.values()):
        with contextlib.suppress(OSError):
            for child in scope.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            scope.rmdir()
