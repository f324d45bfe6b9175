"""What a broker replica remembers between requests, bounded in size and, where the database
may change it, in age.

Each is used from the event loop and from the request threads at once, so each operation
takes a lock (they are dictionary operations: the lock is held for microseconds).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedMap(Generic[K, V]):
    """A dictionary of at most ``size`` entries; past that the oldest added goes first. For
    facts that never change once true (which lab a provider belongs to)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class ExpiringMap(Generic[K, V]):
    """A dictionary whose entries are forgotten ``ttl`` seconds after they were put (and
    all of them on ``clear``), at most ``size`` of them. For facts the database may change
    (who a token belongs to): the age bounds how long a change can go unseen here."""

    def __init__(self, ttl: float, size: int):
        self.ttl = ttl
        self.size = size
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        #: Bumped by every clear: a value read from the database before a clear must not be
        #: put after it (it may be what the clear was for).
        self.generation = 0

    def get(self, key: K) -> V | None:
        found = self.get_aged(key)
        return None if found is None else found[0]

    def get_aged(self, key: K) -> tuple[V, float] | None:
        """The value and its age in seconds, or None when there is none (or it expired)."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            age = time.monotonic() - entry[0]
            if age > self.ttl:
                del self._items[key]
                return None
            return entry[1], age

    def put(self, key: K, value: V, generation: int | None = None) -> None:
        """Remember ``value``; with ``generation`` (read before the value was), only when no
        clear came in between."""
        if self.ttl <= 0:
            return
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            self._items[key] = (time.monotonic(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.generation += 1

    def __len__(self) -> int:
        return len(self._items)
