"""busy_timeline: how many of the machine's cores were busy, every quarter second of a run.

The load benchmark's probes see heartbeats answered slowly in bursts. Set against this
timeline, a slow heartbeat tells whether the machine was saturated while it waited (work
queued for a core) or idle (something inside the broker held it).
"""

from __future__ import annotations

import bisect
import threading
import time

import psutil

#: Seconds between two samples.
EVERY = 0.25


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class BusyTimeline:
    """A thread sampling the machine's busy cores until ``stop``; times are monotonic."""

    def __init__(self, every: float = EVERY) -> None:
        self.every = every
        self.times: list[float] = []  # the end of each sampled interval
        self.cores: list[float] = []  # busy cores on average over that interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="busy-timeline")

    def start(self) -> BusyTimeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_t, last_busy = time.monotonic(), busy_seconds()
        while not self._stop.wait(self.every):
            t, busy = time.monotonic(), busy_seconds()
            self.times.append(t)
            self.cores.append((busy - last_busy) / max(t - last_t, 1e-6))
            last_t, last_busy = t, busy

    def between(self, start: float, end: float) -> float | None:
        """Busy cores on average over the samples overlapping [start, end], or None."""
        first = bisect.bisect_left(self.times, start)
        last = bisect.bisect_left(self.times, end)
        window = self.cores[first:last + 1]
        return sum(window) / len(window) if window else None

    def saturated_share(self, start: float, end: float, cores: float) -> float:
        """The share of the samples in [start, end] with at least ``cores`` busy."""
        window = [c for t, c in zip(self.times, self.cores, strict=True) if start <= t <= end]
        return sum(c >= cores for c in window) / len(window) if window else 0.0
