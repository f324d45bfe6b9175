"""A TCP relay that delays each direction by half a set round-trip time: WAN latency for the
benchmarks on a machine whose kernel has no netem.

    python -m tests.utils.delay_relay HOST:PORT [HOST:PORT ...]

listens on one free port of 127.0.0.1 per target and prints ``RELAY <port> <port> ...``; then
each line it reads on standard input sets the round trip in milliseconds (0 at start), for new
and open connections alike, and is answered ``RTT <ms>``. Bytes keep their order and are never
held longer than the delay: each chunk read is written once its time has come, so throughput is
the links' own and only latency is added.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class DelayRelay:
    """Relays connections to ``targets``, each direction delayed by ``rtt / 2`` seconds."""

    def __init__(self, targets: list[tuple[str, int]]):
        self.targets = targets
        self.rtt = 0.0
        self.ports: list[int] = []
        self._servers: list[asyncio.Server] = []

    async def start(self) -> list[int]:
        for host, port in self.targets:
            server = await asyncio.start_server(
                lambda r, w, h=host, p=port: self._relay(r, w, h, p), "127.0.0.1", 0)
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        return self.ports

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     host: str, port: int) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                data = await src.read(1 << 16)
                queue.put_nowait((loop.time() + self.rtt / 2, data))
                if not data:
                    break
            await delivering
        except (OSError, asyncio.CancelledError):
            delivering.cancel()
        finally:
            dst.close()


class Relay:
    """The delay relay in a process of its own (so it does not share this one's GIL)."""

    def __init__(self, targets: list[tuple[str, int]]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.utils.delay_relay",
             *(f"{h}:{p}" for h, p in targets)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "RELAY", f"the relay did not start: {line}"
        self.ports = [int(p) for p in line[1:]]

    def set_rtt(self, ms: float) -> None:
        self.proc.stdin.write(f"{ms}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer == f"RTT {ms:g}", answer

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


async def _main(targets: list[tuple[str, int]]) -> None:
    relay = DelayRelay(targets)
    ports = await relay.start()
    print("RELAY", *ports, flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        relay.rtt = float(line) / 1000
        print(f"RTT {float(line):g}", flush=True)


def main() -> None:
    targets = []
    for arg in sys.argv[1:]:
        host, _, port = arg.rpartition(":")
        targets.append((host, int(port)))
    asyncio.run(_main(targets))


if __name__ == "__main__":
    main()
