"""The Litestar application: lifespan, request ids, error envelope, OpenAPI.

Owns opening and closing what the service needs (the database, the scheduler) in one
lifespan, the ``X-Request-ID`` of every request (accepted or generated, returned, bound into
every log line), and turning every error into the envelope with the right status and no
stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Litestar, MediaType, Request, Response
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from etlsvc import __version__, db, flow, logtail, metrics
from etlsvc.api import (
    admin,
    auth,
    backfills,
    catalog,
    change_feed,
    changes,
    console,
    data,
    http,
    operations,
    runs,
    tokens,
    usage,
)
from etlsvc.config import Config
from etlsvc.errors import EtlError
from etlsvc.runtime import keys, workers
from etlsvc.runtime.service import Service

log = structlog.get_logger()

MAX_BODY = 1 << 20
#: Seconds a client is told to wait when the database is away (503).
RETRY_AFTER = "2"


def request_ids(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: the request id (``X-Request-ID`` or a new one) and the start time."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1").strip()
        request_id = given[:128] if given.isprintable() and given else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = request_id, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode())]
                metrics.observe_request(scope["method"], message["status"],
                                        time.perf_counter() - state["started"])
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await app(scope, receive, send_with_id)

    return middleware


def deadlines(app: ASGIApp, seconds: float) -> ASGIApp:
    """ASGI middleware: a request must begin its answer within ``seconds`` (the wait for a
    pooled connection and the query included), else it is answered 503 with
    ``Retry-After``; a request whose client goes away before it is answered is dropped, not
    run (after a stall, the queue would otherwise serve clients long gone). A streaming
    answer (SSE) has begun, so it is not cut.

    The request runs in a task of its own, cancelled when cut and left to finish its
    cancellation in the background: giving a connection back to the pool needs the
    database, and a stalled one would hold the 503 as long as it stalls."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        answering = False
        cut: asyncio.Future[str] = loop.create_future()     # its result: why

        def cut_short(why: str) -> None:
            if not answering and not cut.done():
                cut.set_result(why)

        async def send_marked(message: Message) -> None:
            nonlocal answering
            if cut.done():              # answered already: the cancelled work says nothing
                return
            answering = True
            await send(message)

        async def listen() -> None:
            # The app reads its messages from the inbox; this task sees a disconnect as
            # soon as the server reports it, whether or not the app reads its body.
            while True:
                message = await receive()
                await inbox.put(message)
                if message["type"] == "http.disconnect":
                    cut_short("client_gone")
                    return

        work = asyncio.create_task(app(scope, inbox.get, send_marked))
        listener = asyncio.create_task(listen())
        timer = loop.call_later(seconds, cut_short, "deadline")
        try:
            await asyncio.wait({work, cut}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()
                return
            flow.abandon(work)
            why = cut.result()
            metrics.request_cut(why)
            if why == "client_gone":
                return
            log.warning("request past its deadline", path=scope["path"], deadline_s=seconds)
            await _send_error(send, scope, 503, "deadline", f"no answer within {seconds:g} s "
                              "(the database is slow or not answering); retry shortly",
                              RETRY_AFTER)
        finally:
            timer.cancel()
            listener.cancel()
            if not work.done():          # this task itself was cancelled (shutdown)
                flow.abandon(work)

    return middleware


async def _send_error(send: Send, scope: Scope, status: int, code: str, message: str,
                      retry_after: str) -> None:
    """Answer with the error envelope and ``Retry-After`` from an ASGI middleware (which
    answers before Litestar, or in its place)."""
    body = msgspec.json.encode(http.error_body(scope, status, code, message))
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
        (b"retry-after", retry_after.encode())]})
    await send({"type": "http.response.body", "body": body})


def rate_limited(app: ASGIApp, per_minute: int,
                 exempt: frozenset[str] = frozenset({"/health", "/metrics"})) -> ASGIApp:
    """ASGI middleware: at most ``per_minute`` requests per client address and clock minute,
    then 429 in the envelope with ``Retry-After``. One dict lookup per request (Litestar's
    own limiter cost a quarter of the read API's throughput); the counts of a past minute
    are dropped whole."""
    window = [0, {}]  # the current minute, and its count per address

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in exempt:
            await app(scope, receive, send)
            return
        now = time.time()
        minute = int(now // 60)
        if window[0] != minute:
            window[:] = [minute, {}]
        client = scope["client"][0] if scope.get("client") else ""
        counts = window[1]
        counts[client] = seen = counts.get(client, 0) + 1
        if seen <= per_minute:
            await app(scope, receive, send)
            return
        await _send_error(send, scope, 429, "too_many_requests", f"more than {per_minute} "
                          f"requests in a minute from {client or 'this client'}; retry in a "
                          "moment", str(60 - int(now) % 60))

    return middleware


def _error(request: Request, status: int, code: str, message: str,
           **details: Any) -> Response[dict[str, Any]]:
    return Response(content=http.error_body(request.scope, status, code, message, **details),
                    status_code=status, media_type=MediaType.JSON)


def _http_error(request: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    if isinstance(exc, http.ApiError):
        response = _error(request, exc.status_code, exc.code, exc.detail, **exc.details)
        if "retry_after" in exc.details:
            response.headers["Retry-After"] = str(exc.details["retry_after"])
        return response
    if isinstance(exc, ValidationException):
        problems = [{"key": e.get("key"), "message": e.get("message")}
                    for e in (exc.extra or []) if isinstance(e, dict)]
        return _error(request, 400, "bad_parameter", "invalid request: " + "; ".join(
            f"{p['key']}: {p['message']}" for p in problems) if problems else exc.detail,
            problems=problems)
    status = exc.status_code
    response = _error(request, status, http.ERROR_CODES.get(status, "error"), exc.detail)
    if exc.headers:                         # e.g. Allow on a 405
        response.headers.update(exc.headers)
    return response


def _database_error(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, asyncpg.QueryCanceledError):
        response = _error(request, 503, "query_timeout", "the query took too long; narrow "
                          "the filters or use a smaller limit")
    else:
        log.warning("database unavailable", error=type(exc).__name__)
        metrics.database_error("request")
        response = _error(request, 503, "unavailable", "the database is not available; "
                          "retry shortly")
    response.headers["Retry-After"] = RETRY_AFTER
    return response


def _too_deep(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    # Only decoding a request body recurses as deep as the client makes it.
    return _error(request, 400, "bad_request", "the body is nested too deeply")


def _internal_error(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    log.exception("request failed", path=request.url.path)
    return _error(request, 500, "internal", "internal error; see the service log with this "
                  "request id")


async def _keep_session(_: asyncpg.Connection) -> None:
    """The read pool's reset on release: none. Its connections run single read-only
    statements and change no session state, and asyncpg's default reset (``RESET ALL``,
    ``UNLISTEN *``, …) is a round trip to the database on every request. asyncpg still rolls
    back a transaction left open."""


def create_app(cfg: Config, startup_errors: list[EtlError] | None = None) -> ASGIApp:
    """The ASGI application for ``cfg``: Litestar inside the request-id layer (which also
    covers what the router answers itself, such as 404 and 405). Why it could not start
    (the database, a migration) is added to ``startup_errors``."""
    app: ASGIApp = deadlines(create_litestar(cfg, startup_errors),
                             cfg.server.request_deadline_s)
    if cfg.server.rate_limit_per_minute:
        app = rate_limited(app, cfg.server.rate_limit_per_minute)
    return request_ids(app)


def create_litestar(cfg: Config, startup_errors: list[EtlError] | None = None) -> Litestar:
    """The Litestar app; its lifespan opens the database and the scheduler."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        started = False
        try:
            async with db.open_database(cfg) as database:
                # The read API has its own pool: on the read-only role where one is
                # configured, with a statement timeout, and never starved by runs.
                app.state.read_pool = db.InTurn(await db.connect_pool(
                    cfg.database.read_url or database.dsn, cfg, settings={
                        "statement_timeout": str(cfg.server.read_statement_timeout_ms),
                        "default_transaction_read_only": "on",
                        # Plan each page for its own values: a generic plan made for "any
                        # updated_since" walks the primary key even for the last minute.
                        "plan_cache_mode": "force_custom_plan",
                        # Row-level security holds this role to the request's tenant.
                        "role": "etlsvc_api"}, reset=_keep_session))
                app.state.data_version = changes.DataVersions()
                # Keys made at run time, reloaded within a second of any change.
                app.state.key_store = keys.KeyStore(database.pool)
                await app.state.key_store.load()
                app.state.usage = usage.Usage()
                app.state.jwt = None
                if cfg.auth.jwt is not None:
                    app.state.jwt = tokens.JwtVerifier(cfg.auth.jwt, cfg.base_dir)
                    await app.state.jwt.load()
                logtail.HUB.attach()       # keep each run's log lines for the console
                service = Service(cfg, database, workers.from_config(cfg.pipeline))
                app.state.service = service
                service.start_scheduler()
                keeping_keys = asyncio.create_task(app.state.key_store.run())
                metering = asyncio.create_task(app.state.usage.run(database.pool))
                jwks = asyncio.create_task(app.state.jwt.run()) if app.state.jwt else None
                started = True
                try:
                    yield
                finally:
                    await service.stop(cfg.server.shutdown_grace_s)
                    keeping_keys.cancel()
                    background = [t for t in (keeping_keys, metering, jwks) if t is not None]
                    for task in background:
                        task.cancel()
                    await asyncio.gather(*background, return_exceptions=True)
                    await app.state.read_pool.close()
        except EtlError as exc:          # ConfigError included (a JWKS that cannot be read)
            if not started and startup_errors is not None:
                startup_errors.append(exc)
            raise

    auth.configured_keys()          # a malformed ETLSVC_API_KEYS is a config error now
    app = Litestar(
        state=State({"public_read": cfg.server.public_read}),
        route_handlers=[*runs.HANDLERS, *backfills.HANDLERS, *data.HANDLERS,
                        *change_feed.HANDLERS, *operations.HANDLERS, *admin.HANDLERS,
                        *catalog.HANDLERS, *usage.HANDLERS,
                        *console.HANDLERS],
        middleware=[admin.audited],
        guards=[http.check_request],
        request_class=http.JsonRequest,
        lifespan=[lifespan],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error,
                            RecursionError: _too_deep,
                            asyncpg.QueryCanceledError: _database_error,
                            **dict.fromkeys(db.UNAVAILABLE, _database_error)},
        request_max_body_size=MAX_BODY,
        openapi_config=OpenAPIConfig(
            title="etlsvc", version=__version__, path="/schema",
            render_plugins=console.DOCS_PLUGINS,
            components=Components(security_schemes={"apiKey": SecurityScheme(
                type="http", scheme="bearer",
                description="An API key of ETLSVC_API_KEYS: Authorization: Bearer <key>. "
                            "Read endpoints need one only with server.public_read = false; "
                            "run control needs the run scope.")})),
        debug=False,
        logging_config=None,
    )
    _document(app)
    return app


def _document(app: Litestar) -> None:
    """What Litestar's generated OpenAPI document cannot say by itself: which operations
    take a key (Swagger UI's *Authorize* then works), and that ``POST /etl/run``'s body is
    optional (Litestar marks every body required)."""
    schema = app.openapi_schema
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            scope = handler.opt.get("scope")
            path_item = schema.paths.get(route.path_format) if schema.paths else None
            if scope is None or path_item is None:
                continue
            for method in handler.http_methods:
                operation = getattr(path_item, method.lower(), None)
                if operation is None:
                    continue
                # a read endpoint answers without a key while public_read is on
                operation.security = [{"apiKey": []}] if scope != "read" else [
                    {}, {"apiKey": []}]
    run = schema.paths["/etl/run"].post if schema.paths else None
    if run is not None and run.request_body is not None:
        run.request_body.required = False
