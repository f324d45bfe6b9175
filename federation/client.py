"""HTTP clients for the broker API that turn status codes into the documented exceptions."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import httpx

from . import errors

API = "/api/v1"


def _not_json(response: httpx.Response) -> str:
    """What an answer that is not the broker's JSON says, for a message: an HTML page's
    title (a proxy's error page), else its text, shortened."""
    text = response.text.strip()
    if "html" in response.headers.get("content-type", "") or text.startswith("<"):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.S | re.I)
        return " ".join(title.group(1).split()) if title else response.reason_phrase
    return text[:300] or response.reason_phrase


#: Statuses a proxy in front of the broker answers when the broker behind it does not.
PROXY_FAILURES = (502, 503, 504)


def raise_for_answer(response: httpx.Response) -> Any:
    """Return the JSON body of a 2xx answer, or raise the matching ParallexError."""
    if response.is_success:
        return response.json() if response.content else None
    status = response.status_code
    try:
        body = response.json()
        message = body.get("message") or body.get("detail") or response.text
        code = body.get("error", "")
    except (ValueError, AttributeError):
        message, code = _not_json(response), ""
        if status in PROXY_FAILURES:
            # Not the broker's answer: JupyterHub's proxy (or another in front of it) could
            # not reach it, as while it restarts. Callers retry this as they retry a broker
            # they cannot connect to.
            where = f"{response.url.scheme}://{response.url.netloc.decode()}"
            raise errors.BrokerUnreachable(
                f"the Parallex broker did not answer: {where} answered HTTP {status} "
                f"({message}) in its place, so the broker behind it is not running or is "
                "restarting; try again in a minute, and tell the hub's administrator if it "
                "lasts") from None
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
    if code == "environment-refused":
        raise errors.EnvironmentRefused(message, status, code)
    if 400 <= status < 500:
        raise errors.RequestRejected(message, status, code)
    if status == 503:
        raise errors.BrokerError(f"the broker cannot answer for now (HTTP 503): {message}")
    raise errors.BrokerError(f"the broker failed with HTTP {status}: {message}")


#: How often a request answered 429 (rate limited), or 503 with a Retry-After (the broker
#: or its database cannot answer for now, and changed nothing), is retried after waiting.
RATE_LIMIT_RETRIES = 5

logger = logging.getLogger("parallex.client")


def worth_retrying(response: httpx.Response) -> bool:
    """Whether the answer asks to come back later: 429, or 503 with Retry-After (a 503
    without one, a heartbeat the broker could not record, is left to the caller's next)."""
    return response.status_code == 429 or (response.status_code == 503
                                           and "retry-after" in response.headers)


def _waiting(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait before the retry of ``response``'s request, said in the log."""
    wait = retry_after(response)
    try:
        why = response.json().get("message", "")
    except ValueError:
        why = ""
    logger.warning("the broker answered HTTP %d to %s %s%s; trying again in %.1f s "
                   "(%d of %d)", response.status_code, response.request.method,
                   response.request.url.path, f" ({why})" if why else "", wait, attempt + 1,
                   RATE_LIMIT_RETRIES)
    return wait


def retry_after(response: httpx.Response) -> float:
    """Seconds a 429 or 503 answer asks to wait (Retry-After), between 0.1 and 10."""
    try:
        return min(10.0, max(0.1, float(response.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len(API)] if url.endswith(API) else url


def _unreachable(url: str, exc: Exception) -> errors.BrokerUnreachable:
    return errors.BrokerUnreachable(
        f"cannot reach the Parallex broker at {url} ({type(exc).__name__}: {exc}); check "
        "PARALLEX_BROKER_URL and that the broker is running"
    )


class AsyncBrokerClient:
    """Async client for the broker API (used by FederatedCluster and the provider agent).

    ``url`` may list several broker replicas, comma-separated: when the one in use does not
    answer, the request fails (BrokerUnreachable, which callers retry) and the next one is
    used from then on."""

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
        self.urls = [_base(u.strip()) for u in url.split(",") if u.strip()]
        self.url = self.urls[0]
        self._token, self._timeout = token, timeout
        self._http = self._client(self.url)
        self._retired: list[httpx.AsyncClient] = []

    def _client(self, url: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=url + API,
                                 headers={"Authorization": f"Bearer {self._token}"},
                                 timeout=self._timeout)

    def _fail_over(self, failed: httpx.AsyncClient) -> None:
        """Use the next replica, once per failure of the one in use (requests in flight on
        the failed one fail together and must not move on twice)."""
        if len(self.urls) < 2 or failed is not self._http:
            return
        self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
        self._retired.append(self._http)  # closed in close(): requests may still use it
        self._http = self._client(self.url)

    async def request(self, method: str, path: str, *, timeout: float | None = None,
                      **kwargs: Any) -> Any:
        """The JSON answer of a 2xx, or the matching ParallexError (429s waited out)."""
        return raise_for_answer(await self._send(method, path, timeout, kwargs))

    async def request_bytes(self, method: str, path: str, *, timeout: float | None = None,
                            **kwargs: Any) -> bytes:
        """Like ``request``, for an answer that is bytes (a shipped wheel), not JSON."""
        response = await self._send(method, path, timeout, kwargs)
        if response.is_success:
            return response.content
        raise_for_answer(response)
        raise AssertionError("unreachable")

    async def _send(self, method: str, path: str, timeout: float | None,
                    kwargs: dict[str, Any]) -> httpx.Response:
        """The answer, after waiting out 429s (rate limits) and 503s with a Retry-After up to
        RATE_LIMIT_RETRIES times."""
        extra = {"timeout": timeout} if timeout is not None else {}
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            http, url = self._http, self.url
            try:
                response = await http.request(method, path, **kwargs, **extra)
            except httpx.TransportError as exc:
                self._fail_over(http)
                raise _unreachable(url, exc) from exc
            if not worth_retrying(response) or attempt == RATE_LIMIT_RETRIES:
                return response
            await asyncio.sleep(_waiting(response, attempt))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for http in [*self._retired, self._http]:
            await http.aclose()


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
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise _unreachable(self.url, exc) from exc
            if not worth_retrying(response) or attempt == RATE_LIMIT_RETRIES:
                return raise_for_answer(response)
            time.sleep(_waiting(response, attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()
