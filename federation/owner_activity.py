"""Measuring the machine owner's activity: the CPU their processes use, and their processes on
the GPUs this machine offers (through NVML, on GPU machines only).

Parallex's own processes never count: the agent and everything it started (workers, warm
interpreters) and every process of a worker account.
"""

from __future__ import annotations

import contextlib
import logging
import pwd
import time
from collections.abc import Callable, Iterable

import psutil

from .owner_policy import Activity

logger = logging.getLogger("parallex.agent")


def parse_accounts(names: Iterable[str]) -> set[int] | None:
    """Account names, uids and uid ranges ("alice", "1001", "2000-2999") → uids; None for
    an empty list (everyone's processes but Parallex's count)."""
    names = list(names)
    if not names:
        return None
    uids: set[int] = set()
    for name in names:
        low, sep, high = name.partition("-")
        if low.isdigit() and (not sep or high.isdigit()):
            uids.update(range(int(low), int(high or low) + 1))
            continue
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError as exc:
            raise ValueError(f"owner account {name!r} does not exist on this machine") from exc
    return uids


class OwnerMeter:
    """Cores the owner's processes used between two ``read()`` calls."""

    def __init__(self, owner_uids: set[int] | None = None,
                 parallex_uids: Callable[[], Iterable[int]] = lambda: (),
                 gpu_indices: Iterable[int] = ()):
        self.owner_uids = owner_uids
        self.parallex_uids = parallex_uids
        self.gpu_indices = list(gpu_indices)
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds
        self._at: float | None = None

    def _ours(self) -> set[int]:
        me = psutil.Process()
        pids = {me.pid}
        with contextlib.suppress(psutil.Error):
            pids.update(p.pid for p in me.children(recursive=True))
        return pids

    def read(self) -> Activity:
        now = time.monotonic()
        ours = self._ours()
        excluded = set(self.parallex_uids())
        seen: dict[tuple[int, float], float] = {}
        used = 0.0
        for proc in psutil.process_iter(["uids", "cpu_times", "create_time"]):
            info = proc.info
            uids, times = info.get("uids"), info.get("cpu_times")
            if uids is None or times is None or proc.pid in ours:
                continue
            if uids.real in excluded:
                continue
            if self.owner_uids is not None and uids.real not in self.owner_uids:
                continue
            key = (proc.pid, info.get("create_time") or 0.0)
            total = times.user + times.system
            seen[key] = total
            if key in self._cpu:
                used += max(0.0, total - self._cpu[key])
            elif self._at is not None:
                used += total  # started since the last reading: all its time is new
        elapsed = now - self._at if self._at is not None else None
        self._cpu, self._at = seen, now
        cpus = used / elapsed if elapsed else 0.0
        return Activity(cpus=cpus, gpu_processes=self._gpu_processes(ours, excluded))

    def _gpu_processes(self, ours: set[int], excluded: set[int]) -> int:
        """The owner's compute processes on the offered GPUs (NVML; GPU machines only)."""
        if not self.gpu_indices:
            return 0
        try:  # pragma: no cover - runs on GPU machines only (see the GPU notes in README)
            import pynvml

            pynvml.nvmlInit()
            count = 0
            for index in self.gpu_indices:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid in ours:
                        continue
                    with contextlib.suppress(psutil.Error):
                        uid = psutil.Process(p.pid).uids().real
                        if uid in excluded or (self.owner_uids is not None
                                               and uid not in self.owner_uids):
                            continue
                    count += 1
            return count
        except Exception as exc:  # noqa: BLE001 - NVML missing or failing: say so, count 0
            logger.debug("NVML unavailable for GPU idle detection: %s", exc)
            return 0
