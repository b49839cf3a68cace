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

import asyncio
import base64
import datetime as dt
import email.utils
import hashlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urljoin

import httpx
import msgspec
import structlog

from etlsvc.config import ApiSource, RssSource
from etlsvc.errors import SourceError, describe

log = structlog.get_logger()

_RETRY_STATUS = {429, 500, 502, 503, 504}
_SEEN_LIMIT = 1000


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


def get_path(obj: Any, path: str) -> Any:
    """The value at a dotted path (``a.b.0.c``) in decoded JSON; None where it is absent."""
    if not path:
        return obj
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.lstrip("-").isdigit():
            index = int(part)
            obj = obj[index] if -len(obj) <= index < len(obj) else None
        else:
            return None
    return obj


def http_client(src: ApiSource | RssSource) -> httpx.AsyncClient:
    """The HTTP client of one run of an HTTP source, with the source's timeouts."""
    t = src.timeouts
    return httpx.AsyncClient(timeout=httpx.Timeout(t.total, connect=t.connect, read=t.read),
                             follow_redirects=True)


class Fetcher:
    """GET requests of one source, with its timeouts, retries, rate limit and size cap."""

    def __init__(self, src: ApiSource | RssSource, client: httpx.AsyncClient,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.src = src
        self.client = client
        self.sleep = sleep
        self._next_slot = 0.0

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", **self.src.headers}
        auth = self.src.auth
        if auth:
            secret = os.environ.get(auth.env)
            if not secret:
                raise SourceError(self.src.name, f"environment variable {auth.env} (the "
                                  "secret of this source's auth) is not set")
            if auth.type == "bearer":
                headers["Authorization"] = f"Bearer {secret}"
            elif auth.type == "basic":
                token = base64.b64encode(f"{auth.username}:{secret}".encode()).decode()
                headers["Authorization"] = f"Basic {token}"
            else:
                headers[auth.header] = secret
        return headers

    async def _wait_for_slot(self) -> None:
        if self.src.rate_limit is None:
            return
        now = time.monotonic()
        start = max(now, self._next_slot)
        self._next_slot = start + 1.0 / self.src.rate_limit
        if start > now:
            await self.sleep(start - now)

    async def get(self, url: str, params: dict[str, str],
                  headers: dict[str, str] | None = None) -> tuple[httpx.Response, bytes]:
        """GET ``url``; retry what is worth retrying; SourceError when it cannot succeed."""
        retry = self.src.retry
        headers = {**self._headers(), **(headers or {})}
        problem = ""
        for attempt in range(1, retry.attempts + 1):
            await self._wait_for_slot()
            delay = None
            try:
                async with asyncio.timeout(self.src.timeouts.total):
                    response, body = await self._get_once(url, params, headers)
            except (httpx.TooManyRedirects, httpx.UnsupportedProtocol, httpx.DecodingError,
                    httpx.InvalidURL) as exc:             # retrying cannot help
                raise SourceError(self.src.name, f"GET {url}: {describe(exc)}") from exc
            except (httpx.TransportError, TimeoutError) as exc:
                problem = describe(exc)
            else:
                if response.status_code not in _RETRY_STATUS:
                    if response.is_error:
                        raise SourceError(self.src.name, f"GET {response.url}: HTTP "
                                          f"{response.status_code}{_snippet(body)}")
                    return response, body
                problem = f"HTTP {response.status_code}"
                delay = _retry_after(response.headers.get("retry-after"))
                if delay is not None and delay > retry.max_retry_after:
                    raise SourceError(self.src.name, f"GET {url}: {problem} with Retry-After "
                                      f"{delay:.0f} s, more than max_retry_after")
            if attempt == retry.attempts:
                break
            if delay is None:
                backoff = min(retry.max_backoff, retry.backoff * 2 ** (attempt - 1))
                delay = backoff * (0.5 + random.random() / 2)       # jitter: 50-100 %
            log.warning("request failed, retrying", url=url, problem=problem, attempt=attempt,
                        delay_s=round(delay, 3))
            await self.sleep(delay)
        raise SourceError(self.src.name, f"GET {url}: {problem} after {retry.attempts} attempts")

    async def _get_once(self, url: str, params: dict[str, str],
                        headers: dict[str, str]) -> tuple[httpx.Response, bytes]:
        limit = self.src.max_response_bytes
        # Merged, not replaced: httpx drops a URL's own query when given params.
        target = httpx.URL(url).copy_merge_params(params) if params else httpx.URL(url)
        async with self.client.stream("GET", target, headers=headers) as response:
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise SourceError(self.src.name, f"GET {url}: response of {declared} bytes is "
                                  f"larger than max_response_bytes ({limit})")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise SourceError(self.src.name, f"GET {url}: response larger than "
                                      f"max_response_bytes ({limit})")
                chunks.append(chunk)
        return response, b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _snippet(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return f": {text}" if text else ""


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


def _minus_lag(hwm: str, lag: float) -> str:
    if not lag:
        return hwm
    try:
        when = msgspec.convert(hwm, dt.datetime)
    except msgspec.ValidationError:
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
        key = _text(get_path(item, key_path))
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
    if not isinstance(value, str):
        return None
    try:
        when = msgspec.convert(value, dt.datetime)
    except msgspec.ValidationError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _text(value: Any) -> str | None:
    """A JSON value as PostgreSQL's ``#>>`` shows it (strings bare, the rest as JSON)."""
    if value is None or isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def project(items: list[Any], columns: list[str]) -> list[list[str | None]]:
    """Rows for validation: the mapped paths of each item, as text (as the SQL sees them)."""
    return [[_text(get_path(item, c)) for c in columns] for item in items]


def skip_boundary(src: ApiSource, state: dict[str, Any], items: list[Any]) -> list[bool]:
    """Which items to keep: not those exactly at the previous mark that were loaded already."""
    inc = src.incremental
    since, keys = state.get("since"), set(state.get("since_boundary", []))
    if inc is None or since is None or not keys:
        return [True] * len(items)
    key_path = src.fields.source_id or ""
    return [not (get_path(i, inc.field) == since and _text(get_path(i, key_path)) in keys)
            for i in items]
