"""The HTTP kit every endpoint module uses: envelope, errors, cursors, guards.

Owns the response envelope ``{"data", "metadata": {"request_id", "api_latency_ms",
"pagination"}}`` and the error envelope (:class:`ApiError`), opaque keyset cursors bound to
their filters, the one guard every endpoint runs before its parameters are read (API-key
scope, unknown or NUL-bearing query parameters) and the JSON-body guard. The endpoints are
one module per resource: ``runs.py`` (run control, rejects), ``data.py`` (``/data``),
``change_feed.py`` (``/data/changes``), ``operations.py`` (health, stats, metrics, logs).
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import inspect
import re
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.enums import MediaType
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example

from etlsvc import db
from etlsvc.api import auth, tokens
from etlsvc.config import Source
from etlsvc.contract import DEFAULT_TENANT
from etlsvc.runtime import audit
from etlsvc.runtime.service import Service


class ApiError(HTTPException):
    """An error answered with the envelope: status, code and message (and extra details)."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code
        self.details = details


class ErrorInfo(msgspec.Struct):
    """What went wrong (some errors carry more fields, e.g. ``running_run_id``)."""

    status: int
    code: str
    message: str


class Metadata(msgspec.Struct):
    request_id: str | None
    api_latency_ms: float
    pagination: dict[str, Any] | None


class ErrorEnvelope(msgspec.Struct):
    """The body of every error response."""

    data: None
    metadata: Metadata
    error: ErrorInfo


#: The ``code`` of each error status.
ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 410: "gone",
               413: "payload_too_large", 415: "unsupported_media_type", 422: "unprocessable",
               429: "too_many_requests", 503: "unavailable"}
_ERROR_TEXTS = {400: "Bad parameter or body", 401: "API key missing", 403: "API key refused",
                404: "Not found", 409: "A source is already running",
                410: "Token past the change feed's retention", 413: "Body too large",
                415: "Body not JSON", 429: "Rate limit exceeded",
                503: "Database unavailable or query too slow"}
_ERROR_EXAMPLES = {
    400: "unknown query parameter 'colour'; accepted: category, cursor, limit, source",
    401: "an API key with the 'run' scope is required: Authorization: Bearer <key>",
    403: "this API key is not accepted", 404: "no run 40",
    409: "source 'products' is already running (run 41)",
    410: "this token is older than the change feed's retention (7 days)",
    413: "the body is larger than 1 MiB",
    415: "the body must be JSON, sent with Content-Type: application/json",
    429: "rate limit exceeded: 1200 requests per minute",
    503: "the database is not available; retry shortly"}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """The documented error answers, each with a real example (not generated filler)."""
    return {s: ResponseSpec(
        data_container=ErrorEnvelope, description=_ERROR_TEXTS[s], generate_examples=False,
        examples=[Example(summary=_ERROR_TEXTS[s], value={
            "data": None,
            "metadata": {"request_id": "0b5e7c1c9a4d4e0f", "api_latency_ms": 0.8,
                         "pagination": None},
            "error": {"status": s, "code": ERROR_CODES[s], "message": _ERROR_EXAMPLES[s]}})])
        for s in statuses}


READ_ERRORS = error_responses(400, 401, 403, 404, 429, 503)
WRITE_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 415, 429, 503)


def envelope(request: Request, data: Any, pagination: dict[str, Any] | None = None) -> dict:
    """The response body every JSON endpoint answers with."""
    return scope_envelope(request.scope, data, pagination)


def scope_envelope(scope: Any, data: Any, pagination: dict[str, Any] | None = None) -> dict:
    """``envelope`` for an ASGI scope (what a middleware answers before Litestar runs)."""
    state = scope.get("state", {})
    started = state.get("started", time.perf_counter())
    return {"data": data, "metadata": {
        "request_id": state.get("request_id"),
        "api_latency_ms": round((time.perf_counter() - started) * 1000, 3),
        "pagination": pagination}}


def error_body(scope: Any, status: int, code: str, message: str, **details: Any) -> dict:
    """The body of every error response: the envelope with ``data`` null and ``error``."""
    body = scope_envelope(scope, None)
    body["error"] = {"status": status, "code": code, "message": message, **details}
    return body


#: The API's JSON encoder (datetimes as RFC 3339, like Litestar's).
encode_json = msgspec.json.Encoder().encode


def json_page(request: Request, data: list[Any], pagination: dict[str, Any],
              headers: dict[str, str] | None = None) -> Response[dict[str, Any]]:
    """A page of structs in the envelope, encoded in one pass into one buffer. A page can be
    close to a megabyte (1,000 record versions): encoding its parts apart and joining them
    cost two more copies of it, and a millisecond of its p99."""
    return Response(content=encode_json(envelope(request, data, pagination)),
                    media_type=MediaType.JSON, headers=headers)




def service_of(request: Request) -> Service:
    return request.app.state.service


def configured_source(request: Request, name: str) -> Source:
    """The configured source a request names, of the request's tenant (what a key may
    change: a source shared with its tenant is only read); 404 (``unknown_source``) if there
    is none, naming only the tenant's sources."""
    own = tenant_sources(request)
    for src in own:
        if src.name == name:
            return src
    raise ApiError(404, "unknown_source", f"unknown source {name!r} (configured sources: "
                   f"{', '.join(s.name for s in own) or 'none'})")


def tenant_sources(request: Request) -> list[Source]:
    """The configured sources of the request's tenant."""
    tenant = caller_tenant()
    return [s for s in service_of(request).cfg.sources if s.tenant == tenant]


def read_pool(request: Request) -> Any:
    """The read API's pool (read-only, with a statement timeout)."""
    return request.app.state.read_pool


# -- cursors -------------------------------------------------------------------------------

def encode_cursor(position: int, filters: tuple[Any, ...]) -> str:
    """An opaque cursor: the position, bound to the filters it was made for."""
    body = msgspec.json.encode({"after": position, "f": _filters_digest(filters)})
    check = hashlib.sha256(b"etlsvc-cursor" + body).digest()[:6]
    return base64.urlsafe_b64encode(body + check).decode().rstrip("=")


def decode_cursor(cursor: str, filters: tuple[Any, ...]) -> int:
    """The position of a cursor; ApiError 400 if it was altered or made for other filters."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        body, check = raw[:-6], raw[-6:]
        if not hmac.compare_digest(check, hashlib.sha256(b"etlsvc-cursor" + body).digest()[:6]):
            raise ValueError("checksum")
        doc = msgspec.json.decode(body, type=dict[str, Any])
        position = doc["after"]
        if not isinstance(position, int) or not 0 <= position <= db.MAX_ID:
            raise ValueError("position")
    except (ValueError, KeyError, binascii.Error, msgspec.DecodeError):
        raise ApiError(400, "bad_cursor", "the cursor is not one this API gave out") from None
    if doc.get("f") != _filters_digest(filters):
        raise ApiError(400, "bad_cursor", "the cursor was made for other filters")
    return position


def keyset_page(rows: list[Any], limit: int,
                filters: tuple[Any, ...]) -> tuple[list[Any], dict[str, Any]]:
    """The first ``limit`` of ``limit + 1`` rows fetched, and the pagination metadata."""
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = encode_cursor(rows[-1]["id"], filters) if more else None
    return rows, {"limit": limit, "next_cursor": nxt, "has_more": more}


def _filters_digest(filters: tuple[Any, ...]) -> str:
    # The caller's scope too: a cursor is good only for the tenant and grants it was made
    # for.
    return hashlib.sha256(msgspec.json.encode([str(f) for f in filters]) +
                          scope_tag()).hexdigest()[:12]


def feed_token(position: Any) -> str:
    """The change feed's token of ``position`` for this caller: ``XID-ID.TAG``, the tag
    binding it to the caller's tenant and grants (another caller's is refused, 400)."""
    return f"{position.token}.{token_tag(position)}"


def token_tag(position: Any) -> str:
    return hashlib.blake2b(scope_tag() + position.token.encode(), digest_size=4).hexdigest()


def scope_tag() -> bytes:
    """Whom the request reads for (``db.READ_SCOPE``), for what must differ between callers
    who read different data: cursors, ETags."""
    return repr(db.READ_SCOPE.get()).encode()


# -- guards: run before any parameter or body is read ------------------------------------
# One guard for every endpoint, a coroutine: Litestar runs a plain function guard in a worker
# thread and copies the handler for each guard, which cost a 304 three quarters of its time.

async def check_request(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """The endpoint's API key scope (``opt["scope"]``), then its query parameters."""
    if scope := handler.opt.get("scope"):
        await _check_key(connection, scope)
    _check_query(connection, handler)


async def _check_key(connection: ASGIConnection, scope: str) -> None:
    """The request's bearer key must grant ``scope`` (``read`` passes without a key when
    ``server.public_read`` is on, for the ``default`` tenant). 401 without a key, 403 with a
    wrong one or one that lacks the scope (either is written to the audit log). What the
    request then reads is its key's tenant's (``db.READ_SCOPE``)."""
    header = connection.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    state = connection.scope.setdefault("state", {})
    key = await _find(connection, given, state) if given else None
    if scope == "read" and connection.app.state.public_read and key is None:
        # As before tenants, a key this server does not know is ignored where reads are
        # public: the request reads what anyone may.
        db.READ_SCOPE.set(PUBLIC_SCOPE)
        return
    refusal = None
    if not given:
        state["audit_denied"] = "no key"
        refusal = ApiError(401, "unauthorized", f"an API key with the {scope!r} scope is "
                           "required: Authorization: Bearer <key>")
    elif key is None:
        state.setdefault("audit_denied", "unknown key")
        state["actor"] = "unknown:" + hashlib.sha256(given.encode()).hexdigest()[:8]
        refusal = ApiError(403, "forbidden", "this API key is not accepted")
    else:
        state["actor"], state["tenant"] = key.who, key.tenant
        if not key.grants(scope):
            state["audit_denied"] = f"lacks the {scope} scope"
            refusal = ApiError(403, "forbidden", f"the API key {key.name!r} lacks the "
                               f"{scope!r} scope")
    if refusal is not None:
        if connection.scope.get("method") not in MUTATING:
            # A mutating request's entry is written as its answer leaves (api/admin.py).
            await audit_request(connection.scope, refusal.status_code)
        raise refusal
    state["key"] = key
    db.READ_SCOPE.set(key.read_scope)
    structlog.contextvars.bind_contextvars(key_name=key.name)


async def _find(connection: ASGIConnection, given: str, state: dict[str, Any]) -> Any:
    """The grant of a bearer credential: a JWT where ``[auth.jwt]`` is set and it looks
    like one, else an API key; None if it is not accepted (why: ``audit_denied``)."""
    verifier = getattr(connection.app.state, "jwt", None)
    if verifier is not None and tokens.looks_like_jwt(given):
        try:
            return await verifier.verify(given)
        except tokens.TokenRefused as exc:
            state["audit_denied"] = f"token refused: {exc}"[:300]
            return None
    return auth.find(given, getattr(connection.app.state, "key_store", None))


#: The methods whose requests change something (and so are audited).
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def audit_request(scope: Any, status: int) -> None:
    """Write the audit entry of a request answered ``status`` (``runtime/audit.py``). The
    handler may say more in ``note``; its action is the handler's ``opt["audit"]``, else
    the method and route; a refused key's reason is in its details."""
    state = scope.get("state", {})
    denied = state.get("audit_denied")
    handler = scope.get("route_handler")
    action = (handler.opt.get("audit") if handler else None) or \
        f"{scope['method']} {scope.get('path_template', scope['path'])}"
    said = state.get("audit", {})
    details = dict(said.get("details", {}))
    if denied:
        details["refused"] = denied
    client = scope.get("client")
    entry = audit.Entry(
        action=action, actor=state.get("actor", "anonymous"),
        outcome="ok" if status < 400 else "denied" if status in (401, 403) else "failed",
        tenant=state.get("tenant"), target=said.get("target"), status=status,
        request_id=state.get("request_id"), client=client[0] if client else None,
        details=details)
    await audit.record(scope["app"].state.service.database.pool, entry)


def note(request: Request, target: str | None = None, **details: Any) -> None:
    """What this request's audit entry says it acted on (``api/admin.py`` writes it)."""
    request.scope.setdefault("state", {})["audit"] = {"target": target, "details": details}


@dataclass(frozen=True)
class Hidden:
    """The record fields a request may not see: its key's grant hides ``own`` everywhere;
    a share hides its fields of the dataset it shares."""

    own: frozenset[str]
    shared: dict[str, frozenset[str]]

    def of(self, source: str) -> frozenset[str]:
        return self.own | self.shared.get(source, frozenset())


def hidden_fields(request: Request) -> Hidden | None:
    """What the request may not see of the records it reads (None: nothing hidden)."""
    key = request.scope.get("state", {}).get("key")
    own = key.hidden if key is not None else frozenset()
    store = getattr(request.app.state, "key_store", None)
    shared = store.shared_with(caller_tenant()) if store is not None else {}
    if not own and not any(shared.values()):
        return None
    return Hidden(own, shared)


def served(request: Request, rows: Any) -> None:
    """Count what the request served, per dataset, for usage metering (``api/usage.py``):
    ``rows`` are records (or rows) with a ``source``."""
    if rows and (usage := getattr(request.app.state, "usage", None)) is not None:
        key = request.scope.get("state", {}).get("key")
        usage.count(caller_tenant(), key.name if key is not None else "", rows)


#: What a request without a key reads where ``server.public_read`` is on.
PUBLIC_SCOPE = db.ReadScope(DEFAULT_TENANT)


def caller_tenant() -> str:
    """The tenant the request acts for: its key's (``default`` without one)."""
    scope = db.READ_SCOPE.get()
    return DEFAULT_TENANT if scope is None else scope.tenant


async def readable_sources(request: Request) -> set[str]:
    """The sources the request may read (its tenant's and those shared with it, within its
    key's grants), as row-level security decides them."""
    return set(await read_pool(request).fetchval(db.query("tenants", "readable")))


async def may_read(connection: ASGIConnection) -> bool:
    """Whether the request may see what read endpoints show: ``public_read`` is on, or its
    key has the ``read`` scope (for an endpoint that answers everyone, in less detail)."""
    try:
        await _check_key(connection, "read")
    except ApiError:
        return False
    return True


def _check_query(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """400 for a query parameter the endpoint does not know (naming those it does), and for
    a NUL character in any value (PostgreSQL text cannot hold one)."""
    accepted = _query_names(handler.fn, tuple(handler.paths))
    for name, value in connection.query_params.multi_items():
        if name not in accepted:
            raise ApiError(400, "unknown_parameter", f"unknown query parameter {name!r}; "
                           f"accepted: {', '.join(sorted(accepted)) or 'none'}",
                           accepted=sorted(accepted))
        if "\x00" in value:
            raise ApiError(400, "bad_parameter", f"query parameter {name!r} contains a NUL "
                           "character")


@cache
def _query_names(fn: Any, paths: tuple[str, ...]) -> frozenset[str]:
    """The query parameters a handler accepts: its arguments, less path and body ones."""
    in_path = {name for path in paths for name in re.findall(r"{(\w+)", path)}
    return frozenset(inspect.signature(fn).parameters) - in_path - {"request", "data"}


#: What every read endpoint declares: its error responses and the ``read`` scope.
READ: dict[str, Any] = {"responses": READ_ERRORS, "opt": {"scope": "read"}}


async def require_json_body(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """415 for a body that is not ``application/json`` (an empty body needs no type)."""
    has_body = connection.headers.get("content-length", "0") not in ("", "0") or (
        "transfer-encoding" in connection.headers)
    media_type = connection.headers.get("content-type", "").split(";")[0].strip().lower()
    if has_body and media_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be JSON, sent with "
                       "Content-Type: application/json")


class JsonRequest(Request):
    """A request whose JSON body, if it holds bytes that are not UTF-8 inside a string, is a
    400: msgspec raises ``UnicodeDecodeError`` there, which Litestar does not turn into a
    client error (a 500 otherwise)."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except UnicodeDecodeError as exc:
            raise ApiError(400, "bad_request", "the body is not valid UTF-8: a string "
                           f"holds the byte {exc.object[exc.start:exc.start + 1]!r}") from None


def utc_param(name: str, value: dt.datetime | None) -> dt.datetime | None:
    """A filter's date-time in UTC (naive means UTC); 400 if it has no UTC equivalent."""
    if value is None:
        return None
    try:
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
    except OverflowError:
        raise ApiError(400, "bad_parameter", f"{name}: {value.isoformat()} is out of range "
                       "once converted to UTC") from None
