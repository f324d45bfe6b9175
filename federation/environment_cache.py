"""The provider agent's environments: a cluster's packages, built with uv before its first
worker starts, kept in a cache keyed by the environment's hash so later leases start at once.

An environment is an *overlay* on the agent's own: a virtual environment on the agent's
Python whose site-packages holds only what differs from the agent's (other versions, missing
packages, shipped wheels) and which then reads the agent's site-packages (a .pth file), so
workers keep the agent's Dask comm plugins and a 50-package environment that mostly matches
costs seconds and little disk. A cluster whose packages all match the agent's runs in the
agent's own environment (nothing is built).

What the user shipped (local and editable packages: their own code) never enters the shared
cache: the agent keeps those wheels in a folder only it can read and installs them per lease
into the lease's own folder (mode 0700, the lease's account), which the worker's Python path
puts first. Other leases on the machine, under other accounts, cannot read them; the shared
environments hold only what any index serves to anyone.

``fixed`` mode builds nothing: it serves only clusters whose Python, dask and distributed
match its own, and refuses the others with the versions named.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from .environment import (
    EnvironmentProblem,
    EnvironmentSpec,
    Package,
    core_versions,
    environment_hash,
    fixed_mismatch,
    installed,
    python_version,
    repack_wheel,
    uv_binary,
)

logger = logging.getLogger("parallex.agent")

MODES = ("build", "fixed")
#: The default package index (the lab's agent may allow others with --package-index).
PYPI = "https://pypi.org/simple"
#: Steps a build is cut into, so progress can be told ("37 of 112 packages").
PROGRESS_STEPS = 8
#: Default cap of the environment cache, in bytes (20 GiB).
DEFAULT_CACHE_BYTES = 20 * 2**30

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def disk_usage(path: Path) -> int:
    """Bytes the files under ``path`` occupy, each inode counted once."""
    seen: set[int] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


@dataclass(frozen=True)
class Prepared:
    """What a lease's worker runs with: the interpreter (the agent's, or a shared environment's
    under ``key``), and the user's own wheels to install in the lease's folder."""

    python: str
    key: str | None = None
    private_wheels: tuple[str, ...] = ()


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def install_private(python: str, wheels: list[str], target: Path) -> None:
    """Install the user's own wheels into ``target`` (in the lease's folder) for ``python``;
    raises EnvironmentProblem with uv's words."""
    done = subprocess.run([uv_binary(), "pip", "install", "--quiet", "--no-deps", "--no-cache",
                           "--no-index", "--python", python, "--target", str(target), *wheels],
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith(("PARALLEX_", "UV_"))})
    if done.returncode != 0:
        raise EnvironmentProblem("installing the cluster's own packages failed: "
                                 + _ANSI.sub("", done.stderr).strip()[-800:])


class EnvironmentCache:
    """Builds and keeps environments under ``root`` (see the module docstring).

    ``indexes``: the package indexes builds may use, the first the main one (default PyPI);
    ``max_bytes``: the cache's disk cap (least recently used environments go first);
    ``where``: how refusals name this machine, e.g. "lab-x-server (lab physics)"."""

    def __init__(self, root: Path, *, mode: str = "build", indexes: tuple[str, ...] = (),
                 max_bytes: int = DEFAULT_CACHE_BYTES, where: str = "this provider"):
        if mode not in MODES:
            raise ValueError(f"environment mode must be one of {MODES}; got {mode!r}")
        self.root = Path(root)
        self.mode = mode
        self.indexes = tuple(indexes) or (PYPI,)
        self.max_bytes = int(max_bytes)
        self.where = where
        self.versions = core_versions()
        self._own = installed()
        self._own_sha: dict[str, str] = {}
        self._builds: dict[str, asyncio.Task] = {}
        #: Environments in use by a lease (hash -> lease ids): never evicted.
        self.in_use: dict[str, set[str]] = {}
        #: Builds so far by outcome ("built", "failed"), for the agent's metrics.
        self.builds: Counter[str] = Counter()

    # ---- what is here ---------------------------------------------------------------------

    def describe(self) -> dict:
        """What the agent tells the broker at registration."""
        return {"mode": self.mode, **self.versions}

    def warm(self) -> list[str]:
        """Hashes of the clusters' environments this machine starts workers in without a
        build, most recently served first (what the broker's placement prefers)."""
        served = self._served()
        ready = set(self._ready_dirs())
        return [full for full, key in reversed(served.items()) if not key or key in ready]

    def disk_bytes(self) -> int:
        """Bytes the ready shared environments take (as measured when each was built)."""
        total = 0
        for name in self._ready_dirs():
            with contextlib.suppress(OSError, ValueError):
                total += int((self.root / name / ".ready").read_text().strip() or 0)
        return total

    def building(self) -> int:
        """Builds running now."""
        return len(self._builds)

    def ready_count(self) -> int:
        """Shared environments built and ready."""
        return len(self._ready_dirs())

    def _ready_dirs(self) -> list[str]:
        """Keys of the shared environments built and ready here, most recently used first."""
        if not self.root.is_dir():
            return []
        ready = [p for p in self.root.iterdir() if (p / ".ready").exists()]
        ready.sort(key=lambda p: (p / ".ready").stat().st_mtime, reverse=True)
        return [p.name for p in ready]

    def _served(self) -> dict[str, str]:
        try:
            return json.loads((self.root / "served.json").read_text())
        except (OSError, ValueError):
            return {}

    def _note_served(self, full: str, key: str | None) -> None:
        served = self._served()
        served.pop(full, None)
        served[full] = key or ""
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.root / "served.json.tmp"
        tmp.write_text(json.dumps(dict(list(served.items())[-1000:])))
        os.replace(tmp, self.root / "served.json")

    def _matches_own(self, package: Package) -> bool:
        dist = self._own.get(package.name)
        if dist is None or dist.version != package.version:
            return False
        if not package.shipped:
            return True
        if package.name not in self._own_sha:
            try:
                self._own_sha[package.name] = hashlib.sha256(repack_wheel(dist)[1]).hexdigest()
            except EnvironmentProblem:
                self._own_sha[package.name] = ""
        return self._own_sha[package.name] == package.sha256

    def missing(self, spec: EnvironmentSpec) -> list[Package]:
        """The packages an environment for ``spec`` must add to the agent's own."""
        return [p for p in spec.packages if not self._matches_own(p)]

    def shared_key(self, spec: EnvironmentSpec) -> str | None:
        """The shared environment ``spec`` needs (its index packages the agent lacks), by
        key; None when the agent's own environment has them all."""
        shared = [p for p in self.missing(spec) if not p.shipped]
        return environment_hash(spec.python, shared) if shared else None

    def refusal(self, spec: EnvironmentSpec) -> str | None:
        """Why this agent can never run ``spec``, or None."""
        if self.mode == "fixed":
            return fixed_mismatch(spec, self.versions, self.where)
        if spec.python != python_version():
            return (f"{self.where} has Python {python_version()}; this cluster's environment "
                    f"needs Python {spec.python}. Use a notebook kernel with Python "
                    f"{python_version()}, or labs that have Python {spec.python}")
        return None

    # ---- building -------------------------------------------------------------------------

    async def prepare(self, spec: EnvironmentSpec,
                      fetch_wheel: Callable[[Package], Awaitable[bytes]],
                      progress: Callable[[int, int], Awaitable[None]]) -> Prepared:
        """What a worker of ``spec`` runs with, building the shared environment first when
        needed (one build per key however many leases wait) and fetching the user's wheels.
        Raises EnvironmentProblem saying what could not be built, where."""
        refusal = self.refusal(spec)
        if refusal:
            raise EnvironmentProblem(refusal)
        if self.mode == "fixed":
            return Prepared(sys.executable)
        key = self.shared_key(spec)
        python = sys.executable
        if key is not None:
            folder = self.root / key
            if (folder / ".ready").exists():
                os.utime(folder / ".ready")  # most recently used
            else:
                task = self._builds.get(key)
                if task is None:
                    shared = [p for p in self.missing(spec) if not p.shipped]
                    task = asyncio.create_task(self._build(key, shared, progress))
                    self._builds[key] = task
                    task.add_done_callback(lambda _t, k=key: self._builds.pop(k, None))
                await asyncio.shield(task)
            python = str(folder / "bin" / "python")
        wheels = [await self._private_wheel(p, fetch_wheel)
                  for p in self.missing(spec) if p.shipped]
        self._note_served(spec.hash, key)
        return Prepared(python, key, tuple(wheels))

    async def _private_wheel(self, package: Package,
                             fetch_wheel: Callable[[Package], Awaitable[bytes]]) -> str:
        """The user's wheel, kept where only the agent reads it (fetched once per SHA-256)."""
        folder = self.root / ".private" / package.sha256
        path = folder / Path(package.filename).name
        if path.exists():
            return str(path)
        data = await fetch_wheel(package)
        if hashlib.sha256(data).hexdigest() != package.sha256:
            raise EnvironmentProblem(
                f"the wheel of {package.name} {package.version} arrived damaged (its SHA-256 "
                "differs); start the cluster again")
        (self.root / ".private").mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        tmp = folder / f".{path.name}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return str(path)

    async def _build(self, key: str, need: list[Package],
                     progress: Callable[[int, int], Awaitable[None]]) -> str:
        started = time.monotonic()
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        # Built in place (scripts' first lines name their environment's path); only the
        # ".ready" file written last makes it usable.
        folder = self.root / key
        shutil.rmtree(folder, ignore_errors=True)
        try:
            await progress(0, len(need))
            await self._uv("venv", "--quiet", "--python", sys.executable, str(folder))
            self._read_agent_packages(folder)
            python = str(folder / "bin" / "python")
            items = [p.requirement() for p in need]
            step = max(1, math.ceil(len(items) / PROGRESS_STEPS))
            done = 0
            for i in range(0, len(items), step):
                batch = items[i:i + step]
                await self._install(python, batch)
                done += len(batch)
                await progress(done, len(items))
            size = disk_usage(folder)
            if size > self.max_bytes:
                raise EnvironmentProblem(
                    f"this cluster's environment needs {_size(size)} on {self.where}, more "
                    f"than the lab's cap for its environment cache ({_size(self.max_bytes)})")
            self._make_room(size)
            (folder / ".ready").write_text(f"{size}\n")
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, Exception):
                self.builds["failed"] += 1
            raise
        self.builds["built"] += 1
        took = time.monotonic() - started
        logger.info("environment %s built in %.1f s: %d packages added, %s", key, took,
                    len(need), _size(size))
        self._log_build(f"{key} {took:.1f}s {len(need)} packages {size} bytes")
        return python

    def _log_build(self, line: str) -> None:
        """One line per build in ``builds.log``, which an administrator audits."""
        with open(self.root / "builds.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {line}\n")

    def _read_agent_packages(self, folder: Path) -> None:
        """Let the new environment import the agent's packages after its own."""
        site_dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))
                     and Path(p).is_dir()]
        targets = list(folder.glob("lib/python*/site-packages"))
        if len(targets) != 1:
            raise EnvironmentProblem(f"uv made no site-packages folder under {folder}")
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in site_dirs)
        # Sorted after every name a package installs (pth files run in name order).
        (targets[0] / "zzz_parallex_agent.pth").write_text(lines)

    async def _install(self, python: str, items: list[str]) -> None:
        args = ["pip", "install", "--quiet", "--no-deps", "--python", python,
                "--cache-dir", str(self.root / ".uv-cache"), "--index-url", self.indexes[0]]
        for extra in self.indexes[1:]:
            args += ["--extra-index-url", extra]
        try:
            await self._uv(*args, *items)
        except EnvironmentProblem as exc:
            names = ", ".join(Path(i).name if i.endswith(".whl") else i for i in items)
            raise EnvironmentProblem(
                f"cannot build this cluster's environment on {self.where} from "
                f"{', '.join(self.indexes)}: {exc} (installing {names})") from None

    async def _uv(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEX_", "UV_"))}
        proc = await asyncio.create_subprocess_exec(
            uv_binary(), *args, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            text = _ANSI.sub("", err.decode(errors="replace"))
            lines = [line.strip(" ×╰─▶│") for line in text.splitlines()]
            message = " ".join(line for line in lines if line and not line.startswith(
                ("Using Python", "hint:")))
            raise EnvironmentProblem(message[-1200:] or f"uv exited with {proc.returncode}")

    def _make_room(self, needed: int) -> None:
        """Evict least recently used environments no lease uses until ``needed`` fits."""
        entries = []
        for name in self._ready_dirs():
            ready = self.root / name / ".ready"
            try:
                size = int(ready.read_text().strip() or 0)
            except (OSError, ValueError):
                size = 0
            entries.append((name, size))
        total = sum(size for _, size in entries)
        for name, size in reversed(entries):  # least recently used first
            if total + needed <= self.max_bytes:
                break
            if self.in_use.get(name):
                continue
            logger.info("evicting environment %s (%s) to stay within the cache cap", name,
                        _size(size))
            shutil.rmtree(self.root / name, ignore_errors=True)
            total -= size
