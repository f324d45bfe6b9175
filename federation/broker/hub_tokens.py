"""JupyterHub API tokens as broker credentials.

When the broker runs as the JupyterHub service ``parallex`` (or is told the hub's API URL), a
user's notebook may present its JupyterHub token instead of a Parallex token. The broker asks
the hub who owns it (``GET /hub/api/user``, which also lists the token's scopes), requires
``access:services!service=<name>``, and caches the answer briefly so a busy notebook does not
call the hub on every request.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import httpx

from .errors import ApiError


@dataclass(frozen=True)
class HubIdentity:
    """Who a hub token belongs to."""

    name: str
    groups: tuple[str, ...]


class HubTokenChecker:
    """Resolves JupyterHub tokens through the hub's API, with a short cache."""

    def __init__(self, api_url: str, service_name: str = "parallex",
                 cache_seconds: float = 60.0, timeout: float = 5.0):
        self.api_url = api_url.rstrip("/")
        self.service_name = service_name
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self._cache: dict[str, tuple[float, HubIdentity | ApiError]] = {}
        self._lock = threading.Lock()

    @property
    def required_scope(self) -> str:
        return f"access:services!service={self.service_name}"

    def identify(self, token: str) -> HubIdentity:
        """The token's owner; ApiError 401/403 when the hub does not vouch for it."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit and hit[0] > now:
            if isinstance(hit[1], ApiError):
                raise hit[1]
            return hit[1]
        try:
            answer = self._ask_hub(token)
        except ApiError as exc:
            if exc.status_code in (401, 403):  # a verdict, worth caching; outages are not
                self._remember(key, now, exc)
            raise
        self._remember(key, now, answer)
        return answer

    def _remember(self, key: str, now: float, value: HubIdentity | ApiError) -> None:
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (now + self.cache_seconds, value)

    def _ask_hub(self, token: str) -> HubIdentity:
        try:
            response = httpx.get(f"{self.api_url}/user", timeout=self.timeout,
                                 headers={"Authorization": f"token {token}"})
        except httpx.HTTPError as exc:
            raise ApiError(503, "hub-unreachable",
                           f"the JupyterHub that vouches for this token cannot be reached "
                           f"({exc.__class__.__name__}); try again shortly") from exc
        if response.status_code in (401, 403):
            raise ApiError(401, "bad-token", "this token is neither a Parallex token nor a "
                           "valid JupyterHub token; sign in to the hub again, or ask your "
                           "administrator for a Parallex token")
        if response.status_code != 200:
            raise ApiError(503, "hub-error", f"JupyterHub answered {response.status_code} when "
                           "asked about this token; try again shortly")
        model = response.json()
        scopes = set(model.get("scopes") or [])
        if self.required_scope not in scopes and "access:services" not in scopes:
            raise ApiError(403, "missing-scope",
                           f"this JupyterHub token lacks the scope {self.required_scope}; use "
                           "the token of your notebook server (JUPYTERHUB_API_TOKEN) or ask the "
                           "hub administrator to grant the scope")
        if model.get("kind", "user") != "user":
            raise ApiError(403, "not-a-user", "only a hub user's token can use Parallex")
        return HubIdentity(name=model["name"], groups=tuple(model.get("groups") or ()))
