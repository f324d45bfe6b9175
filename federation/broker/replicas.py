"""Several broker processes on one PostgreSQL database.

- **Leader lease.** Periodic passes (reaping silent providers and clusters, metering, capacity
  samples) run on one replica at a time: the holder of the ``periodic`` row of
  ``broker_leader``, renewed on every reaper tick and taken over by another replica once it
  expires (``leader_ttl``). Time is the database's, so replicas' clocks need not agree.
- **Wake-ups across replicas.** An agent long-polls one replica while a user's scale request
  may land on another. Every local wake-up is also sent as ``NOTIFY parallex_wakeup``, and a
  listener thread on each replica wakes its own long polls for the others' notifications.
  The same channel says when identities changed (``IDENTITY_CHANGED``: a token revoked, a
  role changed), so every replica forgets the tokens it remembers (token_cache.py).

On SQLite there is one broker process: it is always the leader and nothing is sent.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import text
from sqlalchemy.engine import Engine

from . import db

logger = logging.getLogger("parallex.broker.replicas")

CHANNEL = "parallex_wakeup"
#: The key a replica sends when a token, membership, user or lab changed (no provider id or
#: cluster key starts with "!"): the others forget the tokens they remember.
IDENTITY_CHANGED = "!identities"
LEADER_ROW = "periodic"


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def hold_leadership(engine: Engine, me: str, ttl: float) -> bool:
    """Take or renew the periodic-passes lease for ``ttl`` seconds; True while it is ours."""
    if not is_postgresql(engine):
        return True
    with engine.begin() as c:
        c.execute(text("INSERT INTO broker_leader (name, holder, expires_at) "
                       "VALUES (:name, '', now()) ON CONFLICT (name) DO NOTHING"),
                  {"name": LEADER_ROW})
        got = c.execute(text(
            "UPDATE broker_leader SET holder = :me, "
            "expires_at = now() + make_interval(secs => :ttl) "
            "WHERE name = :name AND (holder = :me OR expires_at <= now())"),
            {"me": me, "ttl": ttl, "name": LEADER_ROW})
        return got.rowcount == 1


def give_up_leadership(engine: Engine, me: str) -> None:
    """Let another replica take over at once (an orderly shutdown)."""
    if is_postgresql(engine):
        with engine.begin() as c:
            c.execute(text("UPDATE broker_leader SET expires_at = now() "
                           "WHERE name = :name AND holder = :me"), {"me": me, "name": LEADER_ROW})


#: Longest NOTIFY payload sent (PostgreSQL refuses more than 8,000 bytes).
PAYLOAD_BYTES = 7000


class WakeupRelay:
    """Sends this replica's wake-ups to the others and applies theirs here.

    Sending is batched on a thread of its own: a transaction that NOTIFYs holds a lock on
    the notification queue while it commits, so requests that each sent their own NOTIFY
    queued behind one another (issue 14's load benchmark: registrations took seconds). Keys
    that gather while a batch is sent go in the next one, several to a notification."""

    def __init__(self, engine: Engine, me: str, wake_here):
        self.engine = engine
        self.me = me
        self.wake_here = wake_here  # called with a key, for another replica's wake-up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        self._pending: set[str] = set()
        self._cond = threading.Condition()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen, name="parallex-wakeup-listener",
                                        daemon=True)
        self._thread.start()
        self._sender = threading.Thread(target=self._send_batches,
                                        name="parallex-wakeup-sender", daemon=True)
        self._sender.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in (self._sender, self._thread):
            if thread is not None:
                thread.join(5)
        self._sender = self._thread = None

    def send(self, keys: set[str]) -> None:
        """NOTIFY the other replicas of changes to ``keys`` (soon, on the sender thread;
        at once when it is not running)."""
        if not keys:
            return
        if self._sender is None:
            self._notify(set(keys))
            return
        with self._cond:
            self._pending |= keys
            self._cond.notify()

    def _send_batches(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop.is_set())
                keys, self._pending = self._pending, set()
            if keys:
                self._notify(keys)
            elif self._stop.is_set():
                return

    def _notify(self, keys: set[str]) -> None:
        payloads, current = [], self.me
        for key in sorted(keys):
            if len(current) + 1 + len(key) > PAYLOAD_BYTES:
                payloads.append(current)
                current = self.me
            current += " " + key
        payloads.append(current)
        try:
            # One statement outside a transaction: one round trip, where BEGIN, a statement
            # per payload and COMMIT were three or more (a batch is sent every few
            # milliseconds under churn).
            with db.autocommit(self.engine).connect() as c:
                c.execute(text("SELECT pg_notify(:channel, payload) "
                               "FROM unnest(CAST(:payloads AS text[])) AS payload"),
                          {"channel": CHANNEL, "payloads": payloads})
        except Exception:  # a lost wake-up costs the other replica's poll its timeout, no more
            logger.exception("could not tell the other broker replicas of %d changes",
                             len(keys))

    def _listen(self) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            sender, *keys = note.payload.split(" ")
                            if sender != self.me:
                                for key in keys:
                                    if key:
                                        self.wake_here(key)
            except Exception:
                if self._stop.is_set():
                    return
                logger.exception("the wake-up listener lost its database connection; "
                                 "reconnecting")
                self._stop.wait(1.0)
