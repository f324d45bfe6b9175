"""Several broker processes on one PostgreSQL database.

- **Leader lease.** Periodic passes (reaping silent providers and clusters, metering, capacity
  samples) run on one replica at a time: the holder of the ``periodic`` row of
  ``broker_leader``, renewed on every reaper tick and taken over by another replica once it
  expires (``leader_ttl``). Time is the database's, so replicas' clocks need not agree.
- **Wake-ups across replicas.** An agent long-polls one replica while a user's scale request
  may land on another. Every local wake-up is also sent as ``NOTIFY parallex_wakeup``, and a
  listener thread on each replica wakes its own long polls for the others' notifications.

On SQLite there is one broker process: it is always the leader and nothing is sent.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import text
from sqlalchemy.engine import Engine

logger = logging.getLogger("parallex.broker.replicas")

CHANNEL = "parallex_wakeup"
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
            "WHERE name = :name AND (holder = :me OR expires_at < now())"),
            {"me": me, "ttl": ttl, "name": LEADER_ROW})
        return got.rowcount == 1


def give_up_leadership(engine: Engine, me: str) -> None:
    """Let another replica take over at once (an orderly shutdown)."""
    if is_postgresql(engine):
        with engine.begin() as c:
            c.execute(text("UPDATE broker_leader SET expires_at = now() "
                           "WHERE name = :name AND holder = :me"), {"me": me, "name": LEADER_ROW})


class WakeupRelay:
    """Sends this replica's wake-ups to the others and applies theirs here."""

    def __init__(self, engine: Engine, me: str, wake_here):
        self.engine = engine
        self.me = me
        self.wake_here = wake_here  # called with a key, for another replica's wake-up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="parallex-wakeup-listener",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def send(self, keys: set[str]) -> None:
        """NOTIFY the other replicas of changes to ``keys``."""
        if not keys:
            return
        try:
            with self.engine.begin() as c:
                for key in keys:
                    c.execute(text("SELECT pg_notify(:channel, :payload)"),
                              {"channel": CHANNEL, "payload": f"{self.me} {key}"})
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
                            sender, _, key = note.payload.partition(" ")
                            if sender != self.me and key:
                                self.wake_here(key)
            except Exception:
                if self._stop.is_set():
                    return
                logger.exception("the wake-up listener lost its database connection; "
                                 "reconnecting")
                self._stop.wait(1.0)
