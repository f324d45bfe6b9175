"""The request thread pool's threads, kept for the life of the broker server process.

Routes that are plain functions run on AnyIO's worker threads (40 at most). AnyIO ends a
thread idle for 10 s and starts a new one when a request finds none idle, and it starts it on
the event loop: ``Thread.start`` returns only once the new thread has run, which on a busy
machine waits for the interpreter lock. Under issue 14's load, sampling the loop thread's
stack whenever the loop ran over 150 ms late found the three longest stalls (0.3–0.9 s) there:
load that comes and goes (heartbeats every 5 s, metering every 30 s) kept ending threads and
starting them again. A thread kept idle costs its stack's memory only.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("parallex.broker")

#: Seconds an idle pool thread is kept (a day: for the life of the process in practice).
KEEP_IDLE_THREADS = 24 * 3600.0


def keep_idle_threads(seconds: float = KEEP_IDLE_THREADS) -> bool:
    """Keep AnyIO's idle worker threads ``seconds``; False (and a warning) when this AnyIO
    has no such setting, in which case its own default stays."""
    try:
        from anyio._backends._asyncio import WorkerThread
    except ImportError:
        WorkerThread = None
    if WorkerThread is None or not hasattr(WorkerThread, "MAX_IDLE_TIME"):
        logger.warning("this AnyIO cannot be told to keep its idle worker threads; requests "
                       "may wait while it starts new ones under load")
        return False
    WorkerThread.MAX_IDLE_TIME = seconds
    return True
