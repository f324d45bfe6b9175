"""The broker's FastAPI application: error rendering, start-up recovery and the reaper loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from sqlmodel import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from accounting.models import utcnow
from accounting.retention import PrunedPeriod

from . import API_PREFIX, db
from .agent_fast_path import AgentFastPath
from .auth import hash_token
from .error_responses import known_error_response
from .errors import BrokerError
from .hub_tokens import HubTokenChecker
from .metrics import HttpTimer
from .models import ApiToken, TokenKind
from .ratelimit import RateLimiter, RateLimitMiddleware, ReportSlots
from .replicas import give_up_leadership
from .routes_accounting import router as accounting_router
from .routes_admin import router as admin_router
from .routes_agent import router as agent_router
from .routes_clusters import router as clusters_router
from .routes_dashboards import router as dashboards_router
from .routes_environments import router as environments_router
from .routes_labs import router as labs_router
from .routes_records import router as records_router
from .service import Broker
from .settings import BrokerSettings
from .thread_priority import keep_threads_behind_loop, threads_before_app

logger = logging.getLogger("parallex.broker")
#: Seconds between two samples of the event loop's lag (parallex_event_loop_lag_seconds).
LAG_SAMPLE = 0.1



def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        ctx = detail.get("ctx", {}).get("error", "")
        return (400, "malformed-json",
                f"the request body is not valid JSON ({ctx}); send a JSON object")
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return 422, "invalid-request", "; ".join(parts)


def ensure_admin_token(broker: Broker, token: str | None) -> None:
    """Store the admin token from the environment (hashed) so the admin CLI can use it."""
    if not token:
        return
    if len(token) < 16 or token in {"changeme", "change-me", "admin", "secret", "password"}:
        raise SystemExit("PARALLEX_ADMIN_TOKEN is a placeholder or shorter than 16 characters; "
                         "use a long random string (e.g. `openssl rand -hex 32`)")
    with broker.session() as s:
        if s.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(token))).first():
            return
        s.add(ApiToken(id="tok_admin_" + hash_token(token)[:6], kind=TokenKind.admin,
                       token_hash=hash_token(token)))
        s.commit()


def create_app(db_url: str, settings: BrokerSettings | None = None,
               admin_token: str | None = None) -> FastAPI:
    """Build the broker app over the database at ``db_url``."""
    settings = settings or BrokerSettings()
    engine = db.make_engine(db_url, settings.db_ping_after_idle)
    broker = Broker(engine, settings)
    ensure_admin_token(broker, admin_token if admin_token is not None
                       else os.environ.get("PARALLEX_ADMIN_TOKEN"))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        not_ours = threads_before_app()
        broker.wakeups.loop = asyncio.get_running_loop()  # where agents' long polls wait
        broker.recover()
        interval = max(0.2, min(settings.provider_timeout, settings.cluster_timeout) / 6)

        async def reaper() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    # In a thread: a metering pass (about a second per 10,000 leases) or a
                    # capacity sample must not hold the event loop that answers heartbeats,
                    # long polls and scale requests.
                    await asyncio.to_thread(broker.reap)
                except Exception:  # keep reaping after a transient database error
                    logger.exception("reaper pass failed")

        async def loop_lag() -> None:
            while True:
                due = loop.time() + LAG_SAMPLE
                await asyncio.sleep(LAG_SAMPLE)
                broker.metrics.loop_lag.observe(max(0.0, loop.time() - due))

        async def leadership() -> None:
            # Apart from the reaper, whose tick waits for the metering pass (seconds).
            while True:
                await asyncio.sleep(broker.leader_ttl / 3)
                try:
                    await asyncio.to_thread(broker.keep_leadership)
                except Exception:  # the database is away: the lease runs out, as it should
                    logger.exception("renewing the leadership failed")

        loop = asyncio.get_running_loop()
        if broker.relay is not None:
            broker.relay.start()
        broker.placing_thread.start()
        if broker.placement_process is not None:
            broker.placement_process.start()
        # Leading from the start (when no other replica does), not from the first reaper
        # tick: until a replica leads, no one places for the others.
        await asyncio.to_thread(broker.renew_leadership)
        broker.end_meterer.start()
        broker.heartbeats.start()
        broker.reports.start()
        broker.lease_lists.start()
        broker.leadership_kept = True
        task = asyncio.create_task(reaper())
        lag_task = asyncio.create_task(loop_lag())
        leadership_task = asyncio.create_task(leadership())
        niceness_task = asyncio.create_task(
            keep_threads_behind_loop(settings.thread_niceness, not_ours))
        logger.info("broker %s ready (started %s UTC)", broker.boot_id, utcnow())
        try:
            yield
        finally:
            for background in (task, lag_task, leadership_task, niceness_task):
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
            broker.placer.stop()
            await asyncio.to_thread(broker.placing_thread.stop)
            if broker.placement_process is not None:
                await asyncio.to_thread(broker.placement_process.stop)
            await asyncio.to_thread(broker.end_meterer.stop)
            await asyncio.to_thread(broker.heartbeats.stop)
            await asyncio.to_thread(broker.reports.stop)
            await asyncio.to_thread(broker.lease_lists.stop)
            if broker.relay is not None:
                broker.relay.stop()
            if broker.periodic is not None:
                await asyncio.to_thread(broker.periodic.stop)
            if broker.is_leader:
                give_up_leadership(engine, broker.boot_id)
            if broker.batch_engine is not engine:
                broker.batch_engine.dispose()
            engine.dispose()

    app = FastAPI(title="Parallex broker", version="1", lifespan=lifespan,
                  openapi_url=f"{API_PREFIX}/openapi.json", docs_url=f"{API_PREFIX}/docs",
                  redoc_url=None,
                  # A path ending in '/' (e.g. a decoded '%2F' in an id) is a 404 with a
                  # message, not a redirect to another path.
                  redirect_slashes=False)
    app.state.broker = broker
    # Innermost, so the rate limit and the HTTP metrics see its requests as they see others.
    app.add_middleware(AgentFastPath, prefix=API_PREFIX, metrics=broker.metrics)
    app.add_middleware(RateLimitMiddleware, prefix=API_PREFIX, limiter=RateLimiter(
        rate=settings.rate_limit, burst=settings.rate_burst,
        max_concurrent=settings.max_concurrent_requests),
        max_concurrent_reports=settings.max_concurrent_reports,
        report_slots=ReportSlots(settings.report_threads, broker.metrics))
    # Outermost, so the rate limiter's 429s are counted too (under no route: none matched yet).
    app.add_middleware(HttpTimer, metrics=broker.metrics)
    app.state.session = broker.session
    app.state.reading = broker.reading
    app.state.principals = broker.principals
    app.state.hub_tokens = (HubTokenChecker(settings.hub_api_url, settings.hub_service_name,
                                            settings.hub_token_cache)
                            if settings.hub_api_url else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = _validation_message(exc)
        return JSONResponse({"error": code, "message": message}, status_code=status)

    async def _known_error(request: Request, exc: Exception) -> JSONResponse:
        return known_error_response(request.method, request.url.path, exc)

    # The agents' fast path answers these through the same function.
    for kind in (BrokerError, DataError, OperationalError, PrunedPeriod):
        app.add_exception_handler(kind, _known_error)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "internal",
                             "message": "the broker failed on this request; nothing was "
                                        "changed. The broker log has the details."},
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; see {API_PREFIX}/docs"
        elif exc.status_code == 405:
            message = (f"{request.method} is not allowed on {request.url.path}; see "
                       f"{API_PREFIX}/docs for the methods each endpoint takes")
        else:
            message = str(exc.detail)
        return JSONResponse({"error": f"http-{exc.status_code}", "message": message},
                            status_code=exc.status_code, headers=exc.headers)

    app.include_router(admin_router, prefix=API_PREFIX)
    app.include_router(agent_router, prefix=API_PREFIX)
    app.include_router(clusters_router, prefix=API_PREFIX)
    app.include_router(dashboards_router, prefix=API_PREFIX)
    app.include_router(environments_router, prefix=API_PREFIX)
    app.include_router(accounting_router, prefix=API_PREFIX)
    app.include_router(records_router, prefix=API_PREFIX)
    app.include_router(labs_router, prefix=API_PREFIX)
    return app


class StripPrefix:
    """Serve the app under ``prefix`` as well (JupyterHub's proxy keeps /services/<name>/ in
    the paths it forwards to a service)."""

    def __init__(self, app, prefix: str):
        self.app = app
        self.prefix = "/" + prefix.strip("/")

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            if path == self.prefix or path.startswith(self.prefix + "/"):
                scope = dict(scope, path=path[len(self.prefix):] or "/")
                scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)
