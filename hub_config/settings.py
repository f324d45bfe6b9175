"""Settings of a Parallex JupyterHub: a small YAML file (PARALLEX_HUB_SETTINGS) plus environment.

Example::

    public_url: https://hub.example.edu        # where people open the hub
    hub_db_url: sqlite:////srv/parallex/jupyterhub.sqlite
    broker_url: http://127.0.0.1:8470          # where users' kernels reach the broker
    broker_db_url: postgresql://parallex@db/parallex   # the hub then runs the broker itself
    broker_listen: 0.0.0.0                     # where that broker listens (default: the
                                               # broker_url's host); lab agents must reach it
    gateway: 0.0.0.0:8786                      # the federation gateway beside the broker:
                                               # workers reach schedulers through it
    gateway_public: gw.hub.example.edu:8786    # the address workers dial (default: gateway);
                                               # alone: a gateway of its own (parallex gateway)
    gateway_internal: 10.0.0.5:8786            # the address schedulers dial it at (default:
                                               # gateway's, else gateway_public)
    institutions:
      north:
        display_name: North University
        issuer: https://login.north.example.edu
        client_id: parallex-hub
        client_secret_env: NORTH_OIDC_SECRET   # the secret itself stays out of the file
        username_claim: preferred_username
        contact: research-computing@north.example.edu
        labs:                                  # the first rule that matches names the lab
          - {claim: groups, value: physics, lab: north-physics}
          - {claim: email_domain, value: chem.north.example.edu, lab: north-chemistry}
        roles:                                 # the highest matching role wins; else member
          - {claim: groups, value: physics-pi, role: pi}
          - {claim: eduperson_entitlement, value: "urn:mace:north:parallex:admin", role: admin}

Environment variables override: PARALLEX_HUB_PUBLIC_URL, PARALLEX_HUB_DB_URL,
PARALLEX_BROKER_URL, PARALLEX_DB_URL (the broker's database), PARALLEX_BROKER_LISTEN,
PARALLEX_GATEWAY, PARALLEX_GATEWAY_PUBLIC and PARALLEX_GATEWAY_INTERNAL
(deploy/site/compose.yaml sets them from its environment file, so the file holds only the
institutions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from federation.cli_numbers import host_port_problem

ROLES = ("member", "pi", "admin")
CLAIM_KINDS_HELP = "a claim name (groups, eduperson_entitlement, ...) or email_domain"


class SettingsError(ValueError):
    """The hub settings are missing something or hold a bad value."""


@dataclass(frozen=True)
class ClaimRule:
    """``claim`` holds (or, for email_domain, the email's domain is) ``value``."""

    claim: str
    value: str
    lab: str | None = None
    role: str | None = None

    def matches(self, claims: dict[str, Any]) -> bool:
        if self.claim == "email_domain":
            email = str(claims.get("email") or "")
            return email.rpartition("@")[2].lower() == self.value.lower()
        held = claims.get(self.claim)
        if isinstance(held, list | tuple):
            return self.value in [str(v) for v in held]
        return held is not None and str(held) == self.value


@dataclass(frozen=True)
class Institution:
    """One institution's OpenID Connect provider and how its claims map onto labs and roles."""

    name: str
    display_name: str
    issuer: str
    client_id: str
    client_secret: str
    username_claim: str = "preferred_username"
    scopes: tuple[str, ...] = ("openid", "profile", "email", "groups", "offline_access")
    contact: str = ""
    labs: tuple[ClaimRule, ...] = ()
    roles: tuple[ClaimRule, ...] = ()

    def lab_for(self, claims: dict[str, Any]) -> str | None:
        """The lab the first matching rule names; None when no rule matches."""
        return next((r.lab for r in self.labs if r.matches(claims)), None)

    def role_for(self, claims: dict[str, Any]) -> str:
        """The highest role any matching rule gives; member when none does."""
        found = [r.role for r in self.roles if r.matches(claims)]
        return max(found, key=ROLES.index) if found else "member"


@dataclass(frozen=True)
class HubSettings:
    """Everything jupyterhub_config.py needs; see the module docstring for the file format."""

    public_url: str = "http://127.0.0.1:8000"
    hub_db_url: str = "sqlite:///jupyterhub.sqlite"
    broker_url: str = "http://127.0.0.1:8470"
    broker_db_url: str | None = None
    #: The address the hub-run broker binds (None: broker_url's host).
    broker_listen: str | None = None
    #: HOST:PORT of the federation gateway the hub-run broker opens (None: no gateway, workers
    #: must reach users' schedulers directly).
    gateway: str | None = None
    #: HOST:PORT workers dial for the gateway when it differs from ``gateway`` (NAT, load
    #: balancer); None: ``gateway``. Without ``gateway``: the address of a gateway that runs
    #: as a process of its own (``parallex gateway``), which the hub-run broker hands out.
    gateway_public: str | None = None
    #: HOST:PORT users' schedulers (in the hub's network) dial the gateway at; None: the
    #: broker's default (``gateway``'s bound address, else ``gateway_public``).
    gateway_internal: str | None = None
    data_dir: str = "."
    institutions: tuple[Institution, ...] = field(default_factory=tuple)

    def institution(self, name: str) -> Institution | None:
        return next((i for i in self.institutions if i.name == name), None)


def _rules(raw: Any, where: str, kind: str) -> tuple[ClaimRule, ...]:
    rules = []
    for n, item in enumerate(raw or []):
        if not isinstance(item, dict) or not {"claim", "value", kind} <= set(item):
            raise SettingsError(f"{where}.{kind}s[{n}] needs claim ({CLAIM_KINDS_HELP}), value "
                                f"and {kind}")
        if kind == "role" and item["role"] not in ROLES:
            raise SettingsError(f"{where}.roles[{n}]: role must be one of {', '.join(ROLES)}; "
                                f"got {item['role']!r}")
        rules.append(ClaimRule(str(item["claim"]), str(item["value"]),
                               lab=item.get("lab"), role=item.get("role")))
    return tuple(rules)


def _institution(name: str, raw: dict, env: dict[str, str]) -> Institution:
    where = f"institutions.{name}"
    missing = [k for k in ("issuer", "client_id") if not raw.get(k)]
    if missing:
        raise SettingsError(f"{where} needs {', '.join(missing)}")
    secret = raw.get("client_secret")
    if secret is None and raw.get("client_secret_env"):
        secret = env.get(raw["client_secret_env"])
        if not secret:
            raise SettingsError(f"{where}: environment variable {raw['client_secret_env']} "
                                "(its client secret) is not set")
    if not secret:
        raise SettingsError(f"{where} needs client_secret_env (or client_secret)")
    if not raw.get("labs"):
        raise SettingsError(f"{where} needs at least one labs rule; without one nobody from "
                            f"{name} could log in")
    return Institution(
        name=name, display_name=str(raw.get("display_name") or name),
        issuer=str(raw["issuer"]).rstrip("/"), client_id=str(raw["client_id"]),
        client_secret=str(secret),
        username_claim=str(raw.get("username_claim") or "preferred_username"),
        scopes=tuple(raw.get("scopes") or Institution.scopes),
        contact=str(raw.get("contact") or ""),
        labs=_rules(raw.get("labs"), where, "lab"), roles=_rules(raw.get("roles"), where, "role"))


def _text(raw: dict, key: str) -> str | None:
    value = raw.get(key)
    return None if value in (None, "") else str(value)


def _host_port(raw: dict, key: str) -> str | None:
    value = _text(raw, key)
    if value is None:
        return None
    if problem := host_port_problem(value):
        raise SettingsError(f"{key} {problem}")
    return value


def _from_env(env: dict[str, str], variable: str, key: str) -> dict[str, str]:
    return {key: env[variable]} if env.get(variable) else {}


def load_settings(path: str | Path | None = None,
                  env: dict[str, str] | None = None) -> HubSettings:
    """Read the settings file (PARALLEX_HUB_SETTINGS when ``path`` is None) and environment."""
    env = dict(os.environ if env is None else env)
    path = path or env.get("PARALLEX_HUB_SETTINGS")
    raw: dict = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"cannot read hub settings {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise SettingsError(f"hub settings {path} are not valid YAML: {exc}") from exc
    institutions = raw.get("institutions") or {}
    if not isinstance(institutions, dict) or not institutions:
        raise SettingsError("the hub settings name no institutions; add at least one under "
                            "'institutions:' (see hub_config/settings.py)")
    for name in institutions:
        if not str(name).replace("-", "").isalnum():
            raise SettingsError(f"institution name {name!r} may hold letters, digits and '-' "
                                "only (it becomes the username suffix)")
    return HubSettings(
        public_url=(env.get("PARALLEX_HUB_PUBLIC_URL") or raw.get("public_url")
                    or HubSettings.public_url).rstrip("/"),
        hub_db_url=env.get("PARALLEX_HUB_DB_URL") or raw.get("hub_db_url")
        or HubSettings.hub_db_url,
        broker_url=(env.get("PARALLEX_BROKER_URL") or raw.get("broker_url")
                    or HubSettings.broker_url).rstrip("/"),
        broker_db_url=env.get("PARALLEX_DB_URL") or raw.get("broker_db_url"),
        broker_listen=env.get("PARALLEX_BROKER_LISTEN") or _text(raw, "broker_listen"),
        gateway=_host_port({**raw, **_from_env(env, "PARALLEX_GATEWAY", "gateway")},
                           "gateway"),
        gateway_public=_host_port(
            {**raw, **_from_env(env, "PARALLEX_GATEWAY_PUBLIC", "gateway_public")},
            "gateway_public"),
        gateway_internal=_host_port(
            {**raw, **_from_env(env, "PARALLEX_GATEWAY_INTERNAL", "gateway_internal")},
            "gateway_internal"),
        data_dir=str(raw.get("data_dir") or Path(path).parent if path else "."),
        institutions=tuple(_institution(str(n), r or {}, env) for n, r in institutions.items()))
