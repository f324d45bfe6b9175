"""JupyterHub API tokens as broker credentials.

When the broker runs as the JupyterHub service ``parallex`` (or is told the hub's API URL), a
user's notebook may present its JupyterHub token instead of a Parallex token. The broker asks
the hub who owns it (``GET /hub/api/user``, which also lists the token's scopes), requires
``access:services!service=<name>``. JupyterHub's ``HubAuth`` asks and caches the answer briefly,
so a busy notebook does not call the hub on every request.
"""

from __future__ import annotations

from dataclasses import dataclass

from jupyterhub.services.auth import HubAuth
from tornado.web import HTTPError

from .errors import NotAllowed, NotAuthenticated, Unavailable


@dataclass(frozen=True)
class HubIdentity:
    """Who a hub token belongs to."""

    name: str
    groups: tuple[str, ...]


class HubTokenChecker:
    """Resolves JupyterHub tokens with JupyterHub's own ``HubAuth`` (its cache, of answers and
    refusals alike, lasts ``cache_seconds``), then checks the broker's scope."""

    def __init__(self, api_url: str, service_name: str = "parallex",
                 cache_seconds: float = 60.0):
        self.service_name = service_name
        # The token asked about is sent as the request's own credential; the service needs
        # no token of its own for this.
        self.hub_auth = HubAuth(api_url=api_url.rstrip("/"), api_token="",
                                cache_max_age=max(0, int(cache_seconds)))

    @property
    def required_scope(self) -> str:
        return f"access:services!service={self.service_name}"

    def identify(self, token: str) -> HubIdentity:
        """The token's owner; NotAuthenticated/NotAllowed when the hub does not vouch for it,
        Unavailable when the hub cannot answer (not cached, so the next request asks again)."""
        try:
            model = self.hub_auth.user_for_token(token, sync=True)
        except HTTPError as exc:
            raise Unavailable("hub-unreachable",
                           "the JupyterHub that vouches for this token cannot be reached or "
                           f"failed ({exc.log_message or exc.status_code}); try again shortly"
                           ) from exc
        if model is None:
            raise NotAuthenticated("bad-token", "this token is neither a Parallex token nor a "
                           "valid JupyterHub token; sign in to the hub again, or ask your "
                           "administrator for a Parallex token")
        scopes = set(model.get("scopes") or [])
        if self.required_scope not in scopes and "access:services" not in scopes:
            raise NotAllowed("missing-scope",
                           f"this JupyterHub token lacks the scope {self.required_scope}; use "
                           "the token of your notebook server (JUPYTERHUB_API_TOKEN) or ask the "
                           "hub administrator to grant the scope")
        if model.get("kind", "user") != "user":
            raise NotAllowed("not-a-user", "only a hub user's token can use Parallex")
        return HubIdentity(name=model["name"], groups=tuple(model.get("groups") or ()))
