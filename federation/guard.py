"""The scheduler-side check that keeps worker credentials from becoming code execution.

A Dask scheduler runs what clients send it. Workers live on other labs' machines, so a worker's
certificate must only let it act as a worker: register under its own lease id and take part in
the worker protocol. Every handler lookup on the scheduler goes through ``GuardedHandlers``,
which reads the role and common name from the TLS peer certificate of the connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from dask.utils import has_keyword
from distributed import Scheduler

# The very rule Server._handle_comm applies to decide whether a handler is given the comm; the
# guard must pass it on exactly as Dask would.
from distributed.core import _expects_comm
from distributed.metrics import time

from .tls import ROLE_CLIENT, ROLE_SCHEDULER, ROLE_WORKER, peer_identity

logger = logging.getLogger(__name__)

# What a worker legitimately asks of the scheduler over RPC; everything else it does happens on
# the batched stream that "register-worker" opens.
WORKER_OPS = frozenset(
    {"register-worker", "heartbeat_worker", "who_has", "identity", "echo", "retire_workers"}
)
# The user's own certificates (client, and the scheduler's which only the user holds).
CLIENT_ROLES = frozenset({ROLE_CLIENT, ROLE_SCHEDULER})


class WorkerRefused(PermissionError):
    """A connection tried something its certificate does not allow."""


class SchedulerGuard:
    """Decides, per connection and operation, whether a handler may run.

    ``allowed_names`` is called on every worker registration and returns the lease ids that
    may join this cluster now (the cluster's live leases).
    """

    def __init__(self, scheduler: Scheduler, allowed_names: Callable[[], Iterable[str]]):
        self.scheduler = scheduler
        self.allowed_names = allowed_names
        self.refusals: list[str] = []

    def install(self) -> None:
        """Route every handler lookup of the scheduler through this guard."""
        self.scheduler.handlers = GuardedHandlers(self.scheduler.handlers, self)

    def _refuse(self, message: str) -> WorkerRefused:
        self.refusals.append(message)
        logger.warning("Refused: %s", message)
        return WorkerRefused(message)

    def check(self, comm: Any, op: str, msg: dict) -> str | None:
        """Return a refusal message, or None when ``op`` may run on ``comm``."""
        name, role = peer_identity(comm.extra_info.get("peercert") if comm else None)
        if role == ROLE_WORKER:
            if op not in WORKER_OPS:
                return f"worker certificate {name!r} may not call {op!r}"
            if op == "register-worker":
                asked = str(msg.get("name"))
                if asked != name:
                    return (
                        f"worker certificate for lease {name!r} tried to register "
                        f"as {asked!r}"
                    )
                if name not in set(self.allowed_names()):
                    return f"lease {name!r} is not a live lease of this cluster"
            if op == "retire_workers":
                own = {
                    addr for addr, ws in self.scheduler.workers.items() if str(ws.name) == name
                }
                targets = set(msg.get("workers") or ())
                if msg.get("names") or not targets or not targets <= own:
                    return f"worker {name!r} may only retire itself"
            return None
        if role in CLIENT_ROLES:
            if op == "register-worker":
                return "a client certificate cannot register a worker"
            return None
        return f"connection without a Parallex certificate may not call {op!r}"

    def wrap(self, op: str, handler: Callable) -> Callable:
        """Return ``handler`` behind the check, keeping the signature Dask inspects."""
        expects_comm = _expects_comm(handler)
        guard = self

        def call(comm, msg):
            refusal = guard.check(comm, op, msg)
            if refusal is not None:
                error = guard._refuse(refusal)
                if op == "register-worker":
                    return _answer_registration(comm, refusal)
                if op == "register-client":
                    return _answer_client(comm, refusal)
                raise error
            return handler(comm, **msg) if expects_comm else handler(**msg)

        if has_keyword(handler, "serializers"):

            def guarded(comm, serializers=None, **msg):
                if serializers is not None:
                    msg["serializers"] = serializers
                return call(comm, msg)

        else:

            def guarded(comm, **msg):
                return call(comm, msg)

        guarded.__name__ = getattr(handler, "__name__", op)
        return guarded


async def _answer_registration(comm: Any, message: str) -> None:
    # The worker expects a status reply on the registration comm; an error status makes it
    # stop instead of retrying forever.
    await comm.write({"status": "error", "message": message, "time": time()})


async def _answer_client(comm: Any, message: str) -> None:
    # A client waits for "stream-start"; its error field makes the Client raise at once with
    # our message instead of timing out.
    await comm.write([{"op": "stream-start", "error": message}])
    comm.abort()


class GuardedHandlers(dict):
    """The scheduler's handler table; every lookup returns the guarded handler.

    Handlers added later (by extensions or plugins) are guarded too, because the check sits in
    the lookup rather than in a one-off rewrite of the table.
    """

    def __init__(self, handlers: dict, guard: SchedulerGuard):
        super().__init__(handlers)
        self._guard = guard

    def __getitem__(self, op: str) -> Callable:
        return self._guard.wrap(op, super().__getitem__(op))
