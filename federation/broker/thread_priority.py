"""A replica's event loop ahead of its other threads for the cores.

The event loop reads every request and answers agents' heartbeats; the replica's other
threads (the request pool's sync routes, the batches of heartbeats, reports and lease lists,
placement) do the database work. On a saturated machine all of them wait for a core, and a
heartbeat that only needs the loop waited behind the pool's threads of its own process
(issue 14's load benchmark, all users churning in the same 5 s). Linux schedules threads,
and niceness is per thread: the other threads get ``niceness`` more than the loop, so within
the replica's share of the machine (its scheduling group: a systemd service's cgroup, or its
session where the kernel groups by session) the loop runs first. Threads are created on
demand by libraries (AnyIO's pool), so the loop looks for new ones every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading

logger = logging.getLogger("parallex.broker")

#: Where Linux lists a process's threads.
TASKS = "/proc/self/task"
#: Seconds between looks for new threads.
EVERY = 1.0


def renice_new_threads(niceness: int, loop_thread: int, present: set[int],
                       done: set[int]) -> None:
    """Give every thread of this process but ``loop_thread`` and those in ``present`` (not
    the replica's: a test's own threads, when the app runs in a test process) ``niceness``
    more than the loop; ``done`` holds the threads already given it, and keeps only live
    ones."""
    base = os.getpriority(os.PRIO_PROCESS, loop_thread)
    live = {int(name) for name in os.listdir(TASKS)}
    done &= live
    for tid in sorted(live - done - present - {loop_thread}):
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, min(19, base + niceness))
        done.add(tid)


def listed_threads() -> bool:
    """Whether this system lists a process's threads (Linux)."""
    return os.path.isdir(TASKS)


def threads_before_app() -> set[int]:
    """Called on the event loop as the app starts: the threads that are not the replica's
    (a test process running the app in process has its own); none in the broker's own
    process, whose loop runs on its main thread."""
    if threading.current_thread() is threading.main_thread() or not listed_threads():
        return set()
    return {int(name) for name in os.listdir(TASKS)} - {threading.get_native_id()}


async def keep_threads_behind_loop(niceness: int, present: set[int]) -> None:
    """Run on the replica's event loop from its start: its other threads, those it has and
    those it starts later, run ``niceness`` behind it; ``present`` (``threads_before_app``)
    are left alone. Does nothing for 0 or where the system has no per-thread niceness."""
    if niceness <= 0 or not listed_threads():
        return
    loop_thread = threading.get_native_id()
    done: set[int] = set()
    while True:
        try:
            renice_new_threads(niceness, loop_thread, present, done)
        except OSError as exc:  # not allowed here (a container's seccomp): say so once
            logger.warning("could not set the niceness of the broker's threads: %s", exc)
            return
        await asyncio.sleep(EVERY)
