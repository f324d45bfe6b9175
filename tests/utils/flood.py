"""One token flooding the broker: many connections polling an agent's lease list with a
stale version (or reading another path) as fast as the broker answers, on a thread of their
own, until stopped. The rate-limit tests check what the flood gets; benchmarks/flood.py
measures what it costs others."""

from __future__ import annotations

import asyncio
import threading

import httpx


class Flood:
    """Use as a context manager: the flood runs inside the block and has ended after it.
    ``statuses`` counts its answers by HTTP status; ``retry_after`` holds the Retry-After
    values its 429s carried, ``messages`` their messages."""

    def __init__(self, url: str, token: str, provider_id: str | None, connections: int = 50,
                 path: str | None = None, params: dict | None = None):
        self.url, self.token = url, token
        # By default an agent's lease list with a stale version; else ``path`` (GET).
        self.path = path or f"/agent/{provider_id}/leases"
        self.params = params if path else {"since": "stale", "wait": 0}
        self.connections = connections
        self.statuses: dict[int, int] = {}
        self.retry_after: set[str] = set()
        self.messages: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="flood")

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _one(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            answer = await client.get(self.path, params=self.params)
            self.statuses[answer.status_code] = self.statuses.get(answer.status_code, 0) + 1
            if answer.status_code == 429:
                self.retry_after.add(answer.headers.get("retry-after", ""))
                self.messages.add(answer.json()["message"])

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=f"{self.url}/api/v1", timeout=30,
                                     headers={"Authorization": f"Bearer {self.token}"},
                                     limits=httpx.Limits(max_connections=self.connections)
                                     ) as client:
            await asyncio.gather(*(self._one(client) for _ in range(self.connections)))
