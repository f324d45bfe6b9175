"""On PostgreSQL the leader's periodic passes (metering, capacity samples) and its placement
passes run in processes of their own, so that their Python work never holds the request
process's interpreter lock; the processes end with the broker, whether it stops or is
killed."""

from __future__ import annotations

import os
import signal

import httpx
import psutil
import pytest
from sqlalchemy import text

from accounting.models import utcnow
from federation.broker.db import plain_engine
from federation.broker.periodic_process import PeriodicProcessStopped
from tests.federation.test_replicas import metric
from tests.utils.in_process import in_process_broker
from tests.utils.procs import process_ended, start_broker, wait_until

ADMIN = "test-admin-token-0123456789"
FAST_PASSES = ("--metering-interval", "1", "--capacity-interval", "1")


def broker_children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def pass_processes(pid: int, name: str = "parallex-period") -> list[psutil.Process]:
    """The periodic pass processes among ``pid``'s children (by the name the child gives
    itself; ``parallex-placer`` is the placement process's)."""
    return [c for c in broker_children(pid) if not process_ended(c) and child_name(c) == name
            and "spawn_main" in " ".join(c.cmdline())]


def child_name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.parametrize("ending", ["stop", "kill"])
def test_the_periodic_passes_run_in_a_process_that_ends_with_the_broker(tmp_path, postgres_url,
                                                                          ending):
    # Timeouts of 6 s make the reaper tick every second (a sixth of them), so the passes
    # that are due each second come each second.
    proc, url = start_broker(tmp_path, ADMIN, db_url=postgres_url, extra=FAST_PASSES,
                             provider_timeout=6, cluster_timeout=6)
    engine = plain_engine(postgres_url)
    try:
        # A lab with a machine, so that capacity samples have something to write.
        admin = {"Authorization": f"Bearer {ADMIN}"}
        httpx.post(f"{url}/api/v1/labs", json={"name": "lab-a"}, headers=admin,
                   timeout=30).raise_for_status()
        token = httpx.post(f"{url}/api/v1/tokens", json={"kind": "provider", "lab": "lab-a"},
                           headers=admin, timeout=30).raise_for_status().json()["token"]
        httpx.post(f"{url}/api/v1/agent/register", timeout=30,
                   json={"name": "box", "cpus": 4, "memory": 2**33},
                   headers={"Authorization": f"Bearer {token}"}).raise_for_status()
        wait_until(lambda: metric(url, ADMIN, "parallex_metering_pass_seconds_count") >= 2, 60,
                   "two metering passes")
        children = broker_children(proc.pid)
        assert len(pass_processes(proc.pid)) == 1, [c.cmdline() for c in children]
        assert len(pass_processes(proc.pid, "parallex-placer")) == 1, children
        # The periodic passes yield the cores to the requests (--periodic-niceness, 10 by
        # default); placement answers scale requests and keeps the broker's niceness.
        niceness = psutil.Process(proc.pid).nice()
        assert pass_processes(proc.pid)[0].nice() == min(19, niceness + 10)
        assert pass_processes(proc.pid, "parallex-placer")[0].nice() == niceness
        with engine.connect() as c:
            wait_until(lambda: c.execute(text("SELECT count(*) FROM capacitysample")).scalar(),
                       30, "a capacity sample")
        if ending == "stop":
            # Shut down cleanly (uvicorn re-raises the SIGTERM it handled, after shutdown).
            assert proc.stop() in (0, -signal.SIGTERM)
            assert "Traceback" not in proc.log_text()
        else:
            proc.kill9()
        # The pass processes and multiprocessing's helper end with the broker.
        wait_until(lambda: all(process_ended(c) for c in children), 30,
                   f"the broker's child processes to end after a {ending}")
    finally:
        proc.stop()
        engine.dispose()


def test_a_reaper_tick_after_shutdown_starts_no_process(postgres_url):
    """The reaper's thread may still be in its tick when the broker shuts down: the passes
    it then asks for run nowhere (the next leader runs them), quietly, and start no new
    process after the old one ended."""
    with in_process_broker(postgres_url, 1) as b:
        broker = b.app.state.broker
        broker.reap()  # leads from the start: its metering pass, due, starts the process
        wait_until(lambda: pass_processes(os.getpid()), 60, "the periodic process")
    assert not pass_processes(os.getpid())
    assert not pass_processes(os.getpid(), "parallex-placer")
    with pytest.raises(PeriodicProcessStopped):
        broker.periodic.meter(utcnow())
    broker.reap()  # due metering and capacity passes, refused without a traceback
    assert not pass_processes(os.getpid())


#: A broker (here a bare process) that starts its child process and is killed at once, while
#: the child is still importing: it prints the child's pid, then SIGKILLs itself.
_DIES_WHILE_ITS_CHILD_STARTS = """
import os, signal, sys
from federation.broker.db import plain_engine
from federation.broker.periodic_process import BrokerChildProcess
from federation.broker.placement_process import _warm
from federation.broker.settings import BrokerSettings

child = BrokerChildProcess(plain_engine(sys.argv[1]), BrokerSettings(), "periodic")
pool = child._executor()
pool.submit(_warm)
print(*pool._processes, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_child_whose_broker_dies_while_it_starts_ends_too(tmp_path):
    """The broker killed while its child process is still starting (a replica killed in
    the second after it led or placed): the child, orphaned before it knew its parent, still
    ends. It watched whichever process was its parent once started, so it watched init and
    stayed for ever (found after a full suite run)."""
    import subprocess
    import sys

    # Its output to a file: the child inherits it, so a pipe would stay open while it lives.
    out = tmp_path / "broker.out"
    with open(out, "w") as sink:
        broker = subprocess.run([sys.executable, "-c", _DIES_WHILE_ITS_CHILD_STARTS,
                                 f"sqlite:///{tmp_path / 'db.sqlite'}"],
                                stdout=sink, stderr=subprocess.STDOUT, timeout=60)
    assert broker.returncode == -signal.SIGKILL, out.read_text()
    child = psutil.Process(int(out.read_text().split()[0]))
    try:
        wait_until(lambda: process_ended(child), 30,
                   "the orphaned child process to end by itself")
    finally:
        if not process_ended(child):
            child.kill()
