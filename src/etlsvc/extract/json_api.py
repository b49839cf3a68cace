"""API source: a paginated JSON HTTP API, walked page by page, resumable at any page.

Owns HTTP for APIs (httpx, with timeouts, retries with exponential backoff and jitter on
connection errors, timeouts, 5xx and 429, ``Retry-After`` in seconds or as a date, a
per-source rate limit and a response size cap), the five pagination styles, their stop
conditions (no next page, empty page, ``has_more`` false, a cursor or URL seen before, the
page limit; never a ``count``/``total`` field) and the incremental high-water mark.

A walk's position is plain data (the next request, page number, high-water mark so far),
stored in the checkpoint after every page, in the page's transaction: a run that fails or is
killed resumes at the first page it had not committed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urljoin

import httpx
import msgspec
import structlog

from etlsvc.contract import (
    BatchSize,
    Delay,
    Extraction,
    Fields,
    NonEmpty,
    NonNegative,
    Prepared,
    SourceKind,
)
from etlsvc.errors import BackfillError, SourceError
from etlsvc.extract.http import Fetcher, HttpSource, check_url, check_urls, http_client
from etlsvc.extract.records import get_path, json_batch, parse_time, text

log = structlog.get_logger()

_SEEN_LIMIT = 1000


class Pagination(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How an API is paged.

    ``style``: ``none`` (one request); ``page`` (``page_param`` = 1, 2, …); ``offset``
    (``offset_param`` = 0, n, 2n, …); ``cursor`` (the next cursor is read from the body at
    ``cursor_path`` and sent as ``cursor_param``; the end is an empty cursor, or
    ``has_more_path`` false); ``next_url`` (the next page's URL is read from the body at
    ``next_url_path``); ``link_header`` (RFC 8288 ``Link: <…>; rel="next"``; with a
    ``page_size``, the first request also asks for page ``first_page``).
    """

    style: Literal["none", "page", "offset", "cursor", "next_url", "link_header"] = "none"
    page_size: BatchSize | None = None
    size_param: NonEmpty = "per_page"  # page style: page size parameter (limit_param for offset)
    page_param: NonEmpty = "page"
    first_page: NonNegative = 1
    offset_param: NonEmpty = "offset"
    limit_param: NonEmpty = "limit"
    cursor_param: NonEmpty = "cursor"
    cursor_path: NonEmpty = "next_cursor"
    has_more_path: NonEmpty | None = None
    next_url_path: NonEmpty = "next"
    #: A walk stops after this many pages (a guard against an API that never ends).
    max_pages: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000


class Incremental(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Ask only for items changed since the last run (inclusive high-water mark)."""

    param: NonEmpty                   # query parameter, e.g. "updated_since"
    field: NonEmpty                   # dotted path of the item's change time, e.g. "updated_at"
    lag_seconds: Delay = 0.0
    #: Keys seen exactly at the high-water mark, remembered so that the inclusive bound
    #: does not load them twice (at most this many).
    max_boundary_keys: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000


class ApiSource(HttpSource, tag="api", kw_only=True):
    """A paginated JSON HTTP API."""

    url: str
    fields: Fields
    #: Dotted path of the items' list in the body; "" when the body is the list.
    items_path: str = ""
    params: dict[str, str] = {}       # noqa: RUF012 - msgspec copies mutable defaults
    pagination: Pagination = Pagination()
    incremental: Incremental | None = None

    kind = "api"


@dataclass
class Page:
    """One fetched page: its items (decoded, and as received) and the walk's state after it."""

    url: str
    number: int
    items: list[Any]
    raw: list[bytes]
    state: dict[str, Any]
    size: int


@cache
def _raw_items_type(items_path: str) -> Any:
    """A msgspec type that decodes a body into the items' JSON text, exactly as received."""
    typ: Any = list[msgspec.Raw]
    for part in reversed(items_path.split(".") if items_path else []):
        typ = msgspec.defstruct("Envelope", [("f", typ | None, None)], rename={"f": part})
    return typ


def raw_items(body: bytes, items_path: str, items: list[Any]) -> list[bytes]:
    """Each item's JSON as received (re-encoded only where the path cannot be typed)."""
    if not any(part.lstrip("-").isdigit() for part in items_path.split(".")):
        doc = msgspec.json.decode(body, type=_raw_items_type(items_path))
        for part in items_path.split(".") if items_path else []:
            doc = doc.f if doc is not None else None
            del part
        if isinstance(doc, list) and len(doc) == len(items):
            return [bytes(r) for r in doc]
    return [msgspec.json.encode(i) for i in items]


def first_request(src: ApiSource, state: dict[str, Any] | None) -> dict[str, Any]:
    """The walk state of a new walk: its first request, and the incremental bound."""
    p = src.pagination
    params = dict(src.params)
    if p.page_size is not None:
        params[p.limit_param if p.style == "offset" else p.size_param] = str(p.page_size)
    if p.style == "page" or (p.style == "link_header" and p.page_size is not None):
        # Some Link-header APIs (json-server) page only when asked for a first page.
        params[p.page_param] = str(p.first_page)
    elif p.style == "offset":
        params[p.offset_param] = "0"
    since = None
    boundary: list[str] = []
    if src.incremental and state and state.get("hwm"):
        since = _minus_lag(state["hwm"], src.incremental.lag_seconds)
        params[src.incremental.param] = since
        boundary = state.get("boundary", []) if since == state["hwm"] else []
    return {"request": {"url": src.url, "params": params}, "page": 0, "seen": [],
            "since": since, "since_boundary": boundary,
            "hwm": state.get("hwm") if state else None,
            "boundary": state.get("boundary", []) if state else []}


def _skip_to(src: ApiSource, state: dict[str, Any], page: int) -> dict[str, Any]:
    """A new walk's state made to start at ``page`` (1: the first), where the style can
    ask for a page directly (``page``, and ``offset`` with a ``page_size``); else as it
    is (the walk then reads the pages before, and the caller skips them)."""
    p = src.pagination
    params = dict(state["request"]["params"])
    if page == 1:
        return state
    if p.style == "page":
        params[p.page_param] = str(p.first_page + page - 1)
    elif p.style == "offset" and p.page_size is not None:
        params[p.offset_param] = str((page - 1) * p.page_size)
    else:
        return state
    return {**state, "request": {**state["request"], "params": params}, "page": page - 1}


def _minus_lag(hwm: str, lag: float) -> str:
    when = parse_time(hwm) if lag else None
    if when is None:
        return hwm
    return (when - dt.timedelta(seconds=lag)).isoformat()


def _fingerprint(request: dict[str, Any]) -> str:
    raw = msgspec.json.encode([request["url"], sorted(request["params"].items())])
    return hashlib.sha256(raw).hexdigest()[:16]


async def walk(src: ApiSource, fetcher: Fetcher, state: dict[str, Any],
               warn: Callable[[str], None]) -> AsyncIterator[Page]:
    """Fetch pages from ``state`` on; each Page carries the state to store after it.

    A walk never loads the same page twice: a page whose body equals one this walk loaded
    already (an upstream that ignores the page parameter, a next link back to the start)
    ends it, as does the page limit; ``warn`` reports why, on the run.
    """
    p = src.pagination
    state = dict(state)
    seen = list(state.get("seen", []))
    bodies = list(state.get("bodies", []))
    while state.get("request"):
        request = state["request"]
        number = state["page"] + 1
        if number > p.max_pages:
            warn(f"the walk stopped at the page limit (max_pages = {p.max_pages})")
            break
        response, body = await fetcher.get(request["url"], request["params"])
        url = str(response.url)
        digest = hashlib.sha256(body).hexdigest()[:16]
        if digest in bodies:
            warn(f"page {number} ({url}) is the same as a page this walk loaded already; the "
                 "walk stopped there (does the API ignore the page parameter, or link back?)")
            break
        bodies = [*bodies, digest][-_SEEN_LIMIT:]
        try:
            doc = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:   # RecursionError: too deep
            raise SourceError(src.name, f"page {number} ({url}): the response is not valid "
                              f"JSON ({exc}); the next run resumes at this page") from exc
        items = get_path(doc, src.items_path)
        if not isinstance(items, list):
            where = f"at items_path {src.items_path!r}" if src.items_path else "(the body)"
            raise SourceError(src.name, f"page {number} ({url}): no list of items {where}")
        nxt = _next_request(src, request, response, doc, items)
        if nxt is not None:
            fp = _fingerprint(nxt)
            if fp in seen:
                warn(f"page {number} ({url}) points to a page this walk requested already; "
                     "the walk stopped there")
                nxt = None
            else:
                seen = [*seen, fp][-_SEEN_LIMIT:]
        state = {**state, "request": nxt, "page": number, "seen": seen, "bodies": bodies}
        state.update(_advance_hwm(src, state, items))
        yield Page(url, number, items, raw_items(body, src.items_path, items), dict(state),
                   len(body))


def _next_request(src: ApiSource, request: dict[str, Any], response: httpx.Response, doc: Any,
                  items: list[Any]) -> dict[str, Any] | None:
    p = src.pagination
    params = dict(request["params"])
    if p.style == "none":
        return None
    if p.style == "page":
        if not items:
            return None
        params[p.page_param] = str(int(params[p.page_param]) + 1)
        return {"url": request["url"], "params": params}
    if p.style == "offset":
        if not items:
            return None
        params[p.offset_param] = str(int(params[p.offset_param]) + len(items))
        return {"url": request["url"], "params": params}
    if p.style == "cursor":
        cursor = get_path(doc, p.cursor_path)
        if p.has_more_path is not None and not get_path(doc, p.has_more_path):
            return None
        if cursor in (None, "") or (not items and p.has_more_path is None):
            return None
        params[p.cursor_param] = str(cursor)
        return {"url": request["url"], "params": params}
    if p.style == "next_url":
        target = get_path(doc, p.next_url_path)
    else:
        target = response.links.get("next", {}).get("url")
    if not target or not isinstance(target, str):
        return None
    # The next URL carries its own query: only parameters it lacks are added again.
    return {"url": urljoin(str(response.url), target), "params": {}}


def _advance_hwm(src: ApiSource, state: dict[str, Any], items: list[Any]) -> dict[str, Any]:
    """The walk's high-water mark and the keys exactly at it, after ``items``."""
    inc = src.incremental
    if inc is None:
        return {}
    hwm, boundary = state.get("walk_hwm"), list(state.get("walk_boundary", []))
    key_path = src.fields.source_id or ""
    best = _as_time(hwm) if hwm else None
    for item in items:
        value = get_path(item, inc.field)
        when = _as_time(value)
        if when is None:
            continue
        key = text(get_path(item, key_path))
        if best is None or when > best:
            best, hwm, boundary = when, value, [key]
        elif when == best and key not in boundary and len(boundary) < inc.max_boundary_keys:
            boundary.append(key)
    out: dict[str, Any] = {"walk_hwm": hwm, "walk_boundary": boundary}
    if state.get("request") is None:           # the walk is over: its mark becomes the mark
        if hwm is not None:
            out |= {"hwm": hwm, "boundary": boundary}
        out |= {"walk_hwm": None, "walk_boundary": []}
    return out


def _as_time(value: Any) -> dt.datetime | None:
    when = parse_time(value) if isinstance(value, str) else None
    if when is None:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def skip_boundary(src: ApiSource, state: dict[str, Any], items: list[Any]) -> list[bool]:
    """Which items to keep: not those exactly at the previous mark that were loaded already."""
    inc = src.incremental
    since, keys = state.get("since"), set(state.get("since_boundary", []))
    if inc is None or since is None or not keys:
        return [True] * len(items)
    key_path = src.fields.source_id or ""
    return [not (get_path(i, inc.field) == since and text(get_path(i, key_path)) in keys)
            for i in items]


class ApiKind(SourceKind):
    """A paginated JSON API; see the module docstring."""

    name = "api"
    config = ApiSource
    raw_table = "raw_api_data"
    stream_column = "url"
    position_columns = ("page", "item_index")
    position_keys = ("page", "index")
    backfill_range = "page numbers of a walk (1: its first page), inclusive"

    def whole_read(self, src: ApiSource) -> str | None:
        return ("an incremental API source reads only what changed since its last run"
                if src.incremental else None)

    def check_config(self, src: ApiSource, where: str) -> None:
        check_url(src, where, src.url, "url")

    def check_backfill(self, src: ApiSource, stream: str | None, start: str | None,
                       end: str | None) -> str | None:
        super().check_backfill(src, stream, start, end)
        try:
            first, last = int(start or 1), None if end is None else int(end)
        except ValueError:
            raise BackfillError(f"--from/--to are page numbers (1 is the first page): "
                                f"{start!r}, {end!r}", "bad_range") from None
        if first < 1 or (last is not None and last < first):
            raise BackfillError(f"pages {start} to {end}: not a range of pages", "bad_range")
        return None

    async def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        src: ApiSource = ex.src
        bf = ex.backfill
        state = ex.checkpoints.get(src.url)
        if src.url in ex.checkpoints.this_run and not (state or {}).get("request"):
            log.info("the walk was finished earlier in this run")
            return
        if not state or not state.get("request"):
            # A backfill walks whole (no incremental bound), from its first page.
            state = first_request(src, None if bf else state)
            if bf is not None:
                state = _skip_to(src, state, int(bf.start or 1))
        else:
            log.info("resuming the walk", page=state["page"] + 1)
        first, last = (int(bf.start or 1), bf.end and int(bf.end)) if bf else (1, None)
        async with http_client(src) as client:
            async for page in walk(src, Fetcher(src, client), state, ex.warn):
                if page.number < first:     # a style that cannot start at a page
                    continue
                keep = skip_boundary(src, page.state, page.items)
                if skipped := keep.count(False):
                    log.info("items at the previous high-water mark skipped", count=skipped)
                at = page.state if bf is None else {
                    **page.state, "at": page.number,
                    "fraction": (page.number - first + 1) / (last - first + 1) if last else None,
                    **({"request": None} if page.number == last else {})}
                yield await ex.prepare(json_batch(
                    src, page.url, page.items, page.raw,
                    [(page.number, i) for i in range(len(page.items))], self.position_keys,
                    keep=keep, state=at, bytes_read=page.size, pages=1,
                    checkpoint=src.url))
                if page.number == last:
                    return

    async def check(self, src: ApiSource, base_dir: Path) -> str:
        request = first_request(src, None)["request"]
        return await check_urls(src, [(request["url"], request["params"])])


KIND = ApiKind()
