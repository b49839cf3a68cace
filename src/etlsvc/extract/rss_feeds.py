"""RSS/Atom source: feeds fetched concurrently with conditional GET, parsed by feedparser.

Owns fetching feeds (httpx, with the ETag and Last-Modified of the last fetch, so an
unchanged feed costs one 304), handing feedparser the bytes (it never fetches anything
itself) in a worker thread, and turning entries into records:

* the record is the entry as feedparser gives it (dates as the ``[year, month, …]`` list of
  their ``*_parsed`` struct), plus three derived fields: ``etlsvc_key`` (the entry id, else
  its link, else a hash of title and published date), ``etlsvc_time`` (published, else
  updated, in UTC, RFC 3339) and ``etlsvc_tags`` (the tag terms);
* JSON Feed (jsonfeed.org) documents are read too, their items mapped to the same fields;
* an ill-formed ("bozo") feed loads the entries that parsed; the problem is reported with
  the feed's outcome. A feed that fails never stops the others.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import feedparser
import httpx
import msgspec
import structlog

from etlsvc.config import RssSource
from etlsvc.errors import SourceError
from etlsvc.extract.json_api import Fetcher

log = structlog.get_logger()


@dataclass
class Feed:
    """The outcome of one feed URL: its entries (possibly none) and its new checkpoint."""

    url: str
    status: str                        # "loaded" | "not modified" | "failed"
    entries: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None         # the bozo exception, or the failure
    size: int = 0


async def fetch_all(src: RssSource, client: httpx.AsyncClient,
                    states: dict[str, dict[str, Any]]) -> AsyncIterator[Feed]:
    """Fetch every feed of ``src`` (at most ``max_concurrency`` at once), as they complete."""
    fetcher = Fetcher(src, client)
    limit = asyncio.Semaphore(src.max_concurrency)

    async def one(url: str) -> Feed:
        async with limit:
            try:
                return await _fetch(src, fetcher, url, states.get(url) or {})
            except SourceError as exc:
                return Feed(url, "failed", state=states.get(url) or {}, problem=str(exc))

    tasks = [asyncio.create_task(one(url)) for url in src.urls]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for task in tasks:
            task.cancel()


async def _fetch(src: RssSource, fetcher: Fetcher, url: str, state: dict[str, Any]) -> Feed:
    headers = {"Accept": "application/rss+xml, application/atom+xml, application/xml;q=0.9, "
                         "text/xml;q=0.8, */*;q=0.5"}
    if state.get("etag"):
        headers["If-None-Match"] = state["etag"]
    if state.get("last_modified"):
        headers["If-Modified-Since"] = state["last_modified"]
    response, body = await fetcher.get(url, {}, headers=headers)
    if response.status_code == 304:
        return Feed(url, "not modified", state=state)
    items = json_feed_items(body)
    problem = None
    if items is None:
        parsed = await asyncio.to_thread(_parse, body, response.headers)
        if parsed.bozo:
            problem = f"{type(parsed.bozo_exception).__name__}: {parsed.bozo_exception}"
            if not parsed.entries:
                raise SourceError(src.name, f"{url}: not a feed, nothing could be parsed "
                                  f"({problem})")
        items = parsed.entries
    entries = [to_record(e) for e in items]
    newest = max((e["etlsvc_time"] for e in entries if e["etlsvc_time"]), default=None)
    new_state = {"etag": response.headers.get("etag"),
                 "last_modified": response.headers.get("last-modified"),
                 "newest": max(filter(None, [newest, state.get("newest")]), default=None)}
    return Feed(url, "loaded", entries, new_state, problem, len(body))


def _parse(body: bytes, headers: httpx.Headers) -> Any:
    # feedparser is given the bytes and the response headers (for the charset); a URL would
    # make it fetch, which we never want.
    return feedparser.parse(body, response_headers=dict(headers))


def to_record(entry: Any) -> dict[str, Any]:
    """A JSON-ready copy of a feedparser entry, with the derived ``etlsvc_*`` fields."""
    record = _jsonable(entry)
    when = entry.get("published_parsed") or entry.get("updated_parsed")
    if when:
        record["etlsvc_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", when)
    else:   # JSON Feed: RFC 3339 strings
        record["etlsvc_time"] = _utc(entry.get("published") or entry.get("updated"))
    record["etlsvc_key"] = entry.get("id") or entry.get("link") or hashlib.sha256(
        f"{entry.get('title', '')}\x1f{entry.get('published', '')}".encode()).hexdigest()
    record["etlsvc_tags"] = [t["term"] for t in entry.get("tags") or [] if t.get("term")]
    return record


def json_feed_items(body: bytes) -> list[dict[str, Any]] | None:
    """The items of a JSON Feed (jsonfeed.org) as feedparser-like entries; None if not one.

    feedparser 6 reads RSS and Atom only.
    """
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(doc, dict) or "jsonfeed.org" not in str(doc.get("version", "")):
        return None
    entries = []
    for item in doc.get("items") or []:
        if not isinstance(item, dict):
            continue
        entries.append({
            **item,
            "link": item.get("url") or item.get("external_url"),
            "summary": item.get("summary") or item.get("content_text")
            or item.get("content_html"),
            "published": item.get("date_published"), "updated": item.get("date_modified"),
            "tags": [{"term": t} for t in item.get("tags") or [] if isinstance(t, str)],
        })
    return entries


def _utc(value: Any) -> str | None:
    try:
        when = msgspec.convert(value, dt.datetime)
    except msgspec.ValidationError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _jsonable(value: Any) -> Any:
    if isinstance(value, time.struct_time):
        return list(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
