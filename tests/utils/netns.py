"""A small internet on one machine, from Linux network namespaces, for tests.

Three namespaces: ``hub`` (JupyterHub, the broker, the gateway, users' servers, kernels and
schedulers), ``lab-a`` and ``lab-b`` (one provider agent each). Each lab has a veth link to
the hub and one route: to the hub's public address, where only the broker and the gateway
listen. The hub does not forward, and has no route a lab could use to reach the other lab;
everything else in the hub listens on its own loopback. So a lab can open connections to the
broker and the gateway and to nothing else, as behind a campus firewall that allows one
outbound port. (The hub could still dial a lab: namespaces without a firewall have no NAT;
the tests check instead that nothing on a lab listens for connections.)

The test process itself moves its main thread into ``hub`` (``enter``): the processes it then
starts, the browser included, and the connections it opens are on the hub's network. Lab
programs run under ``nsenter --net`` (not ``ip netns exec``, which would remount /sys and hide
the cgroup hierarchies the agent uses).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

#: The hub's public address: the broker's and the gateway's.
HUB_PUBLIC = "10.213.0.1"
LABS = ("lab-a", "lab-b")
_CLONE_NEWNET = 0x40000000


class NamespacesUnavailable(RuntimeError):
    """This machine (or this account) cannot create network namespaces."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NamespacesUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class SmallInternet:
    """The three namespaces and their links; ``build`` makes them, ``destroy`` removes them."""

    def __init__(self) -> None:
        tag = str(os.getpid())[-7:]
        self.tag = tag
        self.names = {"hub": f"px{tag}-hub", **{lab: f"px{tag}-{lab}" for lab in LABS}}
        self._made: list[str] = []

    def lab_address(self, lab: str) -> str:
        """The lab machine's own address (on its link to the hub)."""
        return f"10.213.{LABS.index(lab) + 1}.2"

    def hub_link_address(self, lab: str) -> str:
        """The hub's end of ``lab``'s link."""
        return f"10.213.{LABS.index(lab) + 1}.1"

    def build(self) -> SmallInternet:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
            raise NamespacesUnavailable("network namespaces need root, iproute2's `ip` and "
                                        "util-linux's `nsenter`")
        try:
            for name in self.names.values():
                _ip("netns", "add", name)
                self._made.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
            hub = self.names["hub"]
            _ip("-n", hub, "addr", "add", f"{HUB_PUBLIC}/32", "dev", "lo")
            for n, lab in enumerate(LABS, 1):
                ns, hub_end, lab_end = self.names[lab], f"px{self.tag}h{n}", f"px{self.tag}l{n}"
                _ip("link", "add", hub_end, "type", "veth", "peer", "name", lab_end)
                _ip("link", "set", hub_end, "netns", hub)
                _ip("link", "set", lab_end, "netns", ns)
                _ip("-n", hub, "addr", "add", f"{self.hub_link_address(lab)}/30", "dev", hub_end)
                _ip("-n", ns, "addr", "add", f"{self.lab_address(lab)}/30", "dev", lab_end)
                _ip("-n", hub, "link", "set", hub_end, "up")
                _ip("-n", ns, "link", "set", lab_end, "up")
                # The one route out of the lab: to the hub's public address.
                _ip("-n", ns, "route", "add", f"{HUB_PUBLIC}/32", "via",
                    self.hub_link_address(lab))
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Remove the namespaces (their veth links go with them)."""
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self._made.clear()

    def prefix(self, where: str) -> list[str]:
        """The command prefix that runs a program on ``where``'s network."""
        return ["nsenter", f"--net=/run/netns/{self.names[where]}"]

    @contextlib.contextmanager
    def enter(self, where: str) -> Iterator[None]:
        """Move this thread (and what it starts from now on) onto ``where``'s network."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(f"/run/netns/{self.names[where]}")
            try:
                yield
            finally:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "could not return to the test's network")
        finally:
            os.close(own)

    def connects(self, where: str, host: str, port: int, timeout: float = 3.0) -> str:
        """Try a TCP connection from ``where`` to host:port: "ok", or why it failed
        ("refused", "unreachable", "timed out")."""
        probe = ("import socket, sys\n"
                 "try:\n"
                 f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close()\n"
                 "    print('ok')\n"
                 "except ConnectionRefusedError:\n    print('refused')\n"
                 "except TimeoutError:\n    print('timed out')\n"
                 "except OSError as e:\n    print('unreachable' if e.errno in (101, 113) "
                 "else f'error {e.errno}')\n")
        done = subprocess.run([*self.prefix(where), sys.executable, "-c", probe],
                              capture_output=True, text=True, timeout=timeout + 20)
        return done.stdout.strip() or done.stderr.strip()

    @contextlib.contextmanager
    def listener(self, where: str, host: str = "0.0.0.0") -> Iterator[int]:  # noqa: S104
        """A TCP listener on ``where`` (accepting and closing) for the duration; its port."""
        code = ("import socket\n"
                f"s = socket.create_server(({host!r}, 0))\n"
                "print(s.getsockname()[1], flush=True)\n"
                "while True:\n    s.accept()[0].close()\n")
        proc = subprocess.Popen([*self.prefix(where), sys.executable, "-c", code],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.strip().isdigit():
                raise AssertionError(f"the listener on {where} did not start")
            yield int(line)
        finally:
            proc.kill()
            proc.wait(10)

    def listening(self, where: str) -> list[str]:
        """The TCP sockets listening on ``where`` (as `ss -ltnp` prints them)."""
        done = subprocess.run([*self.prefix(where), "ss", "-Hltnp"], capture_output=True,
                              text=True, timeout=30)
        return [line for line in done.stdout.splitlines() if line.strip()]
