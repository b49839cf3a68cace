"""The HTTP API: run control, the read API over ``normalized_data``, health.

Owns request parsing, the response envelope ``{"data", "metadata": {"request_id",
"api_latency_ms", "pagination"}}``, opaque keyset cursors and API-key checks. SQL comes from
``sql/queries/api.sql``; runs are started through ``service.py``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import inspect
import re
import time
from collections.abc import AsyncIterator
from functools import cache
from typing import Annotated, Any

import msgspec
import structlog
from litestar import MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import ResponseSpec
from litestar.params import FromQuery, JSONBody, PathParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from etlsvc import db, logtail, metrics
from etlsvc.api import auth, changes
from etlsvc.errors import ConfigError, SourceBusy
from etlsvc.extract import KINDS
from etlsvc.runtime import retry
from etlsvc.runtime.service import Service, stale


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


def _errors(*statuses: int) -> dict[int, ResponseSpec]:
    texts = {400: "Bad parameter or body", 401: "API key missing", 403: "API key refused",
             404: "Not found", 409: "A source is already running",
             410: "Token past the change feed's retention", 413: "Body too large",
             415: "Body not JSON", 429: "Rate limit exceeded",
             503: "Database unavailable or query too slow"}
    return {s: ResponseSpec(data_container=ErrorEnvelope, description=texts[s])
            for s in statuses}


READ_ERRORS = _errors(400, 401, 403, 404, 429, 503)
WRITE_ERRORS = _errors(400, 401, 403, 404, 409, 413, 415, 429, 503)


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
_encode = msgspec.json.Encoder().encode


class DataRow(msgspec.Struct):
    """A record of GET /data: the columns of ``data_page`` and ``data_window``, in order."""

    id: int
    kind: str
    source: str
    source_id: str
    title: str | None
    description: str | None
    category: str | None
    amount: str | None
    url: str | None
    tags: list[str] | None
    event_time: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


_DATA_COLUMNS = len(DataRow.__struct_fields__)


def service_of(request: Request) -> Service:
    return request.app.state.service


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
    return hashlib.sha256(msgspec.json.encode([str(f) for f in filters])).hexdigest()[:12]


# -- guards: run before any parameter or body is read ------------------------------------
# One guard for every endpoint, a coroutine: Litestar runs a plain function guard in a worker
# thread and copies the handler for each guard, which cost a 304 three quarters of its time.

async def check_request(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """The endpoint's API key scope (``opt["scope"]``), then its query parameters."""
    if scope := handler.opt.get("scope"):
        _check_key(connection, scope)
    _check_query(connection, handler)


def _check_key(connection: ASGIConnection, scope: str) -> None:
    """The request's bearer key must grant ``scope`` (``read`` passes without a key when
    ``server.public_read`` is on). 401 without a key, 403 with a wrong one or one that lacks
    the scope."""
    if scope == "read" and connection.app.state.public_read:
        return
    header = connection.headers.get("authorization", "")
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        raise ApiError(401, "unauthorized", f"an API key with the {scope!r} scope is "
                       "required: Authorization: Bearer <key>")
    key = auth.find(header[7:].strip())
    if key is None:
        raise ApiError(403, "forbidden", "this API key is not accepted")
    if not key.grants(scope):
        raise ApiError(403, "forbidden", f"the API key {key.name!r} lacks the {scope!r} "
                       "scope")
    structlog.contextvars.bind_contextvars(key_name=key.name)


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


def _utc(name: str, value: dt.datetime | None) -> dt.datetime | None:
    """A filter's date-time in UTC (naive means UTC); 400 if it has no UTC equivalent."""
    if value is None:
        return None
    try:
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
    except OverflowError:
        raise ApiError(400, "bad_parameter", f"{name}: {value.isoformat()} is out of range "
                       "once converted to UTC") from None


# -- run control ---------------------------------------------------------------------------

class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /etl/run (optional): which sources (all when absent), and whether to
    ignore checkpoints."""

    sources: Annotated[list[str], msgspec.Meta(min_length=1)] | None = None
    full_refresh: bool = False


@post("/etl/run", status_code=202, summary="Start runs (API key required)",
      responses=WRITE_ERRORS, opt={"scope": "run"}, guards=[require_json_body])
async def start_runs(request: Request, data: JSONBody[RunRequest | None] = None) -> dict[str, Any]:
    """Start a run of each requested source (all by default), or of none if any is running
    already (409 lists them); 202 with their ids."""
    service = service_of(request)
    body = data or RunRequest()
    try:
        sources = [service.cfg.source(n) for n in body.sources] if body.sources else [
            s for s in service.cfg.sources if not KINDS[s.kind].continuous]
    except ConfigError as exc:
        raise ApiError(404, "unknown_source", str(exc)) from None
    if streams := [s.name for s in sources if KINDS[s.kind].continuous]:
        raise ApiError(409, "continuous_source", f"source {streams[0]!r} is a stream: "
                       "`etlsvc serve` consumes it continuously, so it cannot be started "
                       "by a request (its run is in GET /etl/runs)", source=streams[0])
    try:
        ids = await service.start_runs(sources, full_refresh=body.full_refresh)
    except SourceBusy as exc:
        raise ApiError(409, "source_running", str(exc), source=exc.source,
                       running_run_id=exc.run_id, running=[
                           {"source": s, "run_id": r} for s, r in exc.running.items()]) from None
    return envelope(request, {"runs": [{"source": s.name, "run_id": i}
                                       for s, i in zip(sources, ids)]})


def run_view(row: Any) -> dict[str, Any]:
    """A run row with its progress (percent where the size is known)."""
    run = dict(row)
    total = run.get("bytes_total")
    run["percent"] = (round(100 * run["bytes_read"] / total, 1)
                      if total else (100.0 if run["status"] != "running" else None))
    return run


@get("/etl/runs", summary="Run history, newest first", **READ)
async def list_runs(
    request: Request,
    source: FromQuery[str | None] = None,
    status: Annotated[str | None, QueryParameter(
        pattern="^(running|succeeded|failed|interrupted)$")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    cursor: FromQuery[str | None] = None,
) -> dict[str, Any]:
    """Runs, filtered by source and status, paged by cursor."""
    filters = ("runs", source, status)
    before = decode_cursor(cursor, filters) if cursor else db.MAX_ID
    rows, pagination = keyset_page(await read_pool(request).fetch(
        db.query("api", "runs_page"), before, limit + 1, source, status), limit, filters)
    return envelope(request, [run_view(r) for r in rows], pagination)


@get("/etl/runs/{run_id:int}", summary="One run, with live progress", **READ)
async def get_run(request: Request,
                  run_id: Annotated[int, PathParameter(ge=0, le=db.MAX_ID)]) -> dict[str, Any]:
    row = await read_pool(request).fetchrow(db.query("runs", "get"), run_id)
    if row is None:
        raise NotFoundException(f"no run {run_id}")
    return envelope(request, run_view(row))


@get("/etl/runs/{run_id:int}/log", summary="A run's log lines, then new ones live "
     "(server-sent events)", media_type="text/event-stream", **READ)
async def run_log(request: Request,
                  run_id: Annotated[int, PathParameter(ge=0, le=db.MAX_ID)]) -> ServerSentEvent:
    """The log events of a run executed by this process: the last 500 kept, then each new
    one as it is logged, as one SSE ``data:`` line each (a run of another replica has none
    here). A comment line every 15 s keeps idle connections open."""
    keep = logtail.LogFilter(run_id=run_id)

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        # Subscribing and copying the history happen with no await between: no event is
        # missed or sent twice.
        with logtail.HUB.subscribe() as queue:
            for event in logtail.HUB.history(run_id):
                yield ServerSentEventMessage(data=_encode(event).decode())
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    yield ServerSentEventMessage(comment="keep-alive")
                    continue
                if keep(event):
                    yield ServerSentEventMessage(data=_encode(event).decode())

    return ServerSentEvent(events())


@get("/etl/rejects", summary="Rejected records, with position and reason",
     **READ)
async def list_rejects(
    request: Request,
    run_id: Annotated[int | None, QueryParameter(ge=0, le=db.MAX_ID)] = None,
    source: FromQuery[str | None] = None,
    status: Annotated[str | None, QueryParameter(pattern="^(open|resolved|ignored)$")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    cursor: FromQuery[str | None] = None,
) -> dict[str, Any]:
    """Rejects of a run or a source, oldest first, paged by cursor: each with the rule it
    broke (field, column, value) and its status (open, resolved, ignored)."""
    filters = ("rejects", run_id, source, status)
    after = decode_cursor(cursor, filters) if cursor else 0
    rows, pagination = keyset_page(await read_pool(request).fetch(
        db.query("api", "rejects_page"), after, limit + 1, run_id, source, status), limit,
        filters)
    return envelope(request, [dict(r) for r in rows], pagination)


class RejectsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Which open rejects: of a source, optionally of one run or by id."""

    source: str
    run_id: Annotated[int, msgspec.Meta(ge=1, le=db.MAX_ID)] | None = None
    ids: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=db.MAX_ID)]],
                   msgspec.Meta(min_length=1, max_length=10_000)] | None = None


def _rejects_source(request: Request, body: RejectsRequest) -> Any:
    try:
        return service_of(request).cfg.source(body.source)
    except ConfigError as exc:
        raise ApiError(404, "unknown_source", str(exc)) from None


@post("/etl/rejects/retry", status_code=200,
      summary="Validate open rejects again and load the valid ones (API key required)",
      responses=WRITE_ERRORS, opt={"scope": "run"}, guards=[require_json_body])
async def retry_rejects(request: Request, data: JSONBody[RejectsRequest]) -> dict[str, Any]:
    """Re-validate the source's open rejects under the current rules and mapping; load the
    ones now valid (raw row, normalized row and the reject's status in one transaction,
    each once even if retries race). Answers with the retry run: ``rows_valid`` loaded,
    ``rows_rejected`` still open."""
    src = _rejects_source(request, data)
    try:
        row = await retry.retry(service_of(request).database, src, run_id=data.run_id,
                                ids=data.ids)
    except SourceBusy as exc:
        raise ApiError(409, "source_running", str(exc), source=exc.source,
                       running_run_id=exc.run_id) from None
    return envelope(request, run_view(row))


@post("/etl/rejects/ignore", status_code=200,
      summary="Mark open rejects as ignored (API key required)",
      responses=WRITE_ERRORS, opt={"scope": "run"}, guards=[require_json_body])
async def ignore_rejects(request: Request, data: JSONBody[RejectsRequest]) -> dict[str, Any]:
    """Mark the source's open rejects (of a run, or by id) ignored: nobody will fix them."""
    src = _rejects_source(request, data)
    count = await retry.ignore(service_of(request).database, src, run_id=data.run_id,
                               ids=data.ids)
    return envelope(request, {"source": src.name, "ignored": count})


# -- read API ------------------------------------------------------------------------------

#: The filters of GET /data, in the order of its parameters, with their SQL conditions.
DATA_FILTERS = dict(line.split(None, 1) for line in db.query("api", "data_filters").splitlines()
                    if line and not line.startswith("--"))


#: Range filters: their pages look for the matching ids first (``data_window``).
RANGE_FILTERS = frozenset({"event_from", "event_to", "updated_since"})
#: More matching rows than this, and a range-filtered page walks the primary key instead.
WINDOW_CAP = 20_000
#: More sources of a kind than this, and a kind page walks the primary key instead.
MAX_KIND_PARTS = 32


@cache
def data_page_sql(given: tuple[str, ...], query: str = "data_page") -> str:
    """The statement of a /data page with the filters ``given`` (one per combination)."""
    conditions = "".join(f"\n  AND {DATA_FILTERS[name].strip().format(n=i)}"
                         for i, name in enumerate(given, 3))
    return db.query("api", query).replace("{filters}", conditions)


@cache
def data_by_kind_sql(given: tuple[str, ...], sources: int) -> str:
    """A page with the kind filter and not source: the union of the first rows of each of
    ``sources`` sources (parameters after the filters), merged in id order."""
    part = data_page_sql(given, "data_by_kind")
    parts = [part.replace("{source}", f"${n}")
             for n in range(3 + len(given), 3 + len(given) + sources)]
    return ("SELECT * FROM (\n(" + ")\nUNION ALL\n(".join(parts) +
            ")\n) page ORDER BY id LIMIT $2")


async def data_rows(pool: Any, given: dict[str, Any], after: int, limit: int) -> list[Any]:
    """Up to ``limit`` rows after ``after`` that match ``given``, in id order."""
    names = tuple(given)
    if RANGE_FILTERS.isdisjoint(names):
        if names[:1] == ("kind",):           # kind without source (filters keep their order)
            sources = [r["source"] for r in await pool.fetch(
                db.query("api", "kind_sources"), given["kind"])]
            if not sources:
                return []
            # Each part is planned on every request: the number of parts is capped, and
            # a kind with more sources than that is walked along the primary key.
            if len(sources) <= MAX_KIND_PARTS:
                return await pool.fetch(data_by_kind_sql(names, len(sources)), after,
                                        limit, *given.values(), *sources)
        return await pool.fetch(data_page_sql(names), after, limit, *given.values())
    rows = await pool.fetch(data_page_sql(names, "data_window"), after, limit, *given.values())
    if rows and rows[0]["matching"] > WINDOW_CAP:
        return await pool.fetch(data_page_sql(names), after, limit, *given.values())
    return rows


@get("/data", summary="Normalized records, keyset-paginated", **READ)
async def list_data(
    request: Request,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    cursor: FromQuery[str | None] = None,
    source: FromQuery[str | None] = None,
    kind: Annotated[str | None, QueryParameter(pattern="^(" + "|".join(KINDS) + ")$")] = None,
    category: FromQuery[str | None] = None,
    event_from: FromQuery[dt.datetime | None] = None,
    event_to: FromQuery[dt.datetime | None] = None,
    updated_since: FromQuery[dt.datetime | None] = None,
) -> Response[dict[str, Any]]:
    """A page of records in a stable order (by id); ``next_cursor`` continues after it."""
    event_from, event_to = _utc("event_from", event_from), _utc("event_to", event_to)
    updated_since = _utc("updated_since", updated_since)
    filters = ("data", source, kind, category, event_from, event_to, updated_since)
    after = decode_cursor(cursor, filters) if cursor else 0
    given = {name: value for name, value in zip(DATA_FILTERS, filters[1:]) if value is not None}
    pool = read_pool(request)
    # The ETag names the query and the data version it was read at, so a conditional
    # request is answered before any query (the version is at most 0.5 s old: a page can
    # be reported unchanged for that long after a commit).
    version = await request.app.state.data_version.get(pool)
    etag = '"' + hashlib.blake2b(request.scope["query_string"] + version.to_bytes(8),
                                 digest_size=16).hexdigest() + '"'
    if request.headers.get("if-none-match") == etag:
        return Response(content=None, status_code=304, headers={"ETag": etag})
    rows, pagination = keyset_page(await data_rows(pool, given, after, limit + 1), limit,
                                   filters)
    # Encoded once, from structs (a quarter of the cost of dicts).
    data = _encode([DataRow(*r[:_DATA_COLUMNS]) for r in rows])
    meta = _encode(envelope(request, None, pagination)["metadata"])
    return Response(content=b'{"data":' + data + b',"metadata":' + meta + b"}",
                    media_type=MediaType.JSON, headers={"ETag": etag})


# -- change feed ---------------------------------------------------------------------------

class Change(msgspec.Struct):
    """One change of ``normalized_data``: the row as written (``record``; null for a delete),
    and the token of the position just after it."""

    token: str
    op: str
    id: int
    source: str
    source_id: str
    #: When the writing transaction started (a row's updated_at, a tombstone's deleted_at).
    at: dt.datetime
    record: DataRow | None


def _change(row: Any) -> Change:
    record = None if row["op"] == "delete" else DataRow(
        *(row[name] for name in DataRow.__struct_fields__))
    return Change(changes.Position(row["xid"], row["id"]).token, row["op"], row["id"],
                  row["source"], row["source_id"], row["at"], record)


async def _feed_start(request: Request, after: str) -> changes.Position:
    if after == "now":
        return await changes.head(read_pool(request))
    try:
        return changes.parse_token(after)
    except ValueError as exc:
        raise ApiError(400, "bad_token", str(exc)) from None


def _expired(position: changes.Position) -> ApiError:
    return ApiError(410, "token_expired", f"deletes after {position.token} are past the "
                    "feed's retention ([server] change_feed_retention_days); read the feed "
                    "again from after=0", token=position.token)


@get("/data/changes", summary="Inserts, updates and deletes, in commit-safe order",
     **{**READ, "responses": _errors(400, 401, 403, 410, 429, 503)})
async def list_changes(
    request: Request,
    after: FromQuery[str] = "0",
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    wait: Annotated[float, QueryParameter(ge=0, le=30)] = 0,
) -> Response[dict[str, Any]]:
    """Changes after the position ``after`` (a page's ``next``; ``0``: from the beginning;
    ``now``: only what commits from now on). With ``wait``, an empty answer waits up to that
    many seconds for a change. Every change comes once; keep ``next`` and ask again."""
    start = await _feed_start(request, after)
    page = await changes.wait(read_pool(request), start, limit, wait)
    if page.expired:
        raise _expired(start)
    data = _encode([_change(r) for r in page.changes])
    meta = _encode(envelope(request, None, {"limit": limit, "next": page.next.token,
                                            "has_more": page.has_more})["metadata"])
    return Response(content=b'{"data":' + data + b',"metadata":' + meta + b"}",
                    media_type=MediaType.JSON)


@get("/data/changes/stream", summary="The change feed as server-sent events",
     media_type="text/event-stream", **{**READ, "responses": _errors(400, 401, 403, 429)})
async def stream_changes(request: Request, after: FromQuery[str] = "0") -> ServerSentEvent:
    """Each change after ``after`` (or the ``Last-Event-ID`` header) as one event whose
    ``data`` is the change and whose ``id`` is its token, then new ones as they commit.
    A comment line every 15 s keeps idle connections open."""
    # An SSE client that reconnects sends the id of the last event it received.
    start = await _feed_start(request, request.headers.get("last-event-id") or after)
    pool = read_pool(request)

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        position, quiet_since = start, time.monotonic()
        while True:
            try:
                page = await changes.read(pool, position, 500)
            except db.UNAVAILABLE:     # the client keeps its place; we look again
                page = changes.Page([], position, False)
            if page.expired:
                yield ServerSentEventMessage(event="error", data=_expired(position).detail)
                return
            for row in page.changes:
                change = _change(row)
                yield ServerSentEventMessage(data=_encode(change).decode(), id=change.token)
            position = page.next
            if page.changes:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 15:
                yield ServerSentEventMessage(comment="keep-alive")
                quiet_since = time.monotonic()
            if not page.has_more:
                await asyncio.sleep(changes.POLL_EVERY)

    return ServerSentEvent(events())


@get("/data/{record_id:int}", summary="One record with its lineage", **READ)
async def get_record(
        request: Request,
        record_id: Annotated[int, PathParameter(ge=0, le=db.MAX_ID)]) -> dict[str, Any]:
    """The record, the raw record it came from, and the run that produced it."""
    pool = read_pool(request)
    row = await pool.fetchrow(db.query("api", "data_one"), record_id)
    if row is None:
        raise NotFoundException(f"no record {record_id}")
    record = dict(row)
    table = record.pop("raw_table")
    if table not in {k.raw_table for k in KINDS.values()}:
        raise ApiError(500, "internal", "unknown raw table")
    raw = await pool.fetchrow(f"SELECT * FROM {table} WHERE id = $1",
                              record.pop("raw_id"))
    run = await pool.fetchrow(db.query("runs", "get"), record.pop("run_id"))
    record["lineage"] = {"raw_table": table, "raw": dict(raw) if raw else None,
                         "run": run_view(run) if run else None}
    return envelope(request, record)


# -- health --------------------------------------------------------------------------------

async def source_states(request: Request, where: str) -> dict[str, dict[str, Any]]:
    """Each configured source's last run, last success, and whether it is stale, failing or
    degraded (what /health and /metrics report). Raises when the database cannot be read
    (counted in ``etlsvc_db_connection_errors_total`` under ``where``)."""
    service = service_of(request)
    try:
        last = {r["source"]: dict(r) for r in await read_pool(request).fetch(
            db.query("api", "last_runs"), timeout=5)}
    except Exception:
        metrics.database_error(where)
        raise
    now = dt.datetime.now(dt.UTC)
    sources = {}
    for src in service.cfg.sources:
        info = last.get(src.name, {})
        sources[src.name] = {"last_run": info.get("id"), "status": info.get("status"),
                             "last_success": info.get("last_success"),
                             "stale": stale(src, info.get("last_success"), now),
                             "failing": info.get("status") in ("failed", "interrupted"),
                             "error": info.get("error"),
                             # The last load was unlike the recent ones (runtime/anomalies.py).
                             "degraded": info.get("anomaly") is not None,
                             "anomaly": info.get("anomaly")}
        if KINDS[src.kind].continuous:
            sources[src.name]["lag"] = metrics.stream_lag.get(src.name)
    return sources


@get("/health", summary="Liveness and readiness", responses=_errors(429, 503))
async def health(request: Request) -> Response[dict[str, Any]]:
    """200 when the database answers, the scheduler runs and no source is stale (nor, with
    ``server.health_fails_on_failing_sources``, has a failed last run); else 503. A source
    whose last load was anomalous is listed as degraded (the answer stays 200: the data is
    odd, the service is fine)."""
    service = service_of(request)
    checks: dict[str, Any] = {"scheduler": service.scheduler_running}
    try:
        sources = await source_states(request, "health")
        checks["database"] = True
    except Exception as exc:  # any failure to reach the database is "not ready"
        checks["database"] = False
        checks["database_error"] = type(exc).__name__
        sources = {}
    failing = sorted(n for n, s in sources.items() if s["failing"])
    healthy = checks["database"] and checks["scheduler"] and not any(
        s["stale"] for s in sources.values()) and not (
        failing and service.cfg.server.health_fails_on_failing_sources)
    body = envelope(request, {"status": "ok" if healthy else "degraded", "checks": checks,
                              "failing_sources": failing,
                              "degraded_sources": sorted(
                                  n for n, s in sources.items() if s["degraded"]),
                              "running": sorted(n for n, s in sources.items()
                                                if s["status"] == "running"),
                              "sources": sources})
    response = Response(content=body, status_code=200 if healthy else 503)
    if not checks["database"]:
        response.headers["Retry-After"] = "2"
    return response


@get("/stats", summary="Per-source statistics, pool use, API latency",
     **READ)
async def stats(request: Request) -> dict[str, Any]:
    """Rows, runs, success rate, error rate, throughput and last run per source."""
    service = service_of(request)
    rows = {r["source"]: r for r in await read_pool(request).fetch(
        db.query("api", "source_stats"))}
    sources = {}
    for src in service.cfg.sources:
        r = rows.get(src.name)
        runs_n = r["runs"] if r else 0
        sources[src.name] = {
            "kind": src.kind, "rows": r["rows"] if r else 0, "runs": runs_n,
            "succeeded": r["succeeded"] if r else 0, "failed": r["failed"] if r else 0,
            "success_rate": round(r["succeeded"] / runs_n, 4) if runs_n else None,
            "error_rate": round(r["rows_rejected"] / r["rows_read"], 4)
            if r and r["rows_read"] else None,
            "last_rows_per_s": int(r["last_rows_per_s"]) if r and r["last_rows_per_s"]
            else None,
            "last_run_id": r["last_run_id"] if r else None,
            # The changes of the last run that found schema drift (transform/drift.py).
            "schema_drift": r["last_drift"] if r else None,
            "next_run_at": service.next_run_at(src.name)}
    pools = {"etl": service.database.pool, "read": read_pool(request)}
    return envelope(request, {
        "sources": sources,
        "pools": {name: {"size": p.get_size(), "idle": p.get_idle_size(),
                         "max": p.get_max_size()} for name, p in pools.items()},
        "api_latency": metrics.latency_percentiles(),
        "event_loop_worst_lag_ms_1min": service.loop_monitor.worst_ms(),
        "running": [dict(r) for r in await read_pool(request).fetch(
            db.query("api", "running_runs"))]})


@get("/metrics", summary="Prometheus metrics", media_type="text/plain")
async def prometheus(request: Request) -> Response[bytes]:
    """This replica's metrics, with each source's freshness read from the database (the
    metrics stay available when it is away: ``etlsvc_database_up`` is 0 then)."""
    try:
        metrics.observe_sources(await source_states(request, "metrics"))
    except Exception:
        metrics.observe_sources(None)
    body, content_type = metrics.exposition(
        {"etl": service_of(request).database.pool, "read": read_pool(request)})
    return Response(content=body, media_type=content_type)


@get("/logs/stream", summary="Live log events (server-sent events; API key required)",
     media_type="text/event-stream", responses=WRITE_ERRORS, opt={"scope": "admin"})
async def log_stream(
    request: Request,
    level: Annotated[str, QueryParameter(pattern="^(debug|info|warning|error|critical)$")]
    = "info",
    run_id: Annotated[int | None, QueryParameter(ge=0, le=db.MAX_ID)] = None,
    source: FromQuery[str | None] = None,
) -> ServerSentEvent:
    """Each matching log event of this process, from now on, as one SSE ``data:`` line."""
    keep = logtail.LogFilter(level, run_id, source)

    async def events() -> AsyncIterator[str]:
        with logtail.HUB.subscribe() as queue:
            while True:
                event = await queue.get()
                if keep(event):
                    yield msgspec.json.encode(event).decode()

    return ServerSentEvent(events())


HANDLERS = [start_runs, list_runs, get_run, run_log, list_rejects, retry_rejects, ignore_rejects,
            list_data, list_changes, stream_changes, get_record, health, stats, prometheus,
            log_stream]
