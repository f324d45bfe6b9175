"""ParallexOIDCAuthenticator: several institutions' OpenID Connect providers in one JupyterHub.

Registered as the JupyterHub authenticator entry point ``parallex-oidc``. The login page picks
the institution (skipped when there is one); the callback finishes the authorization code flow
with PKCE, checks the id_token (oidc.py), maps the claims onto a lab and a role, writes them
into the broker's memberships and returns JupyterHub groups. The stages follow JupyterHub's
contract: ``authenticate`` turns verified claims into a user model, ``refresh_user`` keeps the
encrypted auth_state fresh.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import quote

import httpx
from jupyterhub.auth import Authenticator
from jupyterhub.handlers import BaseHandler
from jupyterhub.utils import url_path_join
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Bool, Float, Unicode, default

from .oidc import AuthRequest, OidcClient, OidcError
from .settings import HubSettings, Institution, load_settings

STATE_COOKIE = "parallex-oidc-state"


def refusal(status: int, message: str) -> web.HTTPError:
    """An error JupyterHub renders as a page that shows ``message``."""
    error = web.HTTPError(status, message)
    error.jupyterhub_message = message
    return error


class ParallexLoginHandler(BaseHandler):
    """GET /hub/login: the institution picker, or straight to the one institution."""

    async def get(self) -> None:
        auth: ParallexOIDCAuthenticator = self.authenticator
        institutions = auth.hub_settings.institutions
        chosen = self.get_argument("institution", None)
        if chosen is None and len(institutions) == 1:
            chosen = institutions[0].name
        if chosen is None:
            self.finish(await self.render_template(
                "parallex_login.html", institutions=institutions,
                next=self.get_argument("next", ""), login_url=auth.login_url(self.hub.base_url)))
            return
        institution = auth.hub_settings.institution(chosen)
        if institution is None:
            known = ", ".join(i.display_name for i in institutions)
            raise refusal(400, f"There is no institution {chosen!r} on this hub. It accepts "
                               f"sign-ins from: {known}.")
        try:
            request = await auth.client(institution).start()
        except OidcError as exc:
            raise refusal(exc.status, exc.reason) from exc
        # The browser carries the pending login in a signed, short-lived cookie: no server
        # state, and a callback without it (or with another state) is refused.
        self.set_secure_cookie(STATE_COOKIE, json.dumps({
            "institution": institution.name, "state": request.state, "nonce": request.nonce,
            "verifier": request.code_verifier, "next": self.get_argument("next", "")}),
            expires_days=None, path=self.hub.base_url, httponly=True)
        self.redirect(request.url)


class ParallexCallbackHandler(BaseHandler):
    """GET /hub/oauth_callback: finish the flow, verify the id_token, log the user in."""

    async def get(self) -> None:
        auth: ParallexOIDCAuthenticator = self.authenticator
        raw = self.get_secure_cookie(STATE_COOKIE, max_age_days=auth.login_timeout / 86400)
        self.clear_cookie(STATE_COOKIE, path=self.hub.base_url)
        if self.get_argument("error", None):
            why = self.get_argument("error_description", self.get_argument("error"))
            raise refusal(403, f"The sign-in service refused: {why}")
        if raw is None:
            raise refusal(400, "This sign-in has no pending login (it expired, or cookies are "
                               "blocked); start again from the login page.")
        pending = json.loads(raw)
        if self.get_argument("state", "") != pending["state"]:
            raise refusal(400, "This sign-in answer does not belong to the login this browser "
                               "started (state mismatch); start again from the login page.")
        institution = auth.hub_settings.institution(pending["institution"])
        code = self.get_argument("code", "")
        if institution is None or not code:
            raise refusal(400, "The sign-in answer is incomplete; start again from the login "
                               "page.")
        answered_by = self.get_argument("iss", None)
        if answered_by is not None and answered_by.rstrip("/") != institution.issuer:
            # RFC 9207: the answer names the provider that sent it (mix-up attack defence).
            raise refusal(403, f"This sign-in answer came from {answered_by}, not from "
                               f"{institution.display_name}; start again from the login page.")
        request = AuthRequest("", pending["state"], pending["nonce"], pending["verifier"])
        try:
            tokens, claims = await auth.client(institution).finish(code, request)
        except OidcError as exc:
            self.log.warning("refused sign-in from %s: %s", institution.name, exc.reason)
            raise refusal(exc.status, exc.reason) from exc
        user = await self.login_user({"institution": institution.name, "claims": claims,
                                      "tokens": tokens})
        if user is None:
            raise refusal(403, "You are not allowed on this hub; ask its administrators.")
        # JupyterHub's get_next_url would carry this request's code and state along; only a
        # local path is accepted as the next page (no open redirect).
        target = pending.get("next") or ""
        if not target.startswith("/") or target.startswith("//"):
            target = self.hub.base_url
        self.redirect(target)


class ParallexOIDCAuthenticator(Authenticator):
    """Sign in with any of the configured institutions' OpenID Connect providers."""

    settings_file = Unicode(
        "", config=True,
        help="Path of the hub settings YAML (institutions, URLs); empty means the "
             "PARALLEX_HUB_SETTINGS environment variable. See hub_config/settings.py.")
    broker_url = Unicode(
        "", config=True,
        help="Broker URL for writing lab memberships at login; empty means the settings' "
             "broker_url.")
    broker_admin_token = Unicode(
        "", config=True,
        help="Broker admin token for writing memberships; empty means PARALLEX_ADMIN_TOKEN. "
             "Without one, memberships are not written and logins still work.")
    refresh_margin = Float(
        300.0, config=True,
        help="Seconds before the access token expires at which refresh_user renews it "
             "(default 300).")
    login_timeout = Float(
        600.0, config=True,
        help="Seconds a started login may take at the identity provider (default 600).")
    require_membership_sync = Bool(
        False, config=True,
        help="Refuse the login when the membership cannot be written to the broker "
             "(default False: log a warning and let the user in).")
    hub_settings = AnyTrait(help="The loaded HubSettings (set from settings_file).")

    @default("hub_settings")
    def _load(self) -> HubSettings:
        return load_settings(self.settings_file or None)

    @default("manage_groups")
    def _manage_groups(self) -> bool:
        return True

    @default("enable_auth_state")
    def _auth_state(self) -> bool:
        return True

    @default("allow_all")
    def _allow_all(self) -> bool:
        # Who may log in is decided by the lab rules: no lab, no login.
        return True

    @default("auth_refresh_age")
    def _refresh_age(self) -> int:
        return 120

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._clients: dict[str, OidcClient] = {}

    # ---- JupyterHub contract ---------------------------------------------------------------

    def login_url(self, base_url: str) -> str:
        return url_path_join(base_url, "login")

    def get_handlers(self, app) -> list:
        return [("/login", ParallexLoginHandler), ("/oauth_callback", ParallexCallbackHandler)]

    def client(self, institution: Institution) -> OidcClient:
        if institution.name not in self._clients:
            redirect = url_path_join(self.hub_settings.public_url, "hub", "oauth_callback")
            self._clients[institution.name] = OidcClient(institution, redirect)
        return self._clients[institution.name]

    async def authenticate(self, handler, data: dict) -> dict:
        """Verified claims → username, lab, role, groups and auth_state; refuses without lab."""
        institution = self.hub_settings.institution(data["institution"])
        claims = data["claims"]
        local = str(claims.get(institution.username_claim) or "").strip().lower()
        if not local:
            raise refusal(403, f"{institution.display_name} did not send your "
                               f"{institution.username_claim!r}, which this hub uses as your "
                               f"username. {self._ask(institution)}")
        username = f"{local}@{institution.name}"
        lab = institution.lab_for(claims)
        if lab is None:
            raise refusal(403, f"You signed in as {local} at {institution.display_name}, but "
                               "your account is not linked to any lab that takes part in "
                               f"Parallex, so you cannot use it yet. {self._ask(institution)}")
        role = institution.role_for(claims)
        # The membership is written in run_post_auth_hook, once JupyterHub's own allow and
        # block checks have let this login through: a blocked user gets no membership.
        return {"name": username, "groups": self._groups(lab, role), "admin": role == "admin",
                "auth_state": self._auth_state(institution, data["tokens"], claims, lab, role)}

    async def run_post_auth_hook(self, handler, auth_model: dict) -> dict:
        """Write the lab membership of a login JupyterHub accepted, then run the site's own
        post_auth_hook (if configured)."""
        state = auth_model.get("auth_state") or {}
        institution = self.hub_settings.institution(state.get("institution", ""))
        if institution is not None and state.get("lab"):
            await self._sync_membership(auth_model["name"], state["lab"], state["role"],
                                        institution)
        return await super().run_post_auth_hook(handler, auth_model)

    async def refresh_user(self, user, handler=None):
        """Renew the access token shortly before it expires; False sends the user to log in."""
        state = await user.get_auth_state()
        if not state or "institution" not in state:
            return True
        if state.get("expires_at", 0) - time.time() > self.refresh_margin:
            return True
        institution = self.hub_settings.institution(state["institution"])
        if institution is None or not state.get("refresh_token"):
            return False
        try:
            tokens = await self.client(institution).refresh(state["refresh_token"])
        except OidcError as exc:
            self.log.info("refresh for %s failed: %s", user.name, exc.reason)
            return False
        tokens.setdefault("refresh_token", state["refresh_token"])
        claims = state.get("claims", {})
        if tokens.get("id_token"):
            try:
                claims = await self.client(institution).verify_id_token(tokens["id_token"],
                                                                        nonce=None)
            except OidcError:
                return False
        # With manage_groups, JupyterHub wants the groups in every refreshed model.
        return {"groups": self._groups(state["lab"], state["role"]),
                "auth_state": self._auth_state(institution, tokens, claims, state["lab"],
                                               state["role"])}

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _groups(lab: str, role: str) -> list[str]:
        """JupyterHub groups: the lab, its PIs' group, and the federation's administrators."""
        return [lab] + ([f"{lab}-pis"] if role in ("pi", "admin") else []) + (
            ["parallex-admins"] if role == "admin" else [])

    @staticmethod
    def _ask(institution: Institution) -> str:
        whom = institution.contact or "your lab's PI or your institution's research computing"
        return f"Ask {whom} to add you to a Parallex lab, then sign in again."

    @staticmethod
    def _auth_state(institution: Institution, tokens: dict, claims: dict, lab: str,
                    role: str) -> dict:
        expires_at = tokens.get("expires_at") or time.time() + float(tokens.get("expires_in",
                                                                                  3600))
        return {"institution": institution.name, "access_token": tokens.get("access_token"),
                "refresh_token": tokens.get("refresh_token"), "id_token": tokens.get("id_token"),
                "expires_at": float(expires_at), "claims": claims, "lab": lab, "role": role}

    async def _sync_membership(self, username: str, lab: str, role: str,
                               institution: Institution) -> None:
        """Create the lab if new and set the user's role there, through the broker's API."""
        token = self.broker_admin_token or os.environ.get("PARALLEX_ADMIN_TOKEN", "")
        url = (self.broker_url or self.hub_settings.broker_url).rstrip("/") + "/api/v1"
        if not token:
            self.log.warning("no broker admin token: %s's membership of %s is not written",
                             username, lab)
            return
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as broker:
                # 409: the lab exists already (the usual case); nothing was written.
                created = await broker.post("/labs", json={
                    "name": lab, "institution": institution.display_name})
                if created.status_code not in (201, 409):
                    created.raise_for_status()
                (await broker.put(f"/labs/{quote(lab)}/members/{quote(username)}",
                                  json={"role": role})).raise_for_status()
        except httpx.HTTPError as exc:
            self.log.warning("could not write %s's membership of %s to the broker: %s",
                             username, lab, exc)
            if self.require_membership_sync:
                raise refusal(503, "Parallex's broker cannot be reached to register your lab "
                                   "membership; try again in a few minutes.") from exc
