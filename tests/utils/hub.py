"""A real JupyterHub (behind configurable-http-proxy) with institutions' identity providers
(the npm package oidc-provider), for tests.

Each provider sits behind a small HTTP relay in this process that can play a network attacker:
it can alter the id_token the provider returns (re-signed with the provider's key to test one
claim check at a time, or not re-signed to test the signature check). With ``mode=None`` it
passes everything through unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
import yaml
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from federation.ports import free_port
from hub_config import dev_oidc
from tests.utils.procs import Proc, parallex, ready, start_agent, wait_until

REPO = Path(__file__).resolve().parents[2]


def browser_login(hub_url: str, institution: str, username: str, password: str,
                  browser: httpx.Client | None = None) -> httpx.Response:
    """The browser's part of the authorization code flow, scripted; returns the last response
    (the hub's home page on success, the refusal page otherwise). Pass ``browser`` to keep
    its cookies (the hub session) afterwards."""
    with contextlib.ExitStack() as stack:
        if browser is None:
            browser = stack.enter_context(httpx.Client(follow_redirects=True, timeout=30))
        page = browser.get(f"{hub_url}/hub/login",
                           params={"institution": institution, "next": "/hub/home"})
        if page.status_code != 200 or "/interaction/" not in str(page.url):
            return page
        return browser.post(f"{page.url}/login", data={"username": username,
                                                       "password": password})


class TamperingRelay:
    """Forwards to ``target``; rewrites id_tokens in token responses according to ``mode``.

    Modes: None (pass through), "tamper" (change a claim, keep the old signature),
    "wrong_issuer", "expired", "nonce", "wrong_audience" (change the claim and re-sign).
    """

    def __init__(self, target: str, key: dict):
        self.target = target
        self.key = RSAKey.import_key(key)
        self.kid = key["kid"]
        self.mode: str | None = None
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/{path:path}", self._forward,
                                      methods=["GET", "POST", "HEAD"])])
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> TamperingRelay:
        self._thread.start()
        wait_until(lambda: self._server.started, 10, "the relay to listen")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    async def _forward(self, request: Request) -> Response:
        # Host is kept: the provider builds its absolute URLs from it, and they must point
        # back at the relay, or the browser would go around it.
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        async with httpx.AsyncClient() as client:
            upstream = await client.request(
                request.method, f"{self.target}{request.url.path}",
                params=request.query_params, headers=headers, content=await request.body())
        body = upstream.content
        if request.url.path == "/token" and self.mode and upstream.status_code == 200:
            tokens = upstream.json()
            tokens["id_token"] = self._alter(tokens["id_token"])
            body = json.dumps(tokens).encode()
        out = Response(body, status_code=upstream.status_code)
        for name, value in upstream.headers.multi_items():
            if name.lower() not in ("content-length", "content-encoding", "transfer-encoding"):
                out.headers.append(name, value)
        return out

    def _alter(self, id_token: str) -> str:
        head, payload, sig = id_token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if self.mode == "tamper":
            claims["preferred_username"] = "mallory"
            forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
            return f"{head}.{forged.decode()}.{sig}"
        if self.mode == "wrong_issuer":
            claims["iss"] = "http://127.0.0.1:1/evil"
        elif self.mode == "expired":
            claims["iat"], claims["exp"] = int(time.time()) - 7200, int(time.time()) - 3600
        elif self.mode == "nonce":
            claims["nonce"] = "not-the-nonce-of-this-login"
        elif self.mode == "wrong_audience":
            claims["aud"] = "some-other-app"
        return jwt.encode({"alg": "RS256", "kid": self.kid}, claims, self.key)


@dataclass
class DevInstitution:
    name: str
    title: str
    relay: TamperingRelay
    provider: Proc
    client_secret: str

    @property
    def issuer(self) -> str:
        return self.relay.url


# Access tokens far shorter than the authenticator's refresh margin (300 s): every
# refresh_user call renews them, which the refresh test relies on.
PROVIDER_TTL = {"AccessToken": 60, "IdToken": 60}


def start_institution(tmp: Path, name: str, title: str, users: dict[str, dev_oidc.DevUser],
                      hub_url: str) -> DevInstitution:
    """One identity provider behind its relay; the issuer is the relay's URL."""
    key = dev_oidc.signing_key(f"{name}-1")
    port = free_port()
    relay = TamperingRelay(f"http://127.0.0.1:{port}", key)
    secret = secrets.token_hex(16)
    settings = tmp / f"oidc-{name}.json"
    dev_oidc.write_settings(settings, issuer=relay.url, port=port, title=title,
                            client_id="parallex-hub", client_secret=secret,
                            redirect_uris=[f"{hub_url}/hub/oauth_callback"], users=users, key=key,
                            ttl=PROVIDER_TTL)
    provider = Proc(dev_oidc.command(settings), tmp / f"oidc-{name}.log")
    try:
        provider.wait_for_line("OIDC_READY ")
        relay.start()
    except BaseException:
        provider.stop()
        raise
    return DevInstitution(name, title, relay, provider, secret)


@dataclass
class Hub:
    """A running JupyterHub with its proxy, the broker as a managed service, and providers."""

    tmp: Path
    url: str
    broker_url: str
    admin_token: str
    hub: Proc
    institutions: dict[str, DevInstitution] = field(default_factory=dict)
    service_token: str = ""
    #: ``parallex gateway`` when the hub's broker names a gateway of its own.
    gateway: Proc | None = None

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.tmp / 'hub' / 'jupyterhub.sqlite'}?mode=ro",
                               uri=True)

    def users(self) -> set[str]:
        with contextlib.closing(self.db()) as con:
            return {r[0] for r in con.execute("SELECT name FROM users")}

    def groups_of(self, user: str) -> set[str]:
        with contextlib.closing(self.db()) as con:
            return {r[0] for r in con.execute(
                "SELECT g.name FROM groups g JOIN user_group_map m ON m.group_id = g.id "
                "JOIN users u ON u.id = m.user_id WHERE u.name = ?", (user,))}

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The hub's REST API as the test's admin service."""
        return httpx.request(method, f"{self.url}/hub/api{path}", timeout=30,
                             headers={"Authorization": f"token {self.service_token}"}, **kwargs)

    def login(self, institution: str, username: str, password: str) -> httpx.Response:
        return browser_login(self.url, institution, username, password)

    def start_lab_agent(self, lab: str, workdir: Path, name: str, *,
                        extra: tuple[str, ...] = (), prefix: tuple[str, ...] = (),
                        token: str | None = None) -> Proc:
        """A provider agent of ``lab`` (2 CPUs, 4 GiB) with a provider token the broker's
        administrator issues (or ``token``); the lab exists once one of its users signed in.
        ``prefix`` runs it elsewhere (e.g. in a network namespace)."""
        if token is None:
            token = self.provider_token(lab)
        return start_agent(self.broker_url, token, workdir, name=name, cpus=2, memory="4 GiB",
                           extra=extra, prefix=prefix)

    def provider_token(self, lab: str) -> str:
        """A provider token for ``lab``, issued by the broker's administrator."""
        with httpx.Client(base_url=f"{self.broker_url}/api/v1", timeout=30,
                          headers={"Authorization": f"Bearer {self.admin_token}"}) as broker:
            return broker.post("/tokens", json={"kind": "provider", "lab": lab}).json()["token"]

    def login_with(self, browser: httpx.Client, institution: str, username: str,
                   password: str) -> httpx.Response:
        return browser_login(self.url, institution, username, password, browser)

    def stop(self) -> None:
        self.hub.stop(30)
        if self.gateway is not None:
            self.gateway.stop()
        for inst in self.institutions.values():
            inst.relay.stop()
            inst.provider.stop()


DEMO_USERS = {
    "north": {
        "alice": dev_oidc.DevUser("alice-pw", {"email": "alice@north.example.edu",
                                               "groups": ["physics"]}),
        "petra": dev_oidc.DevUser("petra-pw", {"email": "petra@north.example.edu",
                                               "groups": ["physics", "physics-pi"]}),
        # In a lab by its claims, but on the hub's blocked_users list.
        "blocked": dev_oidc.DevUser("blocked-pw", {"email": "blocked@north.example.edu",
                                                   "groups": ["physics"]}),
        "nolab": dev_oidc.DevUser("nolab-pw", {"email": "nolab@north.example.edu",
                                               "groups": ["library"]}),
        # Never logs in successfully: the bad-token tests use it, so "no user created" holds.
        "newcomer": dev_oidc.DevUser("newcomer-pw", {"email": "newcomer@north.example.edu",
                                                     "groups": ["physics"]}),
    },
    "south": {
        "alice": dev_oidc.DevUser("alice-pw", {"email": "alice@chem.south.example.edu",
                                               "groups": []}),
        "root": dev_oidc.DevUser("root-pw", {"email": "root@south.example.edu",
                                             "groups": ["hpc-admins"]}),
    },
}

INSTITUTION_RULES = {
    "north": {"display_name": "North University", "contact": "rc-help@north.example.edu",
              "labs": [{"claim": "groups", "value": "physics", "lab": "north-physics"}],
              "roles": [{"claim": "groups", "value": "physics-pi", "role": "pi"}]},
    "south": {"display_name": "South Institute", "contact": "hpc@south.example.edu",
              "labs": [{"claim": "email_domain", "value": "chem.south.example.edu",
                        "lab": "south-chemistry"},
                       {"claim": "groups", "value": "hpc-admins", "lab": "south-hpc"}],
              "roles": [{"claim": "groups", "value": "hpc-admins", "role": "admin"}]},
}


def start_hub(tmp: Path, public_host: str = "127.0.0.1",
              gateway: bool | str = False) -> Hub:
    """Two institutions' providers, then JupyterHub (+ proxy, + the broker as its service).

    ``public_host``: the address the broker (and with ``gateway``, the federation gateway)
    listens on, where lab agents reach them; everything else stays on 127.0.0.1.
    ``gateway``: True runs it inside the hub's broker (hub setting ``gateway``); "own" runs
    ``parallex gateway`` as a process of its own, as a site does, and the hub's broker names
    it (``gateway_public``, ``gateway_internal``)."""
    hub_port, broker_port = free_port(), free_port()
    gateway_at = f"{public_host}:{free_port()}"
    if gateway == "own":
        gateway_settings = {"gateway_public": gateway_at, "gateway_internal": gateway_at}
    else:
        gateway_settings = {"gateway": gateway_at} if gateway else {}
    url, broker_url = f"http://127.0.0.1:{hub_port}", f"http://{public_host}:{broker_port}"
    (tmp / "hub").mkdir()
    institutions: dict[str, DevInstitution] = {}
    try:
        for name, title in (("north", "North University"), ("south", "South Institute")):
            institutions[name] = start_institution(tmp, name, title, DEMO_USERS[name], url)
        admin_token, service_token = secrets.token_hex(24), secrets.token_hex(24)
        settings = {
            "public_url": url, "hub_db_url": f"sqlite:///{tmp / 'hub' / 'jupyterhub.sqlite'}",
            "broker_url": broker_url, "broker_db_url": f"sqlite:///{tmp / 'broker.db'}",
            **gateway_settings,
            "institutions": {
                name: {**INSTITUTION_RULES[name], "issuer": inst.issuer,
                       "client_id": "parallex-hub",
                       "client_secret_env": f"{name.upper()}_OIDC_SECRET"}
                for name, inst in institutions.items()}}
        (tmp / "hub.yaml").write_text(yaml.safe_dump(settings))
        extra = tmp / "hub_extra_config.py"
        service = {"name": "test-admin", "api_token": service_token}
        role = {"name": "test-admin", "services": ["test-admin"],
                "scopes": ["admin:users", "admin:auth_state", "tokens", "read:groups",
                           "list:users", "servers"]}
        extra.write_text(f"c.JupyterHub.services.append({service!r})\n"
                         f"c.JupyterHub.load_roles.append({role!r})\n"
                         # Ask refresh_user on (almost) every request, so the test need not
                         # wait the default two minutes.
                         "c.Authenticator.auth_refresh_age = 1\n"
                         "c.Authenticator.blocked_users = {'blocked@north'}\n")
        env = {"PARALLEX_HUB_SETTINGS": str(tmp / "hub.yaml"),
               "PARALLEX_HUB_DATA": str(tmp / "hub"),
               "PARALLEX_HUB_INTERNAL_URL": f"http://127.0.0.1:{free_port()}",
               "PARALLEX_PROXY_API_URL": f"http://127.0.0.1:{free_port()}",
               "PARALLEX_DASHBOARD_PORT": str(free_port()),
               "PARALLEX_HUB_EXTRA_CONFIG": str(extra),
               "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16),
               "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
               "PARALLEX_ADMIN_TOKEN": admin_token,
               **{f"{n.upper()}_OIDC_SECRET": i.client_secret for n, i in institutions.items()}}
        hub = Proc([sys.executable, "-m", "jupyterhub", "-f",
                    str(REPO / "hub_config" / "jupyterhub_config.py")],
                   tmp / "jupyterhub.log", env=env)
        running = Hub(tmp, url, broker_url, admin_token, hub, institutions, service_token)
    except BaseException:
        for inst in institutions.values():
            inst.relay.stop()
            inst.provider.stop()
        raise
    try:
        def up() -> bool:
            if hub.popen.poll() is not None:
                raise AssertionError("JupyterHub exited:\n" + hub.log_text()[-4000:])
            with contextlib.suppress(httpx.HTTPError):
                return (httpx.get(f"{url}/hub/api/", timeout=2).status_code == 200
                        and httpx.get(f"{broker_url}/api/v1/openapi.json",
                                      timeout=2).status_code == 200)
            return False

        wait_until(up, 90, "JupyterHub, its proxy and the broker service to answer",
                   interval=0.3)
        if gateway == "own":
            running.gateway = Proc(parallex("--log-level", "INFO", "gateway", "--listen",
                                            gateway_at, "--db-url",
                                            f"sqlite:///{tmp / 'broker.db'}"),
                                   tmp / "gateway.log")
            assert ready(running.gateway, "PARALLEX_GATEWAY=") == gateway_at
    except BaseException:
        running.stop()
        raise
    return running
