"""Local TCP ports for the processes `parallex up` (and the tests) start on 127.0.0.1."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below the ephemeral range there is room for this many tries before falling back to it.
_TRIES = 64
_LOWEST = 10_000


def _ephemeral_low() -> int:
    """The first port of the range outgoing connections take their local port from."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default; other systems differ, and then port 0 still works


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` now (a port in TIME_WAIT counts as free,
    as it does for the servers we start, which all set SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now, for a child process to bind later.

    Taken from below the ephemeral range where there is room: a port there can only be taken
    by another listener before the child binds it, whereas any outgoing connection on the
    machine may take an ephemeral one (a hub failed to start with EADDRINUSE that way while
    another test process was busy). Callers that start a server on it still retry on a
    conflict (`federation.up`), since another program may pick the same port.
    """
    low = _ephemeral_low()
    if low - _LOWEST > 1_000:
        for _ in range(_TRIES):
            port = random.randrange(_LOWEST, low)
            if not port_in_use(port):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
