"""Where a replica's asks for placement passes go: with several replicas, the leader places.

Each replica used to run placement passes for the changes it served, and on PostgreSQL the
replicas' passes took turns on the placement lock: a scale request waited for the pass under
way, for the other replica's on the lock, and then for its own (issue 14's load benchmark:
1.1–1.5 s on average, though a pass takes ~70 ms). Now only the leader replica (the holder
of the periodic passes' lease, replicas.py) places while it leads:

- the leader asks its own placer (a ``Coalescer``) as before;
- another replica sends ``!place:<replica>:<n>`` on the wake-up channel and its request
  waits (bounded) for the leader's answer ``!placed:<replica>:<n>``, which the leader sends
  after the pass that started once the ask arrived, so after the change committed;
- a replica that becomes the leader runs a pass at once: asks sent to the old leader (dead,
  or stepping down) are served by it, and its own unanswered asks are answered by it.

An ask no leader hears (the leader died, or its listener reconnects) is placed by the next
leader's first pass or its sweep (``SWEEP_INTERVAL``); a request that waits for its pass
(a scale request) places on its own replica when the leader has not answered within
``LEADER_ANSWER_WAIT``. The placement lock stays: during a change of leader two
replicas may both place for a moment, and a replica runs the asks already in its placer when
it stops leading.

On SQLite (one process), or before the app starts the placer's thread, every ask is local.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .coalescer import Coalescer, CountWaiters

#: Key prefixes on the wake-up channel ("!" keys are never provider ids or cluster keys).
PLACE = "!place:"
PLACED = "!placed:"
#: Seconds a request waits for the leader's answer before its replica places itself (a
#: pass takes tens of milliseconds; under issue 14's load the leader answers in well under
#: a second).
LEADER_ANSWER_WAIT = 2.5


@dataclass(frozen=True)
class Ticket:
    """One ask: served by this replica's placer (``local``) or by the leader's."""

    local: bool
    n: int


class PlacementAsks:
    """Asks for placement passes and waits for them, on this replica's placer while it leads
    (or has no other replicas) and on the leader's otherwise."""

    def __init__(self, placer: Coalescer, me: str, leads: Callable[[], bool],
                 send: Callable[[set[str]], None] | None):
        self.placer = placer
        self._me = me
        self._leads = leads
        self._send = send  # the wake-up relay's send; None without other replicas
        self._cond = threading.Condition()
        self._sent = 0  # asks sent to the leader (the last ask's number)
        self._answered = 0  # every ask sent up to this one has been served
        self._async_waiters = CountWaiters(self._cond, lambda n: self._answered >= n)
        self._last: Ticket | None = None
        #: Answers this replica sent as the leader.
        self.answers_sent = 0
        #: Requests whose replica placed because the leader had not answered in time.
        self.fallbacks = 0

    def _to_leader(self) -> bool:
        return self._send is not None and self.placer.running and not self._leads()

    def ask(self) -> Ticket:
        """Ask for a pass (after the caller's change committed); returns the ticket to
        wait for."""
        if not self._to_leader():
            ticket = Ticket(True, self.placer.ask({self._me_asked()}))
        else:
            with self._cond:
                self._sent += 1
                ticket = Ticket(False, self._sent)
            self._send({f"{PLACE}{self._me}:{ticket.n}"})
        with self._cond:
            self._last = ticket
        return ticket

    @property
    def sent(self) -> int:
        """Asks this replica sent to the leader since it started."""
        with self._cond:
            return self._sent

    def _me_asked(self) -> tuple[str, int]:
        """The item of a local ask: it also serves every ask this replica sent before it
        (the pass starts after they committed, so it places their leases too)."""
        with self._cond:
            return (self._me, self._sent)

    @property
    def last_ticket(self) -> Ticket:
        """The latest ask's ticket: a route that asked through a service method waits for
        this one (its own, or a later ask's, whose pass serves it too)."""
        with self._cond:
            return self._last if self._last is not None else Ticket(True, 0)

    async def wait_async(self, ticket: Ticket, timeout: float) -> bool:
        """Wait until a pass that started after ``ticket`` was asked has finished (False
        when ``timeout`` seconds passed first), on the event loop, holding no thread."""
        if ticket.local:
            return await self.placer.wait_async(ticket.n, timeout)
        first = min(timeout, LEADER_ANSWER_WAIT)
        if await self._async_waiters.wait(ticket.n, first):
            return True
        if timeout <= first:
            return False
        return await self.placer.wait_async(self._place_here(), timeout - first)

    def _place_here(self) -> int:
        """The leader did not answer in time (it died, is stepping down, or its listener
        reconnects): this replica places, and its pass answers its asks so far."""
        with self._cond:
            self.fallbacks += 1
        return self.placer.ask({self._me_asked()})

    # ---- the channel ------------------------------------------------------------------------

    def heard(self, key: str) -> bool:
        """Apply another replica's ``!place``/``!placed`` key; False for any other key."""
        if key.startswith(PLACED):
            ask = _ask_in(key, PLACED)
            if ask is not None and ask[0] == self._me:
                self._served(ask[1])
            return True
        if key.startswith(PLACE):
            ask = _ask_in(key, PLACE)
            # Only the leader places for others; the others drop the ask (a new leader's
            # first pass serves what its predecessor missed).
            if ask is not None and self._leads() and self.placer.running:
                self.placer.ask({ask})
            return True
        return False

    def pass_served(self, items: set) -> None:
        """After a pass of this replica's placer: answer the asks it served, this replica's
        own that went to the leader before it led included."""
        latest: dict[str, int] = {}
        for replica, n in items:
            latest[replica] = max(n, latest.get(replica, 0))
        mine = latest.pop(self._me, 0)
        if mine:
            self._served(mine)
        if latest and self._send is not None:
            self.answers_sent += len(latest)
            self._send({f"{PLACED}{replica}:{n}" for replica, n in latest.items()})

    def became_leader(self) -> None:
        """This replica leads from now: a pass at once serves the asks its predecessor may
        not have (and this replica's own that went to it)."""
        self.placer.ask({self._me_asked()})

    def _served(self, n: int) -> None:
        with self._cond:
            self._answered = max(self._answered, n)
            self._async_waiters.release()
            self._cond.notify_all()

    def stop(self) -> None:
        """Release every waiter (the app stops); their waits return False."""
        with self._cond:
            self._async_waiters.release(everyone=True)
            self._cond.notify_all()


#: ``<replica>:<n>`` after a key's prefix: a replica's boot id and an ask's number.
_ASK = re.compile(r"([0-9a-f]{1,32}):([0-9]{1,18})")


def _ask_in(key: str, prefix: str) -> tuple[str, int] | None:
    """The (replica, number) a ``!place``/``!placed`` key names; None for a malformed one."""
    match = _ASK.fullmatch(key, len(prefix))
    return (match[1], int(match[2])) if match else None
