"""RSS/Atom source against real HTTP on 127.0.0.1: the feedparser suite, real feeds, ETags."""

from __future__ import annotations

import re
import time
from pathlib import Path

import asyncpg
import feedparser
import pytest

from tests.conftest import CORPUS, Env, run_source
from tests.upstream import Reply, Request, Upstream

RSS = CORPUS / "rss"
SUITE = sorted(p for p in (RSS / "feedparser").rglob("*.xml"))
WELLFORMED = [p for p in SUITE if "wellformed" in p.parts and "illformed" not in p.parts]
ILLFORMED = [p for p in SUITE if p not in WELLFORMED]
REAL = sorted((RSS / "feedjira-real-feeds").glob("*"))


def rss_source(name: str, urls: list[str], extra: str = "") -> str:
    listed = ", ".join(f'"{u}"' for u in urls)
    return f'\n[[sources]]\nname = "{name}"\nkind = "rss"\nurls = [{listed}]\n{extra}\n'


def header_lines(doc: bytes) -> tuple[str | None, dict[str, str]]:
    """The `Expect:` expression and `Header:` lines of a feedparser test file."""
    text = doc.decode("utf-8", "replace")
    expect = re.search(r"^Expect:\s*(.*)$", text, re.M)
    headers = {}
    for h in re.findall(r"^Header:\s*(.*)$", text, re.M):
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()
    return (expect.group(1).strip() if expect else None), headers


class NotKept(Exception):
    """The expectation reads something we do not keep (feed-level data)."""


class _Feed:
    def __getitem__(self, key: str) -> object:
        raise NotKept(key)

    get = __getitem__


def as_feedparser(value: object, key: str = "") -> object:
    """Our stored entry back into feedparser's shapes (``*_parsed`` as struct_time)."""
    if key.endswith("_parsed") and isinstance(value, list):
        return time.struct_time(value)
    if isinstance(value, dict):  # FeedParserDict resolves feedparser's aliases (guid → id …)
        return feedparser.FeedParserDict({k: as_feedparser(v, k) for k, v in value.items()})
    if isinstance(value, list):
        return [as_feedparser(v) for v in value]
    return value


def serve_file(upstream: Upstream, path: Path) -> str:
    doc = path.read_bytes()
    _, headers = header_lines(doc)
    headers.setdefault("Content-type", "application/xml")
    route = "/" + path.name
    upstream.route(route, lambda r: Reply(body=doc, headers=headers))
    return upstream.base + route


@pytest.mark.parametrize("path", WELLFORMED, ids=[str(p.relative_to(RSS)) for p in WELLFORMED])
async def test_feedparser_wellformed_suite(
    env: Env, pool: asyncpg.Pool, upstream: Upstream, path: Path
) -> None:
    url = serve_file(upstream, path)
    cfg = env.config(rss_source("feed", [url], "max_error_rate = 1.0"))
    run = await run_source(cfg, "feed")
    outcome = run["notes"]["feeds"][url]
    entries = [
        as_feedparser(r["record"])
        for r in await pool.fetch("SELECT record FROM raw_rss_data ORDER BY entry_index")
    ]
    expect, _ = header_lines(path.read_bytes())
    if outcome["status"] == "failed":
        # a well-formed document with no entries at all: a clear error, nothing stored
        assert run["status"] == "failed" and url in run["error"]
        assert not entries
        return
    assert run["status"] == "succeeded", run["error"]
    assert outcome["entries"] == len(entries) + run["rows_rejected"]
    if expect and "entries" in expect:
        try:
            ok = eval(
                expect,
                {"entries": entries, "bozo": outcome["problem"] is not None, "feed": _Feed()},
            )
        except NotKept:
            return
        assert ok, (expect, entries)


@pytest.mark.parametrize("path", ILLFORMED, ids=[str(p.relative_to(RSS)) for p in ILLFORMED])
async def test_illformed_and_encoding_suite_loads_what_parses_or_fails_clearly(
    env: Env, pool: asyncpg.Pool, upstream: Upstream, path: Path
) -> None:
    url = serve_file(upstream, path)
    cfg = env.config(rss_source("feed", [url], "max_error_rate = 1.0"))
    run = await run_source(cfg, "feed")
    outcome = run["notes"]["feeds"][url]
    stored = await pool.fetchval("SELECT count(*) FROM raw_rss_data")
    if outcome["status"] == "failed":
        assert run["status"] == "failed"
        assert url in run["error"] and "internal error" not in run["error"]
        assert stored == 0
    else:
        assert run["status"] == "succeeded", run["error"]
        assert stored == run["rows_valid"] == outcome["entries"] - run["rows_rejected"]


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
async def test_real_feeds_load(
    env: Env, pool: asyncpg.Pool, upstream: Upstream, path: Path
) -> None:
    url = serve_file(upstream, path)
    cfg = env.config(rss_source("real", [url]))
    run = await run_source(cfg, "real")
    assert run["status"] == "succeeded", run["error"]
    assert run["rows_valid"] > 0 and run["rows_rejected"] == 0
    rows = await pool.fetch("SELECT source_id, title, url, event_time FROM normalized_data")
    assert len(rows) == run["rows_inserted"] + run["rows_unchanged"] - (
        run["rows_valid"] - len({r["source_id"] for r in rows}) - run["rows_unchanged"]
    )
    assert all(r["source_id"] for r in rows)


async def test_two_hundred_feeds_second_run_is_200_conditional_304s(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    def feed(n: int) -> bytes:
        return (
            f'<?xml version="1.0"?><rss version="2.0"><channel><title>F{n}</title>'
            f"<item><guid>feed-{n}-a</guid><title>A {n}</title>"
            "<pubDate>Mon, 06 May 2024 10:00:00 GMT</pubDate></item>"
            f"<item><guid>feed-{n}-b</guid><title>B {n}</title></item>"
            "</channel></rss>"
        ).encode()

    def route(n: int):
        def handle(r: Request) -> Reply:
            etag = f'"v1-{n}"'
            if r.headers.get("if-none-match") == etag:
                return Reply(304, b"", {"ETag": etag})
            return Reply(
                body=feed(n), headers={"ETag": etag, "Content-Type": "application/rss+xml"}
            )

        return handle

    urls = []
    for n in range(200):
        upstream.route(f"/f/{n}", route(n))
        urls.append(f"{upstream.base}/f/{n}")
    cfg = env.config(rss_source("many", urls))
    first = await run_source(cfg, "many")
    assert first["status"] == "succeeded", first["error"]
    assert first["rows_inserted"] == 400 and first["pages_read"] == 200
    upstream.requests.clear()
    second = await run_source(cfg, "many")
    assert second["status"] == "succeeded"
    assert len(upstream.requests) == 200
    assert all(r.headers.get("if-none-match", "").startswith('"v1-') for r in upstream.requests)
    assert (second["rows_read"], second["rows_inserted"], second["rows_updated"]) == (0, 0, 0)
    assert {o["status"] for o in second["notes"]["feeds"].values()} == {"not modified"}
    assert await pool.fetchval("SELECT count(*) FROM raw_rss_data") == 400


async def test_one_failing_feed_does_not_stop_the_others(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    good = serve_file(upstream, RSS / "feedjira-real-feeds" / "TechCrunch.xml")
    upstream.route("/broken", lambda r: Reply(500, b"down"))
    upstream.route(
        "/html",
        lambda r: Reply(body=b"<html><body>not a feed", headers={"Content-Type": "text/html"}),
    )
    cfg = env.config(
        rss_source(
            "mixed",
            [good, f"{upstream.base}/broken", f"{upstream.base}/html"],
            "[sources.retry]\nattempts = 2\nbackoff = 0.01\n",
        )
    )
    run = await run_source(cfg, "mixed")
    assert run["status"] == "failed"
    assert run["error"].startswith("source 'mixed': 2 of 3 feeds failed")
    feeds = run["notes"]["feeds"]
    assert feeds[good]["status"] == "loaded" and feeds[good]["entries"] == 20
    assert feeds[f"{upstream.base}/broken"]["status"] == "failed"
    assert "HTTP 500 after 2 attempts" in feeds[f"{upstream.base}/broken"]["problem"]
    assert "not a feed" in feeds[f"{upstream.base}/html"]["problem"]
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == 20


async def test_identity_falls_back_to_link_then_a_hash_and_dates_are_utc(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    doc = (
        b'<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>'
        b"<item><guid>the-id</guid><title>has id</title>"
        b"<pubDate>Mon, 06 May 2024 12:00:00 +0200</pubDate></item>"
        b"<item><link>http://example.com/x</link><title>has link</title></item>"
        b"<item><title>bare</title><pubDate>Tue, 07 May 2024 08:00:00 GMT</pubDate></item>"
        b"</channel></rss>"
    )
    upstream.route("/id", lambda r: Reply(body=doc))
    cfg = env.config(rss_source("ids", [f"{upstream.base}/id"]))
    run = await run_source(cfg, "ids")
    assert run["status"] == "succeeded", run["error"]
    rows = {r["title"]: r for r in await pool.fetch("SELECT * FROM normalized_data")}
    assert rows["has id"]["source_id"] == "the-id"
    assert rows["has id"]["event_time"].isoformat() == "2024-05-06T10:00:00+00:00"
    assert rows["has link"]["source_id"] == "http://example.com/x"
    assert rows["has link"]["url"] == "http://example.com/x"
    assert re.fullmatch(r"[0-9a-f]{64}", rows["bare"]["source_id"])


async def test_feeds_are_fetched_concurrently_within_the_bound(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    import threading

    lock = threading.Lock()
    state = {"now": 0, "max": 0}
    doc = (RSS / "feedjira-real-feeds" / "SamRuby.xml").read_bytes()

    def slow(r: Request) -> Reply:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return Reply(body=doc, headers={"Content-Type": "application/atom+xml"})

    upstream.route("/slow", slow)
    urls = [f"{upstream.base}/slow?n={n}" for n in range(12)]
    cfg = env.config(rss_source("bounded", urls, "max_concurrency = 4"))
    run = await run_source(cfg, "bounded")
    assert run["status"] == "succeeded", run["error"]
    assert state["max"] == 4                    # four at once, never five


async def test_last_modified_gives_a_conditional_request_too(
    env: Env, pool: asyncpg.Pool, upstream: Upstream
) -> None:
    doc = (RSS / "feedjira-real-feeds" / "SamRuby.xml").read_bytes()
    stamp = "Wed, 01 May 2024 10:00:00 GMT"

    def feed(r: Request) -> Reply:
        if r.headers.get("if-modified-since") == stamp:
            return Reply(304, b"")
        return Reply(
            body=doc, headers={"Last-Modified": stamp, "Content-Type": "application/atom+xml"}
        )

    upstream.route("/lm", feed)
    cfg = env.config(rss_source("lm", [f"{upstream.base}/lm"]))
    first = await run_source(cfg, "lm")
    assert first["rows_inserted"] > 0
    second = await run_source(cfg, "lm")
    assert upstream.requests[-1].headers["if-modified-since"] == stamp
    assert (
        second["rows_read"] == 0
        and second["notes"]["feeds"][f"{upstream.base}/lm"]["status"] == "not modified"
    )


def test_the_bundled_sample_feeds_parse_without_a_problem() -> None:
    import feedparser

    from tests.conftest import REPO

    feeds = sorted((REPO / "samples" / "http" / "feeds").glob("*.xml"))
    assert feeds
    for path in feeds:
        parsed = feedparser.parse(path.read_bytes())
        assert not parsed.bozo, (path.name, parsed.get("bozo_exception"))
        assert parsed.entries
