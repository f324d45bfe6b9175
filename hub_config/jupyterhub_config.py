# JupyterHub configuration for Parallex.
#
#   PARALLEX_HUB_SETTINGS=/srv/parallex/hub.yaml jupyterhub -f hub_config/jupyterhub_config.py
#
# Everything site-specific lives in the settings file (see hub_config/settings.py): the public
# URL, the institutions and their OpenID Connect clients, the databases and the broker. This
# file turns it into JupyterHub configuration and should rarely need editing. Secrets come from
# the environment: JUPYTERHUB_CRYPT_KEY (encrypts auth_state; required), PARALLEX_ADMIN_TOKEN
# (the broker's admin token, used to write lab memberships at login), the institutions'
# client_secret_env variables, and optionally CONFIGPROXY_AUTH_TOKEN.
# ruff: noqa: F821  (`c` is provided by JupyterHub when it loads this file)

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from hub_config.homes import copy_example_notebooks
from hub_config.settings import load_settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
settings = load_settings()
data_dir = Path(os.environ.get("PARALLEX_HUB_DATA", settings.data_dir)).resolve()
data_dir.mkdir(parents=True, exist_ok=True)

# ---- where the hub listens ----------------------------------------------------------------
# bind_url is the public proxy's address; the hub process itself listens on hub_bind_url,
# reachable only from the proxy and the single-user servers.
# Behind a TLS-terminating proxy (deploy/site) the hub listens elsewhere than its public URL.
c.JupyterHub.bind_url = os.environ.get("PARALLEX_HUB_BIND_URL") or settings.public_url
c.JupyterHub.hub_bind_url = os.environ.get("PARALLEX_HUB_INTERNAL_URL", "http://127.0.0.1:8081")
c.JupyterHub.db_url = settings.hub_db_url
c.JupyterHub.cookie_secret_file = str(data_dir / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(data_dir / "jupyterhub.pid")

# ---- the proxy: configurable-http-proxy from npm (installed into node/ by ./dev) ------------
chp = REPO / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
c.ConfigurableHTTPProxy.command = [str(chp)] if chp.exists() else ["configurable-http-proxy"]
c.ConfigurableHTTPProxy.api_url = os.environ.get("PARALLEX_PROXY_API_URL",
                                                 "http://127.0.0.1:8001")
c.ConfigurableHTTPProxy.pid_file = str(data_dir / "jupyterhub-proxy.pid")

# ---- sign-in: institutional OpenID Connect --------------------------------------------------
c.JupyterHub.authenticator_class = "parallex-oidc"
c.ParallexOIDCAuthenticator.settings_file = os.environ.get("PARALLEX_HUB_SETTINGS", "")
c.JupyterHub.template_paths = [str(HERE / "templates")]
# auth_state (tokens, claims, lab, role) is stored encrypted; JupyterHub refuses to start
# without JUPYTERHUB_CRYPT_KEY when it is enabled.
c.Authenticator.enable_auth_state = True

# ---- the broker as a JupyterHub-managed service ----------------------------------------------
# Users (and their servers' tokens) get access to the broker service; the broker accepts a
# hub token only when it carries access:services!service=parallex.
broker_port = urlsplit(settings.broker_url).port or 8470
broker_service = {"name": "parallex", "url": settings.broker_url, "display": False}
if settings.broker_db_url:
    # The hub starts and stops the broker; it hands it JUPYTERHUB_API_URL, which turns on
    # hub-token checks, and JUPYTERHUB_SERVICE_PREFIX, under which it is also served.
    broker_host = settings.broker_listen or urlsplit(settings.broker_url).hostname
    broker_service["command"] = [
        sys.executable, "-m", "federation.cli", "broker", "--host", broker_host or "127.0.0.1",
        "--port", str(broker_port), "--db-url", settings.broker_db_url]
    # Workers at other sites reach users' schedulers (inside the hub's network) only through
    # the gateway's one public port: beside this broker (gateway), or a process of its own
    # (gateway_public alone: `parallex gateway`, which outlives the broker's restarts).
    if settings.gateway:
        broker_service["command"] += ["--gateway", settings.gateway]
    if settings.gateway or settings.gateway_public:
        for flag, value in (("--gateway-public", settings.gateway_public),
                            ("--gateway-internal", settings.gateway_internal)):
            if value:
                broker_service["command"] += [flag, value]
    broker_service["environment"] = {
        k: os.environ[k] for k in ("PARALLEX_ADMIN_TOKEN", "PATH", "HOME") if k in os.environ}
# The Panel dashboards: a managed service behind the hub's OAuth (people log in with their hub
# session), reading the broker's database. It needs the broker's database URL, so it runs when
# the hub runs the broker.
dashboard_port = int(os.environ.get("PARALLEX_DASHBOARD_PORT", broker_port + 1))
dashboard_service = {"name": "parallex-dashboard", "display": True,
                     "url": f"http://127.0.0.1:{dashboard_port}", "oauth_no_confirm": True}
if settings.broker_db_url:
    dashboard_service["command"] = [
        sys.executable, "-m", "federation.cli", "dashboard", "--db-url", settings.broker_db_url,
        "--port", str(dashboard_port)]
    dashboard_service["environment"] = {k: os.environ[k] for k in ("PATH", "HOME")
                                        if k in os.environ}
c.JupyterHub.services = [broker_service, dashboard_service]
c.JupyterHub.load_roles = [
    {"name": "user", "scopes": ["self", "access:services!service=parallex",
                                "access:services!service=parallex-dashboard"]},
]

# ---- single-user servers ---------------------------------------------------------------------
# The server's own token (JUPYTERHUB_API_TOKEN) must reach the broker, so it gets the broker
# scope besides the default server scopes; the Parallex kernel uses it.
c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server",
                                 "access:services!service=parallex"]
c.Spawner.environment = {
    "PARALLEX_BROKER_URL": settings.broker_url,
    # The broker as the user's browser reaches it (through the hub's proxy): where it serves
    # a cluster's Dask dashboard when the server has no link of its own for it.
    "PARALLEX_BROKER_PUBLIC_URL": f"{settings.public_url}/services/parallex/",
    # The Dask dashboard opens through the user's own server (jupyter-server-proxy), the one
    # address a browser on the hub can reach; cluster.dashboard_link, %parallex, the cluster
    # widget and dask-labextension all use this link.
    "DASK_DISTRIBUTED__DASHBOARD__LINK": "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status",
    # dask-labextension's "new cluster" button makes a FederatedCluster on the pool, adaptive
    # from 0 workers, so an idle cluster holds nothing and costs nothing.
    "DASK_LABEXTENSION__FACTORY__MODULE": "federation",
    "DASK_LABEXTENSION__FACTORY__CLASS": "FederatedCluster",
    "DASK_LABEXTENSION__DEFAULT__ADAPT__MINIMUM": "0",
    "DASK_LABEXTENSION__DEFAULT__ADAPT__MAXIMUM": "4",
}
c.Spawner.default_url = "/lab"
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
# Development and single-machine sites run every server as the hub's own account in a
# per-user folder; a real site sets PARALLEX_SPAWNER (e.g. "systemdspawner" or a batch
# spawner) and its options in an extra config file.
c.JupyterHub.spawner_class = os.environ.get("PARALLEX_SPAWNER", "simple")
if c.JupyterHub.spawner_class == "simple":
    c.SimpleLocalProcessSpawner.home_dir_template = str(data_dir / "users" / "{username}")
    if os.geteuid() == 0:
        # Development spawner only: its servers run as the hub's own account, which is root in
        # containers and CI, and jupyter-server refuses root without this flag.
        c.Spawner.args = ["--allow-root"]

# A new user's home starts with the example notebooks (never overwriting their own copies).
c.Spawner.pre_spawn_hook = copy_example_notebooks

# ---- site additions ----------------------------------------------------------------------------
# A site (or a test) adds services, roles or spawner options in its own file, loaded last.
extra_config = os.environ.get("PARALLEX_HUB_EXTRA_CONFIG")
if extra_config:
    load_subconfig(extra_config)
