"""Coalescers: one thread per kind of background work in a broker process (placement passes,
metering of leases that just ended), serving every ask that arrives while a batch runs with
one batch after it.

Before, every request that changed capacity (a lease asked or released, a registration, an
agent's report) ran a placement pass of its own under the placement lock, and every lease
that ended was metered in a transaction of its own that locked its labs' balance rows: at
200 simulated agents that was 1,500 passes a minute, and requests queued behind one
another's passes and balance rows (issue 14's load benchmark). Now a request commits its
change in a short unit and asks: for a pass, or for its lease ids to be metered. A caller
that must answer with the result (a scale request returns its leases' states) waits for a
batch that started after its change committed, bounded by a timeout; the others only ask
(an agent's report of an ended lease is answered before its charge is booked: the charge
follows in the next batch, or the leader's periodic pass, which charges every ended lease
not yet charged).

A coalescer may space its batches: one starts at least ``spacing`` seconds after the one
before, and the asks in between are gathered into it (the end meterer: lease ends come in
bursts, and their charges can wait for the burst to pass). A lone ask after a quiet spell is
served at once; an urgent ask ends the wait; a spaced coalescer runs what it gathered before
it stops.

Without a running thread (a broker used as a library, or before the app starts) a batch runs
in the caller's thread, as before.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("parallex.broker")


class Coalescer:
    """Coalesces asks for a batch of work onto one thread.

    ``run_batch`` is one batch as a unit of work of its own (it takes its locks and
    commits); it gets the union of the items the asks it serves brought (empty when the
    work has none, as a placement pass). Tickets count asks: a batch started after ask
    number N serves it."""

    def __init__(self, run_batch: Callable[[set], object], name: str, spacing: float = 0.0):
        self._run_batch = run_batch
        self._items: set = set()
        self._name = name
        #: Seconds at least from one batch's start to the next one's (0: none).
        self._spacing = spacing
        self._last_start = -math.inf  # monotonic
        self._urgent = False  # an ask that must not wait for the spacing
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out
        self._done = 0  # every ticket up to this one has been served by a finished pass
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Requests waiting on the event loop for their ticket, resolved after a batch.
        self._async_waiters = CountWaiters(self._cond, lambda ticket: self._done >= ticket)
        #: When the batch under way on the thread began (monotonic; None between batches),
        #: and whether the last one raised: a caller that answers before its batch (agents'
        #: repeated heartbeats, service.py) waits instead while batches stall or fail.
        self.busy_since: float | None = None
        self.last_failed = False
        #: Batches run and asks served, for the metrics and the tests.
        self.passes = 0
        self.asks = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run batches on a thread of their own from now on."""
        with self._cond:
            if self.running:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch under way (and, spaced, one with what it gathered) and stop;
        later asks run in the caller's thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def ask(self, items: set | frozenset = frozenset(), urgent: bool = False) -> int:
        """Ask for a batch with ``items`` (after the caller's change committed); returns the
        ticket to wait for. ``urgent``: the batch does not wait for its spacing. Without the
        thread the batch runs here and now."""
        with self._cond:
            self.asks += 1
            self._asked += 1
            ticket = self._asked
            if self.running:
                self._items |= items
                self._urgent = self._urgent or urgent
                self._cond.notify_all()
                return ticket
        self._run_inline(ticket, set(items))
        return ticket

    def wait(self, ticket: int, timeout: float) -> bool:
        """Wait until a batch that started after ``ticket`` was asked has finished; False
        when ``timeout`` seconds passed first (the batch still comes, the caller just does
        not wait for it)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= ticket or not self.running,
                                       timeout) and self._done >= ticket

    @property
    def last_ticket(self) -> int:
        """The latest ask's ticket: a route that asked through a service method waits for
        this one (its own, or a later ask's, whose batch serves it too)."""
        with self._cond:
            return self._asked

    async def wait_async(self, ticket: int, timeout: float) -> bool:
        """``wait`` for a coroutine: the request waits on the event loop, holding no thread
        of the pool that answers other requests."""
        with self._cond:
            if self._done >= ticket or not self.running:
                return self._done >= ticket
        return await self._async_waiters.wait(ticket, timeout)

    def _release_async_waiters(self) -> None:
        """Resolve the coroutines whose ticket a finished batch served (caller holds the
        condition); all of them when stopping (their waits return False)."""
        self._async_waiters.release(everyone=self._stopping)

    def ask_and_wait(self, timeout: float, items: set | frozenset = frozenset(),
                     urgent: bool = False) -> bool:
        """Ask for a batch and wait for it (see ``wait``)."""
        return self.wait(self.ask(items, urgent), timeout)

    def _run_inline(self, ticket: int, items: set) -> None:
        self._run_batch(items)
        self._finished(ticket)

    def _finished(self, served: int) -> None:
        """A batch served every ask up to ``served``: release its waiters."""
        with self._cond:
            self.passes += 1
            self._done = max(self._done, served)
            self._release_async_waiters()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._asked > self._done or self._stopping)
                wait = self._last_start + self._spacing - time.monotonic()
                if wait > 0 and not self._stopping:
                    self._cond.wait_for(lambda: self._urgent or self._stopping, wait)
                # What a spaced coalescer gathered is run before it stops (the others'
                # askers are released unserved, as before).
                if self._stopping and not (self._spacing and self._asked > self._done):
                    self._release_async_waiters()
                    self._cond.notify_all()
                    return
                serving = self._asked  # every ask so far is served by this batch
                items, self._items = self._items, set()
                self._urgent = False
                self._last_start = time.monotonic()
            self.busy_since = self._last_start
            try:
                self._run_batch(items)
                self.last_failed = False
            except Exception:
                # A transient database error must not leave askers waiting for ever: they
                # are released, and the reaper's periodic passes pick up what was missed.
                logger.exception("%s: batch failed", self._name)
                self.last_failed = True
            finally:
                self.busy_since = None
            self._finished(serving)


class CountWaiters:
    """Coroutines waiting, each on its event loop, until a count reaches their number; the
    count's owner changes it holding ``cond`` and then calls ``release`` (from any thread).
    """

    def __init__(self, cond: threading.Condition, reached: Callable[[int], bool]):
        self._cond = cond
        self._reached = reached
        self._waiting: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = []

    async def wait(self, n: int, timeout: float) -> bool:
        """True once the count reaches ``n``; False after ``timeout`` seconds, or when
        released without it (the owner stops)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        entry = (n, loop, future)
        with self._cond:
            if self._reached(n):
                return True
            self._waiting.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
            with self._cond:
                return self._reached(n)
        except TimeoutError:
            return False
        finally:
            with self._cond:
                if entry in self._waiting:
                    self._waiting.remove(entry)

    def release(self, everyone: bool = False) -> None:
        """Resolve the waiters whose number the count reached, or all of them (the caller
        holds ``cond``)."""
        keep = []
        for n, loop, future in self._waiting:
            if everyone or self._reached(n):
                loop.call_soon_threadsafe(_resolve, future)
            else:
                keep.append((n, loop, future))
        self._waiting = keep


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
