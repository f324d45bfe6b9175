"""`parallex up`'s children: a port already in use is said at once, and stopping a child ends
everything it started, even when it exited first or put a process in a session of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from federation.ports import free_port, port_in_use
from federation.up import Child, PortTaken

# A parent that starts a sleeper in its own process group (and one in a session of its own
# with --own-session), prints their ids, and then exits (with --exit) or waits.
SPAWNER = """
import subprocess, sys, time
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
own = "--own-session" in sys.argv
kid = subprocess.Popen(sleeper, start_new_session=own)
print("KIDS", kid.pid, flush=True)
if "--exit" not in sys.argv:
    time.sleep(600)
"""


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _still_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("flags", [["--exit"], ["--own-session"]],
                         ids=["parent-exited", "own-session"])
def test_stopping_a_child_ends_what_it_started(tmp_path: Path, flags: list[str]):
    child = Child("spawner", [sys.executable, "-c", SPAWNER, *flags], tmp_path / "spawner.log",
                  {})
    kid = int(child.read_value("KIDS ", timeout=30))
    try:
        if "--exit" in flags:
            child.popen.wait(30)  # the parent is gone; its sleeper is left in its group
        assert _still_running(kid)
        child.stop(timeout=10)
        assert not _still_running(kid)
    finally:
        if _still_running(kid):
            psutil.Process(kid).kill()


def test_a_child_whose_port_is_taken_says_so_without_waiting(tmp_path: Path, busy_port: int):
    listener = (f"import socket; s = socket.socket(); s.bind(('127.0.0.1', {busy_port})); "
                "print('READY', flush=True)")
    child = Child("listener", [sys.executable, "-c", listener], tmp_path / "listener.log", {})
    try:
        started = time.monotonic()
        with pytest.raises(PortTaken, match="listener could not listen: its port was already"):
            child.read_value("READY ", timeout=60)
        assert time.monotonic() - started < 30  # not the 60 s readiness timeout
    finally:
        child.stop(timeout=10)


def test_a_log_from_an_earlier_run_does_not_count(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text("OSError: [Errno 98] Address already in use\n")  # last run's failure
    child = Child("server", [sys.executable, "-c", "print('READY 1', flush=True)"], log, {})
    try:
        assert child.read_value("READY ", timeout=30) == "1"
        assert not child.port_taken()
    finally:
        child.stop(timeout=10)


@pytest.mark.parametrize("option, extra", [("--hub-port", []), ("--port", ["--no-hub"])])
def test_up_on_a_port_in_use_says_which_and_starts_nothing(tmp_path: Path, busy_port: int,
                                                          option: str, extra: list[str]):
    data = tmp_path / "data"
    done = subprocess.run([sys.executable, "-m", "federation.cli", "up", "--data-dir", str(data),
                           "--providers", "1", option, str(busy_port), *extra],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert (f"error: port {busy_port} ({option}) is already in use on 127.0.0.1; stop what "
            f"listens there or choose another {option} (0 picks a free port)") in done.stderr
    assert not data.exists()  # refused before anything was written or started


def test_free_ports_are_free_and_outside_the_ephemeral_range():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # picked at random, not one port for every caller
    for port in ports:
        assert not port_in_use(port)
        if low > 11_000:
            assert 10_000 <= port < low
