"""OpenID Connect relying party: discovery, the authorization code flow with PKCE, and the
checks on an id_token (signature against the provider's JWKS, issuer, audience, expiry, nonce).

Built on authlib (PKCE, state and nonce, the token endpoint) and joserfc (authlib's JOSE
library) for the signature. Nothing here knows about JupyterHub.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import KeySet

with warnings.catch_warnings():
    # authlib announces a future move of its httpx integration; the client itself is current.
    warnings.simplefilter("ignore")
    from authlib.integrations.httpx_client import AsyncOAuth2Client

from .settings import Institution

CLOCK_LEEWAY = 60  # seconds of clock difference tolerated between us and the provider
DISCOVERY_TTL = 3600


class OidcError(Exception):
    """A login cannot go on; ``reason`` is what the person at the browser is told."""

    def __init__(self, reason: str, status: int = 403):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class ProviderMetadata:
    """What discovery told us about one provider."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks: dict
    userinfo_endpoint: str | None = None


@dataclass(frozen=True)
class AuthRequest:
    """One login in progress: the URL to send the browser to and what to check on return."""

    url: str
    state: str
    nonce: str
    code_verifier: str


class OidcClient:
    """The relying party for one institution; caches discovery and keys for an hour."""

    def __init__(self, institution: Institution, redirect_uri: str, timeout: float = 10.0):
        self.institution = institution
        self.redirect_uri = redirect_uri
        self.timeout = timeout
        self._metadata: ProviderMetadata | None = None
        self._fetched_at = 0.0

    async def metadata(self, refresh: bool = False) -> ProviderMetadata:
        """Discovery document and JWKS; the document must name the configured issuer."""
        if self._metadata and not refresh and time.monotonic() - self._fetched_at < DISCOVERY_TTL:
            return self._metadata
        issuer = self.institution.issuer
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as http:
                found = await http.get(f"{issuer}/.well-known/openid-configuration")
                doc = found.raise_for_status().json()
                if str(doc.get("issuer", "")).rstrip("/") != issuer:
                    raise OidcError(
                        f"{self.institution.display_name}'s sign-in service presents itself as "
                        f"{doc.get('issuer')!r}, not the configured {issuer!r}; the hub "
                        "administrator must correct the issuer", status=502)
                jwks = (await http.get(doc["jwks_uri"])).raise_for_status().json()
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise OidcError(f"{self.institution.display_name}'s sign-in service cannot be "
                            f"reached ({exc.__class__.__name__}); try again in a few minutes",
                            status=502) from exc
        self._metadata = ProviderMetadata(
            issuer=issuer, authorization_endpoint=doc["authorization_endpoint"],
            token_endpoint=doc["token_endpoint"], jwks=jwks,
            userinfo_endpoint=doc.get("userinfo_endpoint"))
        self._fetched_at = time.monotonic()
        return self._metadata

    async def start(self) -> AuthRequest:
        """A fresh state, nonce and PKCE verifier, and the provider URL carrying them."""
        meta = await self.metadata()
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        query = urlencode({
            "response_type": "code", "client_id": self.institution.client_id,
            "redirect_uri": self.redirect_uri, "scope": " ".join(self.institution.scopes),
            "state": state, "nonce": nonce,
            "code_challenge": create_s256_code_challenge(verifier),
            "code_challenge_method": "S256"})
        return AuthRequest(f"{meta.authorization_endpoint}?{query}", state, nonce, verifier)

    def _client(self) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(client_id=self.institution.client_id,
                                 client_secret=self.institution.client_secret,
                                 token_endpoint_auth_method="client_secret_basic",
                                 redirect_uri=self.redirect_uri, timeout=self.timeout)

    async def finish(self, code: str, request: AuthRequest) -> tuple[dict, dict]:
        """Exchange ``code`` (with the PKCE verifier); returns (tokens, verified claims)."""
        meta = await self.metadata()
        try:
            async with self._client() as client:
                tokens = dict(await client.fetch_token(
                    meta.token_endpoint, grant_type="authorization_code", code=code,
                    code_verifier=request.code_verifier))
        except Exception as exc:  # authlib raises its own OAuth errors and httpx's
            raise OidcError(f"{self.institution.display_name} refused to complete the sign-in "
                            f"({exc}); start again from the login page") from exc
        if "id_token" not in tokens:
            raise OidcError(f"{self.institution.display_name} sent no id_token; the hub "
                            "administrator must enable OpenID Connect for this client")
        return tokens, await self.verify_id_token(tokens["id_token"], nonce=request.nonce)

    async def refresh(self, refresh_token: str) -> dict:
        """New tokens for a refresh token; raises OidcError when the provider refuses."""
        meta = await self.metadata()
        try:
            async with self._client() as client:
                return dict(await client.refresh_token(meta.token_endpoint,
                                                       refresh_token=refresh_token))
        except Exception as exc:
            raise OidcError(f"{self.institution.display_name} refused to refresh the sign-in "
                            f"({exc}); sign in again") from exc

    async def verify_id_token(self, id_token: str, *, nonce: str | None,
                              now: float | None = None) -> dict:
        """The id_token's claims after checking signature, iss, aud, exp and nonce."""
        meta = await self.metadata()
        try:
            keys = KeySet.import_key_set(meta.jwks)
            try:
                token = jwt.decode(id_token, keys, algorithms=["RS256", "ES256", "PS256"])
            except jose_errors.BadSignatureError:
                # The provider may have rotated its keys since we cached them.
                meta = await self.metadata(refresh=True)
                token = jwt.decode(id_token, KeySet.import_key_set(meta.jwks),
                                   algorithms=["RS256", "ES256", "PS256"])
        except jose_errors.JoseError as exc:
            raise OidcError("the sign-in answer's signature does not match "
                            f"{self.institution.display_name}'s keys; it may have been altered "
                            "on the way — start again from the login page") from exc
        claims = dict(token.claims)
        options: dict[str, Any] = {
            "iss": {"essential": True, "value": meta.issuer},
            "aud": {"essential": True, "value": self.institution.client_id},
            "exp": {"essential": True}, "sub": {"essential": True}}
        if nonce is not None:
            options["nonce"] = {"essential": True, "value": nonce}
        registry = jwt.JWTClaimsRegistry(now=int(now or time.time()), leeway=CLOCK_LEEWAY,
                                         **options)
        try:
            registry.validate(claims)
        except jose_errors.ExpiredTokenError as exc:
            raise OidcError("the sign-in answer has expired (check that this computer's clock "
                            "is right); start again from the login page") from exc
        except jose_errors.ClaimError as exc:
            claim = getattr(exc, "claim", "") or str(exc)
            what = {"iss": "was issued by another provider",
                    "aud": "was meant for another application",
                    "nonce": "does not belong to this sign-in (nonce mismatch)"}.get(
                        claim, f"has a bad {claim!r} claim")
            raise OidcError(f"the sign-in answer {what}; start again from the login "
                            "page") from exc
        return claims
