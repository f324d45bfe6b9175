"""A worker interpreter started before its lease exists (the agent's warm pool).

Starting Python and importing distributed takes most of a worker's start-up (about 0.5 s of
the 0.8 s a cold `dask worker` needs here). A warm interpreter pays that while the machine is
idle, then blocks on one line of standard input. When a lease arrives the agent writes that
line: the lease's `dask worker` arguments, its folder, log file and environment. The
interpreter moves into the folder, sends its output to the lease's log and runs the worker;
from then on it is that lease's worker, exactly like a cold-started one (same process group,
same account, same command-line options; with setproctitle installed, distributed names both
"dask worker [address]" in ps).

Nothing secret travels on the pipe: the key and certificate are files in the lease's folder,
as for a cold start. End of input without an order (the agent stopped or shrank its pool)
exits at once.

Run by the agent only: python -m federation.warm_worker
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback

# The slow part, done before any lease exists.
import distributed  # noqa: F401
from distributed.cli import dask_worker


def _take_order(line: str) -> list[str]:
    """Apply the agent's order (folder, log, environment) and return the worker's arguments."""
    order = json.loads(line)
    os.chdir(order["cwd"])
    os.environ.update(order["env"])
    if order["env"].get("PYTHONPATH"):
        # The lease's own packages (federation.environment_cache) come first, as they do for
        # a cold-started worker; this interpreter read PYTHONPATH before the lease existed.
        sys.path[:0] = order["env"]["PYTHONPATH"].split(os.pathsep)
    tempfile.tempdir = None  # TMPDIR changed: forget the folder chosen at import
    log = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return [str(a) for a in order["args"]]


def _tell_lease_log(line: str, text: str) -> None:
    """Append ``text`` to the log the order names, if the order names one that opens."""
    with contextlib.suppress(Exception):
        log = os.open(json.loads(line)["log"], os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        try:
            os.write(log, text.encode(errors="replace"))
        finally:
            os.close(log)


def _say_ready() -> None:
    """The agent's readiness signal. The agent may have handed this interpreter a lease while
    it was still importing and closed the pipe (it reads no more once the lease is taken):
    that is no error. (print() raised BrokenPipeError there and the lease's worker exited
    with code 1 before it started: after Client.restart, every replacement worker handed a
    refilled, still-importing interpreter failed so, for up to a minute.)"""
    try:
        os.write(1, b"warm\n")  # unbuffered: nothing is left to flush into the lease's log
    except BrokenPipeError:
        pass


def main() -> int:
    _say_ready()
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    try:
        args = _take_order(line)
    except Exception:
        # This interpreter's stderr is still its warm file, which the agent removes once it
        # handed the order: the lease's log is where the agent reads why a worker ended
        # ("last log lines"), so the reason goes there if it can.
        _tell_lease_log(line, traceback.format_exc())
        return 1
    sys.argv = ["distributed.cli.dask_worker", *args]
    dask_worker.main(args=args, prog_name="dask worker")  # exits with the worker's code
    return 0


if __name__ == "__main__":
    sys.exit(main())
