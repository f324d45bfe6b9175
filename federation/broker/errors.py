"""API errors: one exception type, rendered as JSON {"error": code, "message": text}."""

from __future__ import annotations


class ApiError(Exception):
    """An error meant for the API caller, with an HTTP status and a message saying what to fix."""

    def __init__(self, status_code: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers
