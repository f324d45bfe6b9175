"""A coalescer (the placer, the end-of-lease meterer) serves asks that arrive while a batch
runs with one batch after it, never with the batch that was already under way, and hands
that batch every item they brought."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from federation.broker.coalescer import Coalescer


class GatedPasses:
    """A pass that records which asks it could have seen and can be held open."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.seen: list[int] = []  # asks made before each pass started
        self.asks_made = 0
        self.lock = threading.Lock()

    def __call__(self, _items: set) -> None:
        with self.lock:
            self.seen.append(self.asks_made)
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"


@pytest.fixture
def gated():
    passes = GatedPasses()
    placer = Coalescer(passes, "test")
    placer.start()
    yield placer, passes
    passes.gate.set()
    placer.stop()


def test_asks_during_a_pass_are_served_by_one_pass_after_it(gated):
    placer, passes = gated
    first = placer.ask()
    assert passes.started.wait(5)
    # Ten asks while the first pass is held open: none may count as served by it.
    tickets = []
    for _ in range(10):
        with passes.lock:
            passes.asks_made += 1
        tickets.append(placer.ask())
    assert not placer.wait(tickets[-1], timeout=0.2)  # the open pass does not serve them
    passes.gate.set()
    assert placer.wait(first, timeout=5)
    assert all(placer.wait(t, timeout=5) for t in tickets)
    assert placer.passes == 2
    # The pass that served the ten started after all of them were asked.
    assert passes.seen == [0, 10]


def test_waiters_on_many_threads_all_return_after_their_pass(gated):
    placer, passes = gated
    passes.gate.set()
    results: list[bool] = []

    def ask() -> None:
        results.append(placer.ask_and_wait(timeout=5))

    threads = [threading.Thread(target=ask) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [True] * 40
    assert 1 <= placer.passes <= 40


def test_a_failing_pass_releases_its_waiters_and_the_next_ask_runs_again():
    calls: list[int] = []

    def flaky(_items: set) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database went away")

    placer = Coalescer(flaky, "test")
    placer.start()
    try:
        assert placer.ask_and_wait(timeout=5)  # released, though the pass failed
        assert placer.ask_and_wait(timeout=5)
        assert len(calls) == 2
    finally:
        placer.stop()


def test_without_its_thread_a_pass_runs_in_the_callers_thread():
    callers: list[str] = []
    placer = Coalescer(lambda _items: callers.append(threading.current_thread().name), "test")
    ticket = placer.ask()
    assert callers == [threading.current_thread().name]
    assert placer.wait(ticket, timeout=0)


def test_a_batch_gets_every_item_its_asks_brought():
    batches: list[set] = []
    gate, started = threading.Event(), threading.Event()

    def run(items: set) -> None:
        batches.append(set(items))
        started.set()
        assert gate.wait(10)

    coalescer = Coalescer(run, "test")
    coalescer.start()
    try:
        first = coalescer.ask({"a"})
        assert started.wait(5)
        tickets = [coalescer.ask({f"x{i}"}) for i in range(5)] + [coalescer.ask()]
        gate.set()
        assert coalescer.wait(first, 5) and all(coalescer.wait(t, 5) for t in tickets)
        assert batches == [{"a"}, {f"x{i}" for i in range(5)}]
    finally:
        gate.set()
        coalescer.stop()


def test_a_coroutine_waits_on_its_loop_for_the_batch_after_its_ask(gated):
    placer, passes = gated

    async def scenario() -> tuple[bool, bool]:
        first = placer.ask()
        assert passes.started.wait(5)
        with passes.lock:
            passes.asks_made += 1
        mine = placer.ask()
        # The batch under way does not serve it: still waiting after a short bound.
        early = await placer.wait_async(mine, timeout=0.2)
        passes.gate.set()
        late = await placer.wait_async(mine, timeout=5)
        assert placer.wait(first, 5)
        return early, late

    assert asyncio.run(scenario()) == (False, True)
    assert passes.seen == [0, 1]


def test_stopping_releases_coroutines_that_wait():
    gate = threading.Event()
    coalescer = Coalescer(lambda _items: gate.wait(10), "test")
    coalescer.start()

    async def scenario() -> tuple[bool, float]:
        ticket = coalescer.ask()
        stopper = threading.Thread(target=coalescer.stop)
        asyncio.get_running_loop().call_later(0.1, stopper.start)
        asyncio.get_running_loop().call_later(0.2, gate.set)
        started = time.monotonic()
        served = await coalescer.wait_async(ticket + 1, timeout=30)
        return served, time.monotonic() - started

    served, waited = asyncio.run(scenario())
    # Released by the stop, not served, and not by its own timeout (30 s): well before it.
    assert served is False and waited < 15, waited


def test_spaced_batches_gather_the_asks_in_between_and_an_urgent_one_ends_the_wait():
    """The end meterer's batches are spaced: a lone ask is served at once, the asks that
    follow within ``spacing`` seconds of that batch's start are one batch after it, and an
    urgent ask (an agent going offline waits for its leases' charges) runs it at once."""
    batches: list[set] = []
    ran = threading.Semaphore(0)

    def run(items: set) -> None:
        batches.append(set(items))
        ran.release()

    coalescer = Coalescer(run, "test", spacing=30)
    coalescer.start()
    try:
        assert coalescer.ask_and_wait(5, {"ls-first"})  # after a quiet spell: at once
        assert ran.acquire(timeout=0)
        tickets = [coalescer.ask({f"ls-{i}"}) for i in range(5)]
        # Within 30 s of the first batch: nothing runs within a bound far shorter.
        assert not ran.acquire(timeout=0.3)
        started = time.monotonic()
        assert coalescer.ask_and_wait(10, {"ls-urgent"}, urgent=True)
        assert time.monotonic() - started < 10
        assert all(coalescer.wait(t, 0) for t in tickets)
        assert batches == [{"ls-first"}, {f"ls-{i}" for i in range(5)} | {"ls-urgent"}]
    finally:
        coalescer.stop()


def test_a_spaced_coalescer_runs_what_it_gathered_before_it_stops():
    batches: list[set] = []
    coalescer = Coalescer(lambda items: batches.append(set(items)), "test", spacing=30)
    coalescer.start()
    assert coalescer.ask_and_wait(5, {"ls-0"})
    ticket = coalescer.ask({"ls-1", "ls-2"})
    started = time.monotonic()
    coalescer.stop()
    assert time.monotonic() - started < 10  # not the 30 s of its spacing
    assert batches == [{"ls-0"}, {"ls-1", "ls-2"}]
    assert coalescer.wait(ticket, 0)
