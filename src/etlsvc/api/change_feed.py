"""The change feed's endpoints: ``GET /data/changes`` (pages of inserts, updates and deletes
in commit-safe order, long-polled) and ``GET /data/changes/stream`` (the same as server-sent
events). What a position is and how a page is read: ``api/changes.py``.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get
from litestar.params import FromQuery, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from etlsvc import db
from etlsvc.api import changes
from etlsvc.api.data import DataRow, hide
from etlsvc.api.http import (
    READ,
    ApiError,
    Hidden,
    encode_json,
    error_responses,
    feed_token,
    hidden_fields,
    json_page,
    read_pool,
    served,
    token_tag,
)


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


def _change(row: Any, hidden: Hidden | None) -> Change:
    record = None if row["op"] == "delete" else DataRow(
        *(row[name] for name in DataRow.__struct_fields__))
    if record is not None and hidden is not None:
        hide(record, hidden.of(record.source))
    return Change(feed_token(changes.Position(row["xid"], row["id"])), row["op"], row["id"],
                  row["source"], row["source_id"], row["at"], record)


async def _feed_start(request: Request, after: str) -> changes.Position:
    if after == "now":
        return await changes.head(read_pool(request))
    try:
        return changes.parse_token(after, token_tag)
    except ValueError as exc:
        raise ApiError(400, "bad_token", str(exc)) from None


def _expired(position: changes.Position) -> ApiError:
    return ApiError(410, "token_expired", f"deletes after {position.token} are past the "
                    "feed's retention ([server] change_feed_retention_days); read the feed "
                    "again from after=0", token=feed_token(position))


@get("/data/changes", summary="Inserts, updates and deletes, in commit-safe order",
     **{**READ, "responses": error_responses(400, 401, 403, 410, 429, 503)})
async def list_changes(
    request: Request,
    after: FromQuery[str] = "0",
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    wait: Annotated[float, QueryParameter(ge=0, le=30)] = 0,
    versions: Annotated[str, QueryParameter(pattern="^(latest|all)$")] = "latest",
) -> Response[dict[str, Any]]:
    """Changes after the position ``after`` (a page's ``next``; ``0``: from the beginning;
    ``now``: only what commits from now on). With ``wait``, an empty answer waits up to that
    many seconds for a change. Every change comes once; keep ``next`` and ask again.
    ``versions=all``: every version written, in commit order, not only each row's latest."""
    start = await _feed_start(request, after)
    page = await changes.wait(read_pool(request), start, limit, wait, versions == "all")
    if page.expired:
        raise _expired(start)
    hidden = hidden_fields(request)
    served(request, page.changes)
    return json_page(request, [_change(r, hidden) for r in page.changes],
                     {"limit": limit, "next": feed_token(page.next), "has_more": page.has_more})


@get("/data/changes/stream", summary="The change feed as server-sent events",
     media_type="text/event-stream", **{**READ, "responses": error_responses(400, 401, 403, 429)})
async def stream_changes(
    request: Request,
    after: FromQuery[str] = "0",
    versions: Annotated[str, QueryParameter(pattern="^(latest|all)$")] = "latest",
) -> ServerSentEvent:
    """Each change after ``after`` (or the ``Last-Event-ID`` header) as one event whose
    ``data`` is the change and whose ``id`` is its token, then new ones as they commit.
    A comment line every 15 s keeps idle connections open. ``versions=all``: every
    version, as ``GET /data/changes`` gives them."""
    # An SSE client that reconnects sends the id of the last event it received.
    start = await _feed_start(request, request.headers.get("last-event-id") or after)
    pool = read_pool(request)
    hidden = hidden_fields(request)

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        position, quiet_since = start, time.monotonic()
        while True:
            try:
                page = await changes.read(pool, position, 500, versions == "all")
            except db.UNAVAILABLE:     # the client keeps its place; we look again
                page = changes.Page([], position, False)
            if page.expired:
                yield ServerSentEventMessage(event="error", data=_expired(position).detail)
                return
            served(request, page.changes)
            for row in page.changes:
                change = _change(row, hidden)
                yield ServerSentEventMessage(data=encode_json(change).decode(), id=change.token)
            position = page.next
            if page.changes:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 15:
                yield ServerSentEventMessage(comment="keep-alive")
                quiet_since = time.monotonic()
            if not page.has_more:
                await asyncio.sleep(changes.POLL_EVERY)

    return ServerSentEvent(events())


HANDLERS = [list_changes, stream_changes]
