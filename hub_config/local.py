"""The JupyterHub part of `parallex up`: two demo institutions' identity providers (the npm
package oidc-provider), their demo accounts, and a hub that runs the broker as its service.

Development only: the accounts have fixed passwords and everything binds to 127.0.0.1.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from federation.ports import free_port

from . import dev_oidc

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class DemoAccount:
    institution: str
    username: str
    password: str
    role: str
    lab: str


def demo_accounts(labs: int) -> list[DemoAccount]:
    """North's people are in demo-lab-1; South's in demo-lab-2 (demo-lab-1 with one lab)."""
    south_lab = f"demo-lab-{min(2, labs)}"
    return [DemoAccount("north", "ada", "ada-demo", "member", "demo-lab-1"),
            DemoAccount("north", "pia", "pia-demo", "pi", "demo-lab-1"),
            DemoAccount("south", "sam", "sam-demo", "member", south_lab),
            DemoAccount("south", "root", "root-demo", "admin", south_lab)]


def _users(accounts: list[DemoAccount], institution: str, domain: str) -> dict:
    users = {}
    for a in accounts:
        if a.institution != institution:
            continue
        groups = {"pi": ["parallex-member", "parallex-pi"],
                  "admin": ["parallex-member", "parallex-admin"]}.get(a.role, ["parallex-member"])
        users[a.username] = dev_oidc.DevUser(a.password, {"email": f"{a.username}@{domain}",
                                                          "groups": groups})
    return users


@dataclass
class LocalHubPlan:
    """What `parallex up` starts for the hub, with the commands and their environment."""

    hub_url: str
    broker_url: str
    provider_commands: dict[str, list[str]]
    hub_command: list[str]
    hub_env: dict[str, str]
    accounts: list[DemoAccount]


def plan(data: Path, *, labs: int, hub_port: int, broker_port: int, admin_token: str,
         broker_db_url: str) -> LocalHubPlan:
    """Write the providers' and the hub's settings under ``data``; return how to start them."""
    hub_url = f"http://127.0.0.1:{hub_port}"
    broker_url = f"http://127.0.0.1:{broker_port}"
    accounts = demo_accounts(labs)
    (data / "hub").mkdir(parents=True, exist_ok=True)
    institutions, commands, secrets_env = {}, {}, {}
    for name, title, domain in (("north", "North University", "north.example.edu"),
                                ("south", "South Institute", "south.example.edu")):
        port = free_port()
        secret = secrets.token_hex(16)
        settings = data / f"oidc-{name}.json"
        dev_oidc.write_settings(settings, issuer=f"http://127.0.0.1:{port}", port=port,
                                title=title, client_id="parallex-hub", client_secret=secret,
                                redirect_uris=[f"{hub_url}/hub/oauth_callback"],
                                users=_users(accounts, name, domain))
        commands[name] = dev_oidc.command(settings)
        secrets_env[f"{name.upper()}_OIDC_SECRET"] = secret
        lab = next(a.lab for a in accounts if a.institution == name)
        institutions[name] = {
            "display_name": title, "issuer": f"http://127.0.0.1:{port}",
            "client_id": "parallex-hub", "client_secret_env": f"{name.upper()}_OIDC_SECRET",
            "contact": f"the demo's administrator (see {data / 'demo.env'})",
            "labs": [{"claim": "groups", "value": "parallex-member", "lab": lab}],
            "roles": [{"claim": "groups", "value": "parallex-pi", "role": "pi"},
                      {"claim": "groups", "value": "parallex-admin", "role": "admin"}]}
    settings_file = data / "hub.yaml"
    settings_file.write_text(yaml.safe_dump({
        "public_url": hub_url, "hub_db_url": f"sqlite:///{data / 'hub' / 'jupyterhub.sqlite'}",
        "broker_url": broker_url, "broker_db_url": broker_db_url,
        "institutions": institutions}))
    env = {"PARALLEX_HUB_SETTINGS": str(settings_file), "PARALLEX_HUB_DATA": str(data / "hub"),
           "PARALLEX_HUB_INTERNAL_URL": f"http://127.0.0.1:{free_port()}",
           "PARALLEX_PROXY_API_URL": f"http://127.0.0.1:{free_port()}",
           "PARALLEX_DASHBOARD_PORT": str(free_port()),
           "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16),
           "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
           "PARALLEX_ADMIN_TOKEN": admin_token, **secrets_env}
    return LocalHubPlan(hub_url, broker_url, commands,
                        [sys.executable, "-m", "jupyterhub", "-f",
                         str(HERE / "jupyterhub_config.py")], env, accounts)
