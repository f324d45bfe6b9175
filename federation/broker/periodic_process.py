"""The leader's periodic passes (metering, capacity samples) in a process of their own, on
PostgreSQL.

A metering pass over 10,000 running leases is about a second of Python (rows, prices, ledger
entries); a capacity sample reads every online provider and held lease. On a thread of the
request process they held the interpreter lock against the event loop and the request
threads: in issue 14's load benchmark the pass took 3–5 s there, and a run without metering
answered the lone agent's heartbeats with a p99 of 1.3 s against 1.6 s. A process of its own
competes only for a core, which the operating system shares fairly, so a periodic pass no
longer delays a heartbeat or a scale request inside the broker.

The process is spawned (not forked: the broker has threads and open connections) on the first
pass, opens its own engine on the broker's database, and ends with the broker: a clean stop
shuts it down after the pass under way, and if the broker is killed the process notices within
a second and exits (the pass under way is rolled back). SQLite keeps the passes on the
broker's thread: it has one writer, which the broker's exclusive section serialises within one
process only.

``BrokerChildProcess`` is that machinery for any such child; the placement passes use it too
(placement_process.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from sqlalchemy.engine import Engine

from .capacity import record_capacity
from .db import plain_engine, session
from .metering_runs import meter_pass
from .settings import BrokerSettings

#: Seconds between the child's checks that the broker still runs.
PARENT_CHECK = 1.0

#: The child's engine and settings (set by ``_start`` in the child process only).
_child: dict[str, object] = {}


def _start(url: str, settings: BrokerSettings, log_level: int, title: str,
           broker_pid: int, niceness: int) -> None:
    """The child's set-up; ``niceness`` is the one it must run at (absolute)."""
    # A stop signal to the broker's process group (systemd, ``parallex up``) must not end a
    # pass halfway: the broker's shutdown ends this process after the pass.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s [{title}]: %(message)s")
    # The name ps and top show (Linux; 15 characters at most): which child is which.
    with contextlib.suppress(OSError):
        with open("/proc/self/comm", "w") as comm:
            comm.write(f"parallex-{title}"[:15])
    # Absolute, not added: the child inherits the niceness of the broker thread that spawned
    # it, and those run behind the event loop (thread_priority.py). Lowering it back needs
    # privilege: without it the child stays as niced as that thread.
    with contextlib.suppress(PermissionError):
        if os.getpriority(os.PRIO_PROCESS, 0) != niceness:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
    _child["engine"] = plain_engine(url)
    _child["settings"] = settings
    # The broker's pid as the broker gave it, not os.getppid() read here: a broker killed
    # while this process was still importing has left it to init already, and watching init
    # kept it alive for ever.
    threading.Thread(target=_end_with_the_broker, args=(broker_pid,), daemon=True,
                     name="parallex-periodic-watchdog").start()


def _end_with_the_broker(broker_pid: int) -> None:
    """Exit once the broker is gone (killed: nothing shut this process down, and its pool's
    pipes stay open here). A pass under way then ends unfinished: its transaction is rolled
    back, and the next leader's pass charges those periods."""
    while os.getppid() == broker_pid:
        time.sleep(PARENT_CHECK)
    os._exit(0)


def _meter(now: dt.datetime) -> int | None:
    """A periodic metering pass in the child (``meter_pass``)."""
    return meter_pass(_child["engine"], _child["settings"], now)  # type: ignore[arg-type]


def _sample_capacity() -> int:
    with session(_child["engine"]) as s:  # type: ignore[arg-type]
        rows = record_capacity(s)
        s.commit()
    return rows


class PeriodicProcessStopped(RuntimeError):
    """A periodic pass asked for after the broker began to shut down (the reaper's thread
    may still be in its tick): nothing runs."""


class BrokerChildProcess:
    """One child process, spawned on first use, whose calls block the calling thread until
    they are done (the thread waits without the interpreter lock). ``title`` names the child
    in its log lines and, on Linux, in ps (``parallex-<title>``); ``niceness`` is added to
    the broker process's niceness (its event loop's), whichever of its threads spawns it."""

    def __init__(self, engine: Engine, settings: BrokerSettings, title: str,
                 niceness: int = 0):
        self._url = engine.url.render_as_string(hide_password=False)
        self._settings = settings
        self._title = title
        # Work that is due every interval, not answered to anyone: on a saturated machine the
        # request processes should have the cores first (issue 14's load benchmark). Added
        # to the broker process's own (its main thread's, which runs the event loop).
        self._niceness = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + niceness)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._stopped:
                raise PeriodicProcessStopped("the broker is shutting down")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start,
                    initargs=(self._url, self._settings, logging.getLogger().level,
                              self._title, os.getpid(), self._niceness))
            return self._pool

    def _submit(self, fn, *args) -> Future:
        try:
            return self._executor().submit(fn, *args)
        except BrokenProcessPool:
            self._forget_broken()
            raise

    def _run(self, fn, *args):
        future = self._submit(fn, *args)
        try:
            return future.result()
        except BrokenProcessPool:
            # The child died (killed, out of memory): the next call starts a new one.
            self._forget_broken()
            raise

    def _forget_broken(self) -> None:
        with self._lock:
            self._pool = None

    def stop(self) -> None:
        """Wait for a pass under way, then end the process."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._stopped = True
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class PeriodicProcess(BrokerChildProcess):
    """Runs the periodic passes in one child process, started on first use; each call
    blocks its (reaper) thread until the pass is done, as the pass on the thread did."""

    def __init__(self, engine: Engine, settings: BrokerSettings):
        super().__init__(engine, settings, "periodic", settings.periodic_niceness)

    def meter(self, now: dt.datetime) -> int | None:
        """A periodic metering pass up to ``now``; the periods recorded, None on a collision
        with another meterer."""
        return self._run(_meter, now)

    def sample_capacity(self) -> int:
        """One capacity sample per lab; the rows written."""
        return self._run(_sample_capacity)
