"""The development identity providers: settings for node/dev_oidc.mjs (one per institution)
and the command that runs it. Used by `parallex up` and by the tests; never in production."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from joserfc.jwk import RSAKey

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "node" / "dev_oidc.mjs"


@dataclass
class DevUser:
    """A demo account and the claims its institution releases."""

    password: str
    claims: dict = field(default_factory=dict)


def signing_key(kid: str = "dev-1") -> dict:
    """A fresh private RSA JWK for signing id_tokens."""
    key = RSAKey.generate_key(2048, private=True,
                              parameters={"kid": kid, "use": "sig", "alg": "RS256"})
    return key.as_dict(private=True)


def write_settings(path: Path, *, issuer: str, port: int, title: str, client_id: str,
                   client_secret: str, redirect_uris: list[str], users: dict[str, DevUser],
                   key: dict | None = None, ttl: dict | None = None) -> dict:
    """Write the provider's settings file (mode 0600: it holds a private key); returns the key."""
    key = key or signing_key()
    path.write_text(json.dumps({
        "issuer": issuer, "port": port, "title": title, "jwks": {"keys": [key]},
        "cookie_keys": [secrets.token_hex(32)],
        "clients": [{"client_id": client_id, "client_secret": client_secret,
                     "redirect_uris": redirect_uris}],
        "users": {name: {"password": u.password, "claims": u.claims} for name, u in users.items()},
        "ttl": ttl or {}}, indent=2))
    path.chmod(0o600)
    return key


def command(settings_path: Path) -> list[str]:
    """How to run one provider; needs `npm install` in node/ (./dev does it)."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed; the development identity provider needs "
                           "Node.js 20 or newer")
    if not (REPO / "node" / "node_modules" / "oidc-provider").exists():
        raise RuntimeError("the npm packages are missing: run `npm install` in node/ "
                           "(./dev up and ./dev test do it)")
    return [node, str(SCRIPT), str(settings_path)]
