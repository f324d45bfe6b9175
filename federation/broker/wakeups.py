"""Wake-ups: agents and clusters long-poll for a change of what concerns them.

Each key (a provider id, or ``cluster:<id>``) has a version that changes on every change to
its lease list that its poller did not make itself (an agent's own reports of its leases do
not wake it: agent_batches.Reported); a long poll returns as soon as the version differs
from the one it saw, and then reads the whole list as it is.
Changes happen in FastAPI's thread pool and polls wait on the event loop, so versions and
events change under a lock and events are set on the loop that waits on them
(``asyncio.Event`` is not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable


class Wakeups:
    """Versions of keys' lease lists and the long polls waiting for them to change."""

    def __init__(self, boot_id: str):
        self.boot_id = boot_id  # a restarted broker's versions never equal an old one's
        self._versions: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._lock = threading.Lock()
        #: The loop long polls wait on (set when the app starts).
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Tells other broker replicas of changes (replicas.WakeupRelay.send), if any.
        self.relay: Callable[[set[str]], None] | None = None
        #: Long polls waiting now (the metric parallex_long_polls_waiting).
        self.waiting = 0
        self._closing = False

    def version(self, key: str) -> str:
        """Opaque version of the key's lease list; it changes on every change to it."""
        return f"{self.boot_id}:{self._versions.get(key, 0)}"

    def bump(self, key: str | None, forward: bool = True) -> None:
        """Mark a change of the key's lease list and wake its long poll (any thread); with
        ``forward``, other replicas are told too."""
        if key is None:
            return
        if forward and self.relay is not None:
            self.relay({key})
        with self._lock:
            self._versions[key] = self._versions.get(key, 0) + 1
            event = self._events.pop(key, None)
        if event is not None:
            self._set(event)

    def bump_all(self, keys: Iterable[str | None]) -> None:
        changed = {key for key in keys if key is not None}
        if changed and self.relay is not None:
            self.relay(changed)
        for key in changed:
            self.bump(key, forward=False)

    def _set(self, event: asyncio.Event) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop or self.loop is None:
            event.set()
        else:
            self.loop.call_soon_threadsafe(event.set)

    async def wait_for_change(self, key: str, since: str | None, timeout: float) -> None:
        """Return when the key's lease list differs from ``since`` or after ``timeout``."""
        # The version check and the event's creation are one step under the lock, so a bump
        # from another thread between them cannot be missed (a lost wake-up would leave the
        # agent waiting the whole poll).
        with self._lock:
            if self._closing or since != self.version(key):
                return
            event = self._events.setdefault(key, asyncio.Event())
        self.waiting += 1  # on the loop only
        try:
            # asyncio.timeout, not wait_for, which on Python 3.11 can lose a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
        finally:
            self.waiting -= 1

    def close(self) -> None:
        """The server is stopping: answer every long poll now, and any that comes later at
        once. Otherwise each poll waited out the server's graceful-shutdown time and was then
        cancelled, its client cut off and a traceback logged for it (a replica restarting
        under a thousand agents logged a thousand). Answered, a client polls again and
        reaches another replica, or this one once it is back."""
        with self._lock:
            self._closing = True
            events = list(self._events.values())
            self._events.clear()
        for event in events:
            self._set(event)
