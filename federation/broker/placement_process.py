"""The leader's placement passes in a process of their own, on PostgreSQL.

Only the leader replica places (placement_asks.py), several passes a second under churn, and
a pass that places leases is a quarter of a second of Python or more (reading a thousand
providers, fair-share order, the choice). On the placer thread of the request process those
passes held the interpreter lock against the event loop and the request threads: in issue
14's load benchmark at 500 agents, the leader's event loop ran late by up to 250 ms (p99)
and its heartbeats took up to 1 s inside it, against 100 ms and 250 ms on the replica that
did not place. In a process of its own a pass competes only for a core, which the operating
system shares fairly, as the periodic passes do (periodic_process.py).

The placer thread stays: it coalesces asks into passes and answers the other replicas'
asks as before, and waits for each pass here without holding the interpreter lock. The
child is started with the app in the background; until it has started (about a second of
imports), and should it die, passes run on the placer thread as before, so a pass never
waits for a process to start. The placement lock serialises the child's passes with any
other replica's, as it did the thread's. SQLite keeps passes in the broker's process: its one
writer is serialised by the broker's exclusive section, which spans one process only.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import cast

from sqlalchemy.engine import Engine

from .db import session
from .periodic_process import BrokerChildProcess, PeriodicProcessStopped, _child
from .placing import lock_across_processes, place_pending
from .preemption import RecentPreemptionRates
from .settings import BrokerSettings

logger = logging.getLogger("parallex.broker")


@dataclass(frozen=True)
class PassDone:
    """What a pass in the child did, for the broker to wake agents and time it."""

    #: Providers that got leases (their agents' long polls must wake).
    placed: frozenset[str]
    #: Seconds of the pass, its commit included (parallex_placement_pass_seconds).
    seconds: float
    #: Seconds it waited for the placement lock (parallex_placement_lock_wait_seconds).
    lock_wait: float


def _warm() -> bool:
    """Nothing to do: answered once the child has started and imported the placement code."""
    return True


def _place(relayed: bool) -> PassDone:
    """One placement pass in the child, as ``Broker.place_pending`` runs it in-process."""
    # This process's own, kept between passes as the placer thread's were.
    rng = cast(random.Random, _child.setdefault("rng", random.Random()))
    rates = cast(RecentPreemptionRates, _child.setdefault("rates", RecentPreemptionRates()))
    settings = cast(BrokerSettings, _child["settings"])
    start = time.perf_counter()
    try:
        with session(cast(Engine, _child["engine"])) as s:
            lock_across_processes(s)
            locked = time.perf_counter()
            placed = place_pending(s, rng, settings.fair_share_half_life, relayed=relayed,
                                   recent_rates=rates)
            s.commit()
    except Exception as exc:
        # The database's own exception classes may not come back through the pipe (some do
        # not unpickle); the pass failed, its transaction was rolled back, and the reason is
        # logged here with its traceback. The broker's placer logs it and places next time.
        logger.exception("placement pass failed")
        raise RuntimeError(f"placement pass failed in the placement process: {exc}") from None
    return PassDone(frozenset(placed), time.perf_counter() - start, locked - start)


class PlacementProcess(BrokerChildProcess):
    """Runs placement passes in a child process once ``start`` has brought it up."""

    def __init__(self, engine: Engine, settings: BrokerSettings):
        super().__init__(engine, settings, "placer")
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        """Whether passes run in the child now (else the caller runs them itself)."""
        return self._ready.is_set()

    def start(self) -> None:
        """Start the child in the background; passes move there once it answers."""
        try:
            warming = self._submit(_warm)
        except (PeriodicProcessStopped, BrokenProcessPool):
            return
        warming.add_done_callback(self._warmed)

    def _warmed(self, warming: Future) -> None:
        failure = "cancelled" if warming.cancelled() else warming.exception()
        if failure is not None:
            logger.warning("the placement process did not start (%s); passes run in the "
                           "broker's process", failure)
            return
        self._ready.set()

    def place(self, relayed: bool) -> PassDone | None:
        """A pass in the child; None when it is not running (not started yet, stopping, or
        it died: it is started again for the next pass), and the caller places itself."""
        if not self.ready:
            return None
        try:
            return self._run(_place, relayed)
        except PeriodicProcessStopped:
            return None  # the broker is stopping
        except BrokenProcessPool:
            self._ready.clear()
            logger.warning("the placement process is gone; this pass runs in the broker's "
                           "process and a new placement process starts")
            self.start()
            return None

    def stop(self) -> None:
        self._ready.clear()
        super().stop()
