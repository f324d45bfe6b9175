"""The broker's domain errors: what went wrong, for the person who will read it.

The broker's rules (admission, placement, the service) raise these without knowing HTTP; the
API maps each kind to a status in one place (``http_status`` below, used by app.py) and
answers ``{"error": code, "message": text}``. Like dask-gateway's PublicException, the
message says what was wrong and what to do; nothing else of an error reaches the caller.
"""

from __future__ import annotations


class BrokerError(Exception):
    """An error meant for the caller: a short ``code`` for programs, a ``message`` for people.
    ``retry_after``: seconds after which the same request may succeed (rate limits)."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class NotAuthenticated(BrokerError):
    """No token, or one the broker does not accept."""


class NotAllowed(BrokerError):
    """The caller is known but may not do this (another lab's books, a quota, a limit)."""


class NotFound(BrokerError):
    """No such thing, or one the caller may not know exists (answered alike)."""


class Conflict(BrokerError):
    """The thing exists but is in a state that forbids this (ended, taken)."""


class Invalid(BrokerError):
    """The request is well-formed but its content cannot be accepted."""


class OverCreditLimit(BrokerError):
    """The lab's balance is below its credit limit: new workers are refused."""


class TooSoon(BrokerError):
    """Asked again sooner than allowed."""


class Unavailable(BrokerError):
    """Something the broker depends on (the hub) cannot answer now."""


#: The one mapping from the broker's errors to HTTP statuses.
HTTP_STATUS: dict[type[BrokerError], int] = {
    NotAuthenticated: 401,
    OverCreditLimit: 402,
    NotAllowed: 403,
    NotFound: 404,
    Conflict: 409,
    Invalid: 422,
    TooSoon: 429,
    Unavailable: 503,
}


def http_status(error: BrokerError) -> int:
    """The HTTP status of ``error`` (its nearest mapped class; 400 for an unmapped one)."""
    for kind in type(error).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind]
    return 400
