"""The broker's errors as HTTP answers: used by the app's exception handlers and by the
agents' fast path (agent_fast_path.py), which answers outside FastAPI's routing."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError

from .errors import BrokerError, http_status

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
