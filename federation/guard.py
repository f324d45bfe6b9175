"""The scheduler-side check that binds each worker to its lease.

Every connection to a cluster's scheduler carries a certificate from the cluster's own CA (TLS
with required client certificates), so nothing outside the cluster gets in. Inside it, a
worker's certificate may use the whole Dask worker protocol — P2P shuffles, clients opened from
tasks, coordination primitives — because a provider that runs a user's tasks is already trusted
with them (a Dask client unpickles what workers send back). What the guard keeps true is who a
worker is: a worker registers only under the lease id its certificate names, only while that
lease is live, and a client certificate cannot register a worker at all.

It wraps the one handler that makes a worker ("register-worker") in the scheduler's public
handler table; handlers and stream handlers are otherwise Dask's own. The cluster's own
handlers (``parallex_*``: scale, hold, end the leases) answer only the cluster's client
certificate: a worker, or a client a task opens with the worker's certificate, cannot spend the
user's credits.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from distributed import Scheduler
from distributed.core import error_message
from distributed.metrics import time

from .errors import ParallexError
from .tls import ROLE_CLIENT, ROLE_WORKER, peer_identity

logger = logging.getLogger(__name__)


class SchedulerGuard:
    """Checks every worker registration against the certificate of its connection.

    ``allowed_names`` is called on every registration and returns the lease ids that may join
    this cluster now (the cluster's live leases).
    """

    def __init__(self, scheduler: Scheduler, allowed_names: Callable[[], Iterable[str]]):
        self.scheduler = scheduler
        self.allowed_names = allowed_names
        self.refusals: list[str] = []

    def install(self) -> None:
        """Put the check in front of the scheduler's "register-worker" handler."""
        register = self.scheduler.handlers["register-worker"]
        guard = self

        async def register_worker(comm: Any, **msg: Any) -> None:
            refusal = guard.check_registration(comm, msg)
            if refusal is not None:
                guard.refusals.append(refusal)
                logger.warning("Refused: %s", refusal)
                # The worker waits for a status reply; an error makes it stop instead of
                # retrying forever.
                await comm.write({"status": "error", "message": refusal, "time": time()})
                return None
            return await register(comm=comm, **msg)

        self.scheduler.handlers["register-worker"] = register_worker

    def add_client_handler(self, op: str, handler: Callable[..., Awaitable[Any]]) -> None:
        """Serve ``op`` on the scheduler to connections with the cluster's client certificate
        only; any other connection gets a PermissionError naming its certificate."""
        guard = self

        async def client_only(comm: Any, **msg: Any) -> Any:
            name, role = peer_identity(comm.extra_info.get("peercert") if comm else None)
            if role != ROLE_CLIENT:
                refusal = f"a {role or 'certificate-less'} connection ({name}) may not call {op!r}"
                guard.refusals.append(refusal)
                logger.warning("Refused: %s", refusal)
                return error_message(PermissionError(refusal), status="uncaught-error")
            try:
                return await handler(**msg)
            except ParallexError as exc:
                # The user's own mistake or the broker's refusal: it is raised for them on
                # their side, so one line here instead of Dask's traceback.
                logger.info("%s: %s", op, exc)
                return error_message(exc, status="uncaught-error")

        self.scheduler.handlers[op] = client_only

    def check_registration(self, comm: Any, msg: dict) -> str | None:
        """A refusal message, or None when this connection may register this worker."""
        name, role = peer_identity(comm.extra_info.get("peercert") if comm else None)
        if role != ROLE_WORKER:
            return f"a {role or 'certificate-less'} connection cannot register a worker"
        asked = str(msg.get("name"))
        # dask-cuda names the processes of a multi-GPU lease <lease>-<i>, all with its cert.
        head, _, index = asked.rpartition("-")
        if asked != name and not (head == name and index.isdigit()):
            return f"worker certificate for lease {name!r} tried to register as {asked!r}"
        if name not in set(self.allowed_names()):
            return f"lease {name!r} is not a live lease of this cluster"
        return None
