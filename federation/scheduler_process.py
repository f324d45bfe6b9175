"""The process a FederatedCluster's scheduler runs in: ``python -m federation.scheduler_process``.

Started by FederatedCluster in the user's own account. Its protocol with the parent is small:

- stdin, first line: the JSON settings (KeeperSettings, with the CA's key: a pipe, never argv
  or a file, so other accounts cannot read it) and the Dask configuration to use;
- stdout: one JSON line, ``{"address": …, "cluster_id": …}`` once the scheduler listens and the
  broker knows the cluster, or ``{"error": <exception class>, "message": …}``; nothing after;
- stdin's end: the parent closed the cluster or died (a killed kernel, a script that returned
  without close()). The leases are ended at once and the process exits, so no worker is left
  running — and charged — until the broker's cluster timeout.

Logging goes to stderr, which the parent points at its log file (the Parallex kernel's) or
leaves as its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from typing import Any


def _report(fd: int, message: dict) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(message) + "\n")


def _watch_parent(loop: asyncio.AbstractEventLoop, gone: asyncio.Event) -> None:
    """Block on stdin until it ends (the parent closed it or died), then set ``gone``."""
    while sys.stdin.buffer.read(65536):
        pass
    loop.call_soon_threadsafe(gone.set)


async def _serve(settings: dict, report_fd: int) -> int:
    from .lease_keeper import KeeperSettings, LeaseKeeper

    keeper = LeaseKeeper(KeeperSettings(**settings))
    try:
        await keeper.start()
    except Exception as exc:  # reported to the parent, which raises it for the user
        logging.getLogger("parallex.cluster").info("could not start: %s", exc)
        _report(report_fd, {"error": type(exc).__name__, "message": str(exc)})
        await keeper.close()
        return 1
    _report(report_fd, {"address": keeper.scheduler.address, "cluster_id": keeper.cluster_id,
                        "pid": os.getpid(), "dashboard_path": keeper.dashboard_path})
    gone = asyncio.Event()
    threading.Thread(target=_watch_parent, args=(asyncio.get_running_loop(), gone),
                     name="parallex-parent-watch", daemon=True).start()
    finished = asyncio.create_task(keeper.scheduler.finished())
    waiting = asyncio.create_task(gone.wait())
    await asyncio.wait({finished, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    await keeper.close()
    return 0


def main() -> int:
    """Read the settings, serve the scheduler until the parent goes, return the exit code."""
    # stdout carries exactly one line for the parent; anything else printed here (a function
    # run on the scheduler, a library's print) goes to stderr instead of into that pipe.
    report_fd = os.dup(1)
    os.dup2(2, 1)
    # The user's Ctrl-C or a kernel interrupt is for their code; the parent closes us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    first = json.loads(sys.stdin.readline() or "null")
    if not isinstance(first, dict):
        _report(report_fd, {"error": "ParallexError", "message": "no settings on stdin"})
        return 2
    import dask.config

    dask_config: dict[str, Any] = first.get("dask_config") or {}
    dask.config.update(dask.config.config, dask_config, priority="new")
    import distributed  # noqa: F401  (sets up Dask's logging before ours)

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s scheduler[%(process)d] %(name)s %(levelname)s %(message)s"))
    parallex = logging.getLogger("parallex")
    parallex.addHandler(handler)
    parallex.setLevel(logging.INFO)
    parallex.propagate = False
    from .latency import apply_scheduler_settings

    try:
        # Before the scheduler exists: it reads its settings when it is made.
        apply_scheduler_settings()
    except ValueError as exc:
        _report(report_fd, {"error": "ParallexError", "message": str(exc)})
        return 2
    return asyncio.run(_serve(first["settings"], report_fd))


if __name__ == "__main__":
    sys.exit(main())
