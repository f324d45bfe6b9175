"""Ending a child process with everything it started (`parallex up`, `parallex site`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil


def end_process_tree(popen: subprocess.Popen, timeout: float) -> None:
    """End ``popen`` (started with ``start_new_session``), its process group and whatever it
    started in sessions of its own.

    The group is signalled even when the child itself has exited (JupyterHub that failed at
    start leaves its proxy running in its group): SIGTERM, then SIGKILL to what is left after
    ``timeout``. Then the descendants that sat in sessions of their own (JupyterHub's managed
    services; a hub stopped while still starting does not stop them) get the same.
    """
    group = popen.pid
    started: list[psutil.Process] = []
    if popen.poll() is None:  # not reaped, so the pid is still the child's
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(group).children(recursive=True)
    deadline = time.monotonic() + timeout
    _signal_group(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout)
    while _signal_group(group, 0) and time.monotonic() < deadline:
        time.sleep(0.05)  # a group has no handle to wait on; bounded by the deadline
    if _signal_group(group, signal.SIGKILL):
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(10)
    end_processes(started, max(deadline - time.monotonic(), 1.0))


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to a process group; whether any process of it was there to get it."""
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def end_processes(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM those of ``procs`` still running, then SIGKILL those left after ``timeout``."""
    running = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            running.append(proc)
    _, left = psutil.wait_procs(running, timeout=timeout)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
