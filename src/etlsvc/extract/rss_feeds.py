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
from pathlib import Path
from typing import Annotated, Any

import feedparser
import httpx
import msgspec
import structlog

from etlsvc.contract import Extraction, Fields, Prepared, SourceKind, WorkerPool
from etlsvc.errors import SourceError
from etlsvc.extract.http import Fetcher, HttpSource, check_url, check_urls, http_client
from etlsvc.extract.records import json_batch, parse_time

log = structlog.get_logger()


#: What an RSS source maps by default: the entry's id (else link, else a hash), title,
#: summary, link, tag terms, and published (else updated) date.
RSS_FIELDS = Fields(source_id="etlsvc_key", title="title", description="summary", url="link",
                    tags="etlsvc_tags", event_time="etlsvc_time")


class RssSource(HttpSource, tag="rss", kw_only=True):
    """One or more RSS/Atom feeds."""

    urls: Annotated[list[str], msgspec.Meta(min_length=1)]
    fields: Fields = RSS_FIELDS
    #: Feeds fetched at the same time at most.
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8

    kind = "rss"


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
                    states: dict[str, dict[str, Any]], workers: WorkerPool) -> AsyncIterator[Feed]:
    """Fetch every feed of ``src`` (at most ``max_concurrency`` at once), as they complete;
    feeds are parsed in the worker processes."""
    fetcher = Fetcher(src, client)
    limit = asyncio.Semaphore(src.max_concurrency)

    async def one(url: str) -> Feed:
        async with limit:
            try:
                return await _fetch(src, fetcher, url, states.get(url) or {}, workers)
            except SourceError as exc:
                return Feed(url, "failed", state=states.get(url) or {}, problem=str(exc))

    tasks = [asyncio.create_task(one(url)) for url in src.urls]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for task in tasks:
            task.cancel()


async def _fetch(src: RssSource, fetcher: Fetcher, url: str, state: dict[str, Any],
                 workers: WorkerPool) -> Feed:
    headers = {"Accept": "application/rss+xml, application/atom+xml, application/xml;q=0.9, "
                         "text/xml;q=0.8, */*;q=0.5"}
    if state.get("etag"):
        headers["If-None-Match"] = state["etag"]
    if state.get("last_modified"):
        headers["If-Modified-Since"] = state["last_modified"]
    response, body = await fetcher.get(url, {}, headers=headers)
    if response.status_code == 304:
        return Feed(url, "not modified", state=state)
    entries, problem = await workers.run(parse, body, dict(response.headers))
    if problem and not entries:
        raise SourceError(src.name, f"{url}: not a feed, nothing could be parsed ({problem})")
    newest = max((e["etlsvc_time"] for e in entries if e["etlsvc_time"]), default=None)
    new_state = {"etag": response.headers.get("etag"),
                 "last_modified": response.headers.get("last-modified"),
                 "newest": max(filter(None, [newest, state.get("newest")]), default=None)}
    return Feed(url, "loaded", entries, new_state, problem, len(body))


def parse(body: bytes, headers: dict[str, str]) -> tuple[list[dict[str, Any]], str | None]:
    """A feed document's entries as records, and the problem feedparser found (if any)."""
    items = json_feed_items(body)
    problem = None
    if items is None:
        # feedparser is given the bytes and the response headers (for the charset); a URL
        # would make it fetch, which we never want.
        parsed = feedparser.parse(body, response_headers=headers)
        if parsed.bozo:
            problem = f"{type(parsed.bozo_exception).__name__}: {parsed.bozo_exception}"
        items = parsed.entries
    return [to_record(e) for e in items], problem


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
    when = parse_time(value)
    if when is None:
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


class RssKind(SourceKind):
    """RSS/Atom (and JSON Feed) feeds; see the module docstring."""

    name = "rss"
    config = RssSource
    raw_table = "raw_rss_data"
    stream_column = "feed_url"
    position_columns = ("entry_index",)
    position_keys = ("entry",)

    def check_config(self, src: RssSource, where: str) -> None:
        for j, url in enumerate(src.urls):
            check_url(src, where, url, f"urls[{j}]")

    async def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        src: RssSource = ex.src
        outcomes: dict[str, dict[str, Any]] = ex.notes.setdefault("feeds", {})
        async with http_client(src) as client:
            async for feed in fetch_all(src, client, ex.checkpoints, ex.workers):
                outcomes[feed.url] = {"status": feed.status, "entries": len(feed.entries),
                                      "problem": feed.problem}
                (log.warning if feed.problem else log.info)(
                    "feed " + feed.status, feed=feed.url, entries=len(feed.entries),
                    problem=feed.problem)
                if feed.status != "loaded":
                    continue
                raws = [msgspec.json.encode(e) for e in feed.entries]
                yield await ex.prepare(json_batch(
                    src, feed.url, feed.entries, raws, [(i,) for i in range(len(raws))],
                    self.position_keys, state=feed.state, bytes_read=feed.size, pages=1))
        failed = {u: o["problem"] for u, o in outcomes.items() if o["status"] == "failed"}
        if failed:
            raise SourceError(src.name, f"{len(failed)} of {len(outcomes)} feeds failed: " +
                              "; ".join(failed.values()))

    async def check(self, src: RssSource, base_dir: Path) -> str:
        return await check_urls(src, [(u, {}) for u in src.urls])


KIND = RssKind()
