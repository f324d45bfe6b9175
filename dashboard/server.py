"""Serving the dashboard: as the JupyterHub service ``parallex-dashboard`` (hub OAuth), or
standalone for development (``parallex dashboard --dev-user NAME``).

Under the hub, JupyterHub's own OAuth client (jupyterhub.services.auth.HubOAuth) logs people
in: an unauthenticated visit is sent to the hub, the callback stores the hub token in a signed
cookie, and each Panel session resolves that cookie to the hub user, then to the Parallex
viewer (admin, PI or member). A hub user the federation does not know sees a refusal, not data.
"""

from __future__ import annotations

import logging
import os
import secrets
from functools import partial
from urllib.parse import quote

import panel as pn
from bokeh.server.auth_provider import AuthProvider
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from tornado.web import RequestHandler, decode_signed_value

from accounting.fairshare import DEFAULT_HALF_LIFE
from federation.broker import db
from federation.broker.access import Scope, scope_of_user

from .app import Dashboard

logger = logging.getLogger("parallex.dashboard")


class _HubLogin(HubOAuthenticated, RequestHandler):
    """GET login: send the browser through the hub's OAuth, then back to the dashboard."""

    def get(self) -> None:
        if self.get_current_user():
            target = self.get_argument("next", "")
            # Only a path on this site: no open redirect.
            if not target.startswith("/") or target.startswith("//"):
                target = self.hub_auth.base_url
            self.redirect(target)
            return
        self.redirect(self.get_login_url())


class HubAuthProvider(AuthProvider):
    """Bokeh auth provider backed by the hub's OAuth cookie."""

    def __init__(self, hub_auth: HubOAuth, prefix: str):
        self.hub_auth = hub_auth
        self.prefix = prefix.rstrip("/")
        super().__init__()

    @property
    def get_user(self):
        def user(handler):
            return self.hub_auth.get_user(handler)  # the model, or None when not logged in

        return user

    @property
    def get_login_url(self):
        def url(handler):
            # Relative to the service prefix: Panel and Bokeh put the prefix in front.
            return f"/login?next={quote(handler.request.uri, safe='')}"

        return url


def _viewer_from_request(engine, hub_auth: HubOAuth | None, cookie_secret: str,
                         dev_user: str | None) -> Scope | None:
    with db.session(engine) as s:
        if hub_auth is None:
            return scope_of_user(s, dev_user or "")
        request = pn.state.curdoc.session_context.request
        raw = request.cookies.get(hub_auth.cookie_name)
        token = decode_signed_value(cookie_secret, hub_auth.cookie_name, raw) if raw else None
        model = hub_auth.user_for_token(token.decode()) if token else None
        if not model:
            return None
        # The role comes from the lab membership, as in the API: being a JupyterHub
        # administrator alone does not open every lab's books.
        return scope_of_user(s, model["name"])


def page(engine, hub_auth, cookie_secret, dev_user, half_life) -> pn.viewable.Viewable:
    viewer = _viewer_from_request(engine, hub_auth, cookie_secret, dev_user)
    if viewer is None:
        return pn.pane.Markdown(
            "## Not a member of the federation\nYour account is not linked to a Parallex lab, "
            "so there is nothing to show. Sign out and in again after your PI adds you.",
            css_classes=["px-refused"])
    return Dashboard(partial(db.session, engine), viewer,
                     fair_share_half_life=half_life).panel()


def serve(db_url: str, *, port: int, address: str = "127.0.0.1", prefix: str = "",
          dev_user: str | None = None, fair_share_half_life: float = DEFAULT_HALF_LIFE,
          show: bool = False, schema_wait: float = 60.0) -> None:
    """Run until stopped. Without ``dev_user`` the hub's OAuth is required (the service's
    JUPYTERHUB_* environment); with it, everyone is that user (development only)."""
    # A reader: the broker owns (and migrates) the schema.
    engine = db.reader_engine(db_url, wait=schema_wait)
    cookie_secret = secrets.token_hex(32)
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    options: dict = {"cookie_secret": cookie_secret}
    hub_auth = None
    if dev_user is None:
        hub_auth = HubOAuth(cache_max_age=60)
        if not hub_auth.api_token or not hub_auth.oauth_client_id:
            raise RuntimeError("not running as a JupyterHub service (no JUPYTERHUB_API_TOKEN "
                               "or JUPYTERHUB_CLIENT_ID); use --dev-user for development")
        callback = type("Callback", (HubOAuthCallbackHandler,), {"hub_auth": hub_auth})
        login = type("Login", (_HubLogin,), {"hub_auth": hub_auth})
        # Bokeh puts the prefix in front of these itself.
        options.update(auth_provider=HubAuthProvider(hub_auth, prefix),
                       extra_patterns=[("/oauth_callback", callback), ("/login", login)])
    else:
        logger.warning("development mode: everyone is %r, without login; bind to 127.0.0.1",
                       dev_user)
    origin = os.environ.get("PARALLEX_DASHBOARD_ORIGIN", "*")
    pn.extension("tabulator", sizing_mode="stretch_width")
    def app() -> pn.viewable.Viewable:  # a plain function: Panel calls it per session
        return page(engine, hub_auth, cookie_secret, dev_user, fair_share_half_life)

    pn.serve({"/": app},
             port=port, address=address, prefix=prefix, show=show, title="Parallex",
             websocket_origin=origin, **options)
