"""Per-token request-rate and concurrency limits on the agent and cluster endpoints, and
concurrency limits on every other read.

One misbehaving agent or notebook (a poll loop with a stale version, a script hammering
heartbeats) must not slow the broker for everyone else. The limit is checked in an ASGI
middleware before authentication or the database, so a refused request costs a hash and a
dictionary lookup; it is answered 429 with Retry-After, which the Parallex clients honour.

A client that ignores Retry-After would still keep the event loop busy with refusals, so a
refusal is held for up to a second before it is sent (a tarpit: waiting costs no CPU, and a
client that waits for its answer is slowed to the rate it was given). At most
``TARPIT_PER_KEY`` refusals per key are held at once; past that they are sent at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field

LIMITED_PREFIXES = ("/agent/", "/clusters")
#: Reads that sum over history (usage totals, a lab's members, machines and ledger, the
#: job-record feed, a transfer's explanation): a thread and a database connection each for as
#: long as they take, so one token gets only a few at once (--max-concurrent-reports).
REPORT_PATHS = re.compile(
    r"^/(usage(/records)?|labs/[^/]+/(members|machines|ledger)|transfers/[^/]+)/?$")
#: Longest a refusal is held before it is sent, in seconds.
TARPIT_SECONDS = 1.0
#: Most refusals held at once per key; more are answered at once.
TARPIT_PER_KEY = 64


@dataclass
class _Bucket:
    tokens: float
    updated: float
    in_flight: int = 0
    held: int = 0


@dataclass
class RateLimiter:
    """Token buckets (``rate`` per second, up to ``burst``) and in-flight counts per key."""

    rate: float = 20.0
    burst: float = 100.0
    max_concurrent: int = 16
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def acquire(self, key: str, now: float | None = None,
                max_concurrent: int | None = None, rate: bool = True) -> float | None:
        """Take one request for ``key``; None when allowed, else seconds to wait.
        ``max_concurrent`` replaces the limiter's own for this key's requests; without
        ``rate`` only the requests in flight count."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._forget_idle(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.in_flight >= (max_concurrent or self.max_concurrent):
            return 1.0
        if rate:
            if bucket.tokens < 1:
                return (1 - bucket.tokens) / self.rate
            bucket.tokens -= 1
        bucket.in_flight += 1
        return None

    async def hold_refusal(self, key: str, wait: float) -> float:
        """Hold a refusal for up to TARPIT_SECONDS (at most TARPIT_PER_KEY at once per key);
        returns what is left of ``wait`` for Retry-After."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.held >= TARPIT_PER_KEY:
            return wait
        delay = min(wait, TARPIT_SECONDS)
        bucket.held += 1
        try:
            await asyncio.sleep(delay)
        finally:
            bucket.held -= 1
        return wait - delay

    def release(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1

    def _forget_idle(self, now: float) -> None:
        full = [k for k, b in self._buckets.items()
                if b.in_flight == 0 and b.tokens + (now - b.updated) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]


@dataclass(frozen=True)
class LimitKey:
    """What a request counts against: a bucket's key, how many of its requests may be in
    flight at once (None: the limiter's ``max_concurrent``), and whether the bucket's rate
    applies."""

    key: str
    max_concurrent: int | None = None
    #: Whether the request takes a token of the bucket's rate, or only counts in flight.
    rate: bool = True
    #: A report (REPORT_PATHS): it also waits for one of the replica's report slots.
    report: bool = False


def limit_key(path: str, authorization: str | None, method: str = "GET",
              max_concurrent_reports: int | None = None) -> LimitKey | None:
    """The key a request counts against: its token (hashed), plus the provider id for the
    per-machine agent endpoints (a lab's machines share one provider token). Other reads
    count only while in flight (a client reading one after another holds one request thread
    at a time, however fast): reports (REPORT_PATHS, sums over a lab's or the federation's
    history) up to ``max_concurrent_reports`` at once, others up to the limiter's
    ``max_concurrent``. None when the request is not limited here: no token
    (authentication answers it), or a write outside the agent and cluster endpoints (an
    administrator's, or a login's membership)."""
    if not authorization:
        return None
    if path.startswith(LIMITED_PREFIXES):
        digest = _digest(authorization)
        if path.startswith("/agent/"):
            machine = path.split("/")[2]
            return LimitKey(f"{digest}:{machine}")
        return LimitKey(digest)
    if method not in ("GET", "HEAD"):
        return None
    if REPORT_PATHS.match(path):
        return LimitKey(f"{_digest(authorization)}:reports", max_concurrent_reports,
                        rate=False, report=True)
    return LimitKey(f"{_digest(authorization)}:reads", rate=False)


def _digest(authorization: str) -> str:
    return hashlib.sha256(authorization.encode()).hexdigest()[:32]


class ReportSlots:
    """How many reports (REPORT_PATHS) a replica runs at once, all tokens together; the
    others wait on the event loop, holding no request thread, in the order they came."""

    def __init__(self, slots: int, metrics=None):
        self._free = asyncio.Semaphore(slots)
        self._metrics = metrics
        self.running = 0
        self.waiting = 0

    def _note(self) -> None:
        if self._metrics is not None:
            self._metrics.reports_running.set(self.running)
            self._metrics.reports_waiting.set(self.waiting)

    async def run(self, call):
        """Await ``call()`` once a slot is free."""
        self.waiting += 1
        self._note()
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self._note()
        try:
            return await call()
        finally:
            self.running -= 1
            self._free.release()
            self._note()


class RateLimitMiddleware:
    """ASGI middleware answering 429 (with Retry-After) past a token's rate or concurrency."""

    def __init__(self, app, limiter: RateLimiter, prefix: str,
                 max_concurrent_reports: int | None = None,
                 report_slots: ReportSlots | None = None):
        self.app = app
        self.limiter = limiter
        self.prefix = prefix
        self.max_concurrent_reports = max_concurrent_reports
        self.report_slots = report_slots

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        key = None
        if path.startswith(self.prefix):
            headers = dict(scope.get("headers") or ())
            auth = headers.get(b"authorization")
            key = limit_key(path[len(self.prefix):], auth.decode("latin-1") if auth else None,
                            scope.get("method", "GET"), self.max_concurrent_reports)
        if key is None:
            return await self.app(scope, receive, send)
        wait = self.limiter.acquire(key.key, max_concurrent=key.max_concurrent, rate=key.rate)
        if wait is not None:
            wait = await self.limiter.hold_refusal(key.key, wait)
            return await _too_many(send, wait, self.limiter, key)
        try:
            if key.report and self.report_slots is not None:
                return await self.report_slots.run(lambda: self.app(scope, receive, send))
            return await self.app(scope, receive, send)
        finally:
            self.limiter.release(key.key)


async def _too_many(send, wait: float, limiter: RateLimiter, key: LimitKey) -> None:
    retry = max(0, math.ceil(wait))
    at_once = key.max_concurrent or limiter.max_concurrent
    if key.rate:
        said = (f"too many requests with this token (limit {limiter.rate:g} per second, "
                f"{at_once} at once)")
    else:
        what = "reports" if key.report else "reads"
        said = f"too many {what} at once with this token (at most {at_once} in flight)"
    body = json.dumps({"error": "rate-limited",
                       "message": f"{said}; retry after {retry} s"}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"),
                            (b"retry-after", str(retry).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
