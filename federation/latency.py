"""Latency across sites: the Dask settings a federation's scheduler runs with, and the round
trips a cluster measures to its workers.

A federation's workers are 5–50 ms from their scheduler, not the microseconds of a LAN that
Dask's defaults assume. The settings (``parallex.scheduler.latency-settings``, each with its
reason in federation/parallex.yaml and the README's "Latency" section) are applied in the
scheduler's process only, so a LocalCluster in the same notebook keeps Dask's defaults.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

logger = logging.getLogger("parallex.latency")

#: The config key holding the scheduler's settings, as dotted Dask keys → values.
SETTINGS_KEY = "parallex.scheduler.latency-settings"
#: Seconds between two measurements of every worker's round trip.
PROBE_INTERVAL = 10.0
#: Probes per worker and measurement; the least is kept (a probe that waited behind a data
#: transfer on the same connection measures the transfer, not the path).
PROBES = 3


def scheduler_settings(config: Any = None) -> dict[str, Any]:
    """The Dask settings for a federation's scheduler, from ``parallex.scheduler.
    latency-settings`` (dotted keys); an empty mapping turns them off."""
    import dask.config

    raw = dask.config.get(SETTINGS_KEY, default={}, config=config) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{SETTINGS_KEY} must map Dask config keys to values, e.g. "
                         "{'distributed.scheduler.worker-saturation': 4}; got "
                         f"{type(raw).__name__}")
    return {str(k): v for k, v in raw.items()}


def apply_scheduler_settings() -> dict[str, Any]:
    """Set the federation's scheduler settings in this (the scheduler's) process; returns
    what was set."""
    import dask.config

    settings = scheduler_settings()
    if settings:
        dask.config.set(settings)
        logger.info("scheduler settings for workers across sites: %s",
                    ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    return settings


async def round_trip(rpc: Any, probes: int = PROBES) -> float:
    """Seconds of the fastest of ``probes`` identity calls over ``rpc`` (a worker's pooled
    connection, so after the first only the path is timed)."""
    best = float("inf")
    for _ in range(probes):
        start = time.perf_counter()
        await rpc.identity()
        best = min(best, time.perf_counter() - start)
    return best


async def measure(scheduler: Any, addresses: list[str], timeout: float = 10.0) -> dict[str, float]:
    """Round trip in seconds from ``scheduler`` to each of ``addresses``; a worker that does not
    answer within ``timeout`` is left out (it is gone or busy, and says so elsewhere)."""
    async def one(address: str) -> tuple[str, float | None]:
        try:
            return address, await asyncio.wait_for(round_trip(scheduler.rpc(address)), timeout)
        except OSError as exc:  # TimeoutError and CommClosedError are OSErrors
            logger.debug("no round trip to %s: %s", address, exc)
            return address, None

    found = await asyncio.gather(*(one(a) for a in addresses))
    return {address: rtt for address, rtt in found if rtt is not None}


def describe(round_trips: dict[str, float]) -> str:
    """"round trip to workers: median 21 ms, most 40 ms (4 workers)", or "" when none."""
    if not round_trips:
        return ""
    values = list(round_trips.values())
    n = len(values)
    return (f"round trip to workers: median {statistics.median(values) * 1000:.0f} ms, most "
            f"{max(values) * 1000:.0f} ms ({n} worker{'s' if n != 1 else ''})")
