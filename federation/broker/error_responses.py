"""The broker's errors as HTTP answers: used by the app's exception handlers and by the
agents' fast path (agent_fast_path.py), which answers outside FastAPI's routing."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError

from accounting.retention import PrunedPeriod

from .errors import BrokerError, Invalid, http_status

logger = logging.getLogger("parallex.broker")


def broker_error_response(exc: BrokerError) -> JSONResponse:
    """The one place the broker's errors become HTTP (federation/broker/errors.py)."""
    headers = ({"Retry-After": str(max(1, round(exc.retry_after)))}
               if exc.retry_after is not None else None)
    return JSONResponse({"error": exc.code, "message": exc.message},
                        status_code=http_status(exc), headers=headers)


def unstorable_value_response(method: str, path: str, exc: DataError) -> JSONResponse:
    """A 422 for a value the database refused (the transaction was rolled back)."""
    # PostgreSQL checks what SQLite lets through (a NUL character in text, a number past a
    # column's range), so the fuzzer found these on PostgreSQL only.
    reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "bad value"
    logger.info("request %s %s carried a value the database refused: %s", method, path, reason)
    return JSONResponse({"error": "unstorable-value",
                         "message": f"a value in this request cannot be used ({reason}); "
                                    "remove control characters from text and keep numbers "
                                    "in range"}, status_code=422)


def database_unavailable_response(method: str, path: str, exc: OperationalError) -> JSONResponse:
    """A 503 for a database that could not answer (down, restarting, its connection broke,
    a lock or deadlock it gave up on): the unit of work was rolled back, and a retry is
    the remedy, not a bug report."""
    # The database's own words stay in the log: they name its host and port, which are no
    # business of whoever sent the request (maybe before its token could be checked).
    reason = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
    logger.warning("request %s %s: the database could not answer: %s", method, path, reason)
    return JSONResponse({"error": "database-unavailable",
                         "message": "the broker's database could not answer this request "
                                    "for now; nothing was changed. Retry in a few seconds; "
                                    "if it persists, the administrator should check the "
                                    "database server (the broker's log says what failed)"},
                        status_code=503, headers={"Retry-After": "2"})


def known_error_response(method: str, path: str, exc: Exception) -> JSONResponse | None:
    """The answer to an error the broker answers on purpose (a broker error, a value the
    database refused, a database that could not answer), or None for any other (a 500)."""
    if isinstance(exc, BrokerError):
        return broker_error_response(exc)
    if isinstance(exc, PrunedPeriod):  # a report over records pruned (accounting/retention)
        return broker_error_response(Invalid("pruned-period", str(exc)))
    if isinstance(exc, DataError):
        return unstorable_value_response(method, path, exc)
    if isinstance(exc, OperationalError):
        return database_unavailable_response(method, path, exc)
    return None
