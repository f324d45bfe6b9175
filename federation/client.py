"""HTTP clients for the broker API that turn status codes into the documented exceptions."""

from __future__ import annotations

from typing import Any

import httpx

from . import errors

API = "/api/v1"


def raise_for_answer(response: httpx.Response) -> Any:
    """Return the JSON body of a 2xx answer, or raise the matching ParallexError."""
    if response.is_success:
        return response.json() if response.content else None
    try:
        body = response.json()
        message = body.get("message") or body.get("detail") or response.text
        code = body.get("error", "")
    except (ValueError, AttributeError):
        message, code = response.text or response.reason_phrase, ""
    status = response.status_code
    if status == 401:
        raise errors.TokenRefused(f"the broker refused the token: {message}")
    if status == 403:
        if code == "quota-exceeded":
            raise errors.QuotaExceeded(message)
        raise errors.PermissionDenied(message)
    if status == 402:
        raise errors.CreditLimitExceeded(message, status, code)
    if status == 404:
        raise errors.NotFound(message)
    if code == "no-provider-fits":
        raise errors.NoProviderFits(message, status, code)
    if 400 <= status < 500:
        raise errors.RequestRejected(message, status, code)
    raise errors.BrokerError(f"the broker failed with HTTP {status}: {message}")


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len(API)] if url.endswith(API) else url


def _unreachable(url: str, exc: Exception) -> errors.BrokerUnreachable:
    return errors.BrokerUnreachable(
        f"cannot reach the Parallex broker at {url} ({type(exc).__name__}: {exc}); check "
        "PARALLEX_BROKER_URL and that the broker is running"
    )


class AsyncBrokerClient:
    """Async client for the broker API (used by FederatedCluster and the provider agent)."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        if not url:
            raise errors.RequestRejected(
                "no broker URL: pass broker_url=, set PARALLEX_BROKER_URL or the dask config "
                "key parallex.broker-url"
            )
        if not token:
            raise errors.TokenRefused(
                "no API token: pass token=, set PARALLEX_TOKEN or the dask config key "
                "parallex.token"
            )
        self.url = _base(url)
        self._http = httpx.AsyncClient(
            base_url=self.url + API,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    async def request(self, method: str, path: str, *, timeout: float | None = None,
                      **kwargs: Any) -> Any:
        try:
            extra = {"timeout": timeout} if timeout is not None else {}
            response = await self._http.request(method, path, **kwargs, **extra)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return raise_for_answer(response)

    async def close(self) -> None:
        await self._http.aclose()


class BrokerClient:
    """Blocking client for the broker API (used by the CLI)."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        if not url or not token:
            raise errors.RequestRejected(
                "the broker URL and token are needed: set PARALLEX_BROKER_URL and "
                "PARALLEX_ADMIN_TOKEN (or PARALLEX_TOKEN), or pass --broker and --token"
            )
        self.url = _base(url)
        self._http = httpx.Client(base_url=self.url + API,
                                  headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return raise_for_answer(response)

    def close(self) -> None:
        self._http.close()
