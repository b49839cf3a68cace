"""The change feed: GET /data/changes and /data/changes/stream, under concurrent writers."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient

from etlsvc import db
from etlsvc.api import changes
from etlsvc.api.app import create_app
from etlsvc.contract import Fields
from etlsvc.extract import KINDS
from etlsvc.extract.json_api import ApiSource
from etlsvc.load import normalize
from etlsvc.runtime import replay, retention
from tests.conftest import Env, csv_source, run_source
from tests.integration.test_service import servers

FIELDS = Fields(source_id="id", title="title")


async def feed(client: Any, after: str = "0", **params: Any) -> tuple[list, str]:
    """One page of the feed: its changes and its next token."""
    r = await client.get("/data/changes", params={"after": after, **params})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["data"], body["metadata"]["pagination"]["next"]


async def drain(client: Any, after: str = "0", limit: int = 1000,
                **params: Any) -> tuple[list, str]:
    """Every change after ``after`` that the feed has now, page by page. The first page
    waits for up to 30 s (it returns as soon as there is one): a transaction of anything
    else on the cluster holds the feed back, and on a shared cluster under a loaded
    machine another test's can last several seconds (5 s were once not enough)."""
    got: list = []
    while True:
        page, after = await feed(client, after, limit=limit, wait=0 if got else 30,
                                 **params)
        got += page
        if not page:
            return got, after


async def write(conn: asyncpg.Connection, source: str, items: dict[str, str]) -> None:
    """Land ``items`` (key → title) as raw API rows and normalize them, as a batch does."""
    ids = [await conn.fetchval(
        "INSERT INTO raw_api_data (run_id, source, url, page, item_index, source_key, record) "
        "VALUES (0, $1, 'test', 0, $2, $3, $4) RETURNING id", source, i, key,
        {"id": key, "title": title}) for i, (key, title) in enumerate(items.items())]
    src = ApiSource(name=source, url="http://127.0.0.1/", fields=FIELDS, tags_separator=",")
    written = await normalize.upsert(conn, src, KINDS["api"], above=min(ids) - 1,
                                     upto=max(ids), distinct_keys=True)
    if any(written):
        await normalize.bump_version(conn, src, KINDS["api"])


async def follow_while_writing(env: Env, writer: Callable[[int], Awaitable[None]],
                               writers_pool: asyncpg.Pool, committed: list[int],
                               rng: random.Random, **params: Any) -> list[dict]:
    """Four writers (``writer(0..3)``) while a consumer follows the feed of a real server in
    pages of 7 (with ``params``), until the horizon is past every transaction committed;
    what the consumer was sent. The writers' pool is closed at the end."""
    delivered: list[dict] = []
    done = asyncio.Event()

    async def consumer(client: httpx.AsyncClient) -> None:
        after = "0"
        while True:
            finished = done.is_set()
            page, after = await feed(client, after, limit=7, wait=1 if finished else 0,
                                     **params)
            delivered.extend(page)
            # Done once the horizon is past every writer's transaction: a transaction of
            # anything else on the cluster (another test process) may hold it back a while.
            if finished and not page and int(after.split(".")[0].split("-")[0]) > max(committed):
                return
            await asyncio.sleep(rng.uniform(0, 0.02))

    env.write_config("")
    try:
        with servers(env) as (server,):
            async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
                reader = asyncio.create_task(consumer(client))
                await asyncio.gather(*(writer(w) for w in range(4)))
                done.set()
                await reader
    finally:
        await writers_pool.close()
    return delivered


async def test_inserts_updates_and_deletes_come_once_each_in_order(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "p.csv"
    path.write_text("id,name,title\n1,a,one\n2,b,two\n3,c,three\n")
    cfg = env.config(csv_source("p", path, fields='source_id = "id"\ntitle = "title"'))
    async with AsyncTestClient(app=create_app(cfg)) as client:
        empty, start = await feed(client)
        assert empty == []
        assert (await run_source(cfg, "p"))["status"] == "succeeded"
        first, token = await drain(client, start)
        assert [(c["op"], c["source_id"], c["record"]["title"]) for c in first] == [
            ("insert", "1", "one"), ("insert", "2", "two"), ("insert", "3", "three")]
        assert [c["token"] for c in first] == sorted(
            (c["token"] for c in first), key=lambda t: tuple(map(int, t.split(".")[0].split("-"))))

        # A rerun with one row changed and one added: one update, one insert, nothing else.
        path.write_text("id,name,title\n1,a,one\n2,b,TWO\n3,c,three\n4,d,four\n")
        assert (await run_source(cfg, "p", full_refresh=True))["status"] == "succeeded"
        second, token = await drain(client, token)
        assert [(c["op"], c["source_id"], c["record"]["title"]) for c in second] == [
            ("update", "2", "TWO"), ("insert", "4", "four")]
        assert second[0]["id"] == first[1]["id"]

        # A replay with another key column: every old row is deleted, new ones inserted,
        # all in the replay's one transaction.
        cfg = env.config(csv_source("p", path, fields='source_id = "name"\ntitle = "title"'))
        async with db.open_database(cfg) as database:
            assert (await replay.replay_source(database, cfg.source("p")))[
                "status"] == "succeeded"
        third, token = await drain(client, token)
        assert sorted((c["op"], c["source_id"]) for c in third) == [
            ("delete", "1"), ("delete", "2"), ("delete", "3"), ("delete", "4"),
            ("insert", "a"), ("insert", "b"), ("insert", "c"), ("insert", "d")]
        xids = {c["token"].split(".")[0].split("-")[0] for c in third}
        assert len(xids) == 1
        assert all(c["record"] is None for c in third if c["op"] == "delete")

        # An operator's DELETE by hand is in the feed too.
        await pool.execute("DELETE FROM normalized_data WHERE source_id = 'a'")
        fourth, token = await drain(client, token)
        assert [(c["op"], c["source_id"]) for c in fourth] == [("delete", "a")]

        # Paging: what the feed holds from the start now (compacted: the rows that were
        # deleted appear once, as deletes), the same in pages of one.
        whole, _ = await drain(client, start)
        paged, after = [], start
        for _ in range(30):
            page, after = await feed(client, after, limit=1)
            if not page:
                break
            paged += page
        assert paged == whole
        assert [(c["op"], c["source_id"]) for c in whole] == [
            ("delete", "1"), ("delete", "2"), ("delete", "3"), ("delete", "4"),
            ("insert", "b"), ("insert", "c"), ("insert", "d"), ("delete", "a")]
        assert (await feed(client, after))[0] == []
        assert (await feed(client, "now"))[0] == []

        for bad in ("x", "1-", "-1", "1-2-3", "1" * 21 + "-1"):
            r = await client.get("/data/changes", params={"after": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_token", bad


async def test_a_transaction_that_commits_late_is_not_skipped(
    env: Env, pool: asyncpg.Pool
) -> None:
    """T1 writes first (lower xid and id) but commits after T2: a reader that remembers the
    highest id it saw skips T1's row; the feed holds T2 back until T1 ends, then sends both."""
    async with AsyncTestClient(app=create_app(env.config(""))) as client:
        _, start = await feed(client)
        t1, t2 = await pool.acquire(), await pool.acquire()
        try:
            tx1 = t1.transaction()
            await tx1.start()
            await write(t1, "s", {"a": "a:v1"})
            async with t2.transaction():   # another source: one source has one writer
                await write(t2, "t", {"b": "b:v1"})
            # The plain read API shows b, whose id is above a's: "id > last seen" loses a.
            seen = (await client.get("/data")).json()["data"]
            assert [r["source_id"] for r in seen] == ["b"]
            held, token = await feed(client, start, wait=0.3)
            assert held == []
            await tx1.commit()
        finally:
            await pool.release(t1)
            await pool.release(t2)
        got, _ = await drain(client, token)
        assert [c["source_id"] for c in got] == ["a", "b"]
        assert got[0]["id"] < got[1]["id"]


async def test_four_writers_with_random_commit_delays_one_consumer_sees_each_change_once(
    env: Env, database_url: str, pool: asyncpg.Pool
) -> None:
    """Four writers insert, update and delete rows of their own sources in transactions that
    sleep at random before committing (so commits land out of xid order), while a consumer
    follows the feed of a real server in pages of 7. Checked: no change twice; each row's
    versions in commit order, its delete last; the consumer's copy equals the table; every
    delete arrives."""
    rng = random.Random(20261130)
    writers_pool = await asyncpg.create_pool(database_url, min_size=4, max_size=4,
                                             init=db.init_connection)
    committed: list[int] = []          # xids, in the order their commits returned
    deleted: set[str] = set()          # "source/key" of every row a writer deleted

    async def writer(w: int) -> None:
        source, live, version, fresh = f"w{w}", {}, 0, 0
        async with writers_pool.acquire() as conn:
            for _ in range(25):
                version += 1
                async with conn.transaction():
                    xid = await conn.fetchval("SELECT pg_current_xact_id()")
                    items = {f"k{fresh + i}": f"v{version}" for i in range(2)}
                    fresh += 2
                    for key in rng.sample(sorted(live), min(2, len(live))):
                        items[key] = f"v{version}"
                    await write(conn, source, items)
                    live.update(items)
                    if len(live) > 4 and rng.random() < 0.4:
                        gone = rng.choice(sorted(live))
                        del live[gone]
                        await conn.execute("DELETE FROM normalized_data WHERE source = $1 "
                                           "AND source_id = $2", source, gone)
                        deleted.add(f"{source}/{gone}")
                    await asyncio.sleep(rng.uniform(0, 0.03))
                committed.append(xid)
                await asyncio.sleep(rng.uniform(0, 0.01))

    delivered = await follow_while_writing(env, writer, writers_pool, committed, rng)

    # The run was a real test: some transaction committed after a later-numbered one.
    assert committed != sorted(committed)
    positions = [tuple(map(int, c["token"].split(".")[0].split("-"))) for c in delivered]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    copy: dict[int, dict] = {}
    versions: dict[int, list[int]] = {}
    for c in delivered:
        assert c["id"] not in versions or versions[c["id"]][-1] != -1, "change after delete"
        if c["op"] == "delete":
            versions.setdefault(c["id"], []).append(-1)
            copy.pop(c["id"], None)
        else:
            versions.setdefault(c["id"], []).append(int(c["record"]["title"][1:]))
            copy[c["id"]] = c["record"]
    for seq in versions.values():
        live = [v for v in seq if v != -1]
        assert live == sorted(live) and len(set(live)) == len(live), seq
    table = {r["id"]: dict(r) for r in await pool.fetch(
        "SELECT id, source, source_id, title FROM normalized_data")}
    assert {i: (r["source"], r["source_id"], r["title"]) for i, r in copy.items()} == {
        i: (r["source"], r["source_id"], r["title"]) for i, r in table.items()}
    assert {f"{c['source']}/{c['source_id']}" for c in delivered if c["op"] == "delete"} \
        == deleted and deleted


async def test_long_poll_returns_as_soon_as_a_change_commits(
    env: Env, pool: asyncpg.Pool
) -> None:
    async def later() -> None:
        await asyncio.sleep(0.5)
        async with pool.acquire() as conn, conn.transaction():
            await write(conn, "s", {"late": "late:v1"})

    env.write_config("")
    with servers(env) as (server,):
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            _, head = await feed(client, "now")
            began = time.monotonic()
            empty, _ = await feed(client, head, wait=0.5)
            assert empty == [] and time.monotonic() - began >= 0.5

            writer = asyncio.create_task(later())
            began = time.monotonic()
            got, _ = await feed(client, head, wait=20)
            waited = time.monotonic() - began
            await writer
            assert [c["source_id"] for c in got] == ["late"]
            assert 0.4 < waited < 5, waited
            r = await client.get("/data/changes", params={"wait": "31"})
            assert r.status_code == 400


async def fresh_start_while_held(client: Any, pool: asyncpg.Pool, start: str) -> str:
    """Write a and b, delete a, prune its tombstone; check the 410 of ``start`` and a fresh
    start's empty page; return where the fresh start is."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            await write(conn, "s", {"a": "a:v1", "b": "b:v1"})
        await conn.execute("DELETE FROM normalized_data WHERE source_id = 'a'")
    # The tombstone is a day old: a retention of half a day prunes it.
    await pool.execute("UPDATE data_tombstones SET deleted_at = now() - interval '1 day'")
    await retention.prune_tombstones(pool, 0.5)
    assert await pool.fetchval("SELECT count(*) FROM data_tombstones") == 0
    r = await client.get("/data/changes", params={"after": start})
    assert r.status_code == 410
    assert r.json()["error"]["code"] == "token_expired"
    assert "after=0" in r.json()["error"]["message"]
    # A fresh start sees nothing while the horizon is held, and stays at the beginning
    # (the horizon is below the pruned tombstone: moving there would be a 410).
    waiting, at = await feed(client, "0", wait=0.6)
    assert waiting == [] and changes.parse_token(at) == changes.BEGINNING
    return at


async def test_a_token_older_than_the_retention_gets_410_and_a_fresh_start_works(
    env: Env, pool: asyncpg.Pool
) -> None:
    async with AsyncTestClient(app=create_app(env.config(""))) as client:
        _, start = await feed(client, "now")
        # A transaction of someone else, older than every write below, holds the horizon.
        blocker = await asyncpg.connect(env.database_url)
        holding = blocker.transaction()
        await holding.start()
        await blocker.fetchval("SELECT pg_current_xact_id()")
        try:
            at = await fresh_start_while_held(client, pool, start)
        finally:
            await blocker.close()
        fresh, token = await drain(client, at)
        assert [(c["op"], c["source_id"]) for c in fresh] == [("insert", "b")]
        assert (await client.get("/data/changes", params={"after": token})).status_code == 200


def sse_events(lines: Iterator[str], count: int) -> list[dict]:
    """The next ``count`` events of an SSE response's lines, as {"id", "data"}."""
    events: list[dict] = []
    event: dict = {}
    for line in lines:
        if line.startswith("id:"):
            event["id"] = line[3:].strip()
        elif line.startswith("data:"):
            event["data"] = json.loads(line[5:].strip())
        elif line == "" and "data" in event:
            events.append(event)
            event = {}
            if len(events) == count:
                return events
    raise AssertionError(f"stream ended after {len(events)} events")


async def test_the_stream_sends_each_change_once_and_resumes_from_last_event_id(
    env: Env, pool: asyncpg.Pool
) -> None:
    env.write_config("")
    async with pool.acquire() as conn, conn.transaction():
        await write(conn, "s", {"a": "a:v1", "b": "b:v1"})
    with servers(env) as (server,):
        url = f"{server.base}/data/changes/stream"
        with httpx.stream("GET", url, params={"after": "0"}, timeout=10) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            first = sse_events(lines, 2)
            assert [e["data"]["source_id"] for e in first] == ["a", "b"]
            assert [e["id"] for e in first] == [e["data"]["token"] for e in first]
            async with pool.acquire() as conn, conn.transaction():
                await write(conn, "s", {"a": "a:v2", "c": "c:v1"})
            second = sse_events(lines, 2)
            assert [(e["data"]["op"], e["data"]["source_id"]) for e in second] == [
                ("update", "a"), ("insert", "c")]
        # A client that lost the connection after "b" resumes after it.
        with httpx.stream("GET", url, headers={"Last-Event-ID": first[1]["id"]},
                          timeout=10) as r:
            assert [e["data"]["source_id"] for e in sse_events(r.iter_lines(), 2)] == [
                "a", "c"]
        bad = httpx.get(url, params={"after": "nope"}, timeout=10)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_token"


async def test_the_feed_needs_a_read_key_when_reads_are_not_public(
    env: Env, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ETLSVC_API_KEYS", "reader:read:r-secret")
    cfg = env.config("", extra="[server]\npublic_read = false")
    async with AsyncTestClient(app=create_app(cfg)) as client:
        assert (await client.get("/data/changes")).status_code == 401
        ok = await client.get("/data/changes", headers={"Authorization": "Bearer r-secret"})
        assert ok.status_code == 200


async def test_a_page_etag_changes_with_every_committed_write_and_only_then(
    env: Env, pool: asyncpg.Pool
) -> None:
    """/data's ETag carries the data version (at most 0.5 s old): any commit that changes a
    row, in any source and in any commit order, makes it stale; a rewrite of the same
    content does not."""
    async with AsyncTestClient(app=create_app(env.config(""))) as client:
        settle = 2 * changes.POLL_EVERY + 0.05      # past the version's longest staleness

        async def etag() -> str:
            await asyncio.sleep(settle)
            r = await client.get("/data", params={"limit": 5})
            assert r.status_code == 200
            return r.headers["etag"]

        async def still(tag: str) -> bool:
            await asyncio.sleep(settle)
            r = await client.get("/data", params={"limit": 5}, headers={"If-None-Match": tag})
            return r.status_code == 304

        async with pool.acquire() as conn, conn.transaction():
            await write(conn, "s", {"a": "a:v1", "b": "b:v1"})
        tag = await etag()
        assert await still(tag)
        async with pool.acquire() as conn, conn.transaction():
            await write(conn, "s", {"a": "a:v1", "b": "b:v1"})      # same content
        assert await still(tag)
        async with pool.acquire() as conn, conn.transaction():
            await write(conn, "other", {"x": "x:v1"})               # not on the page
        assert not await still(tag)
        tag = await etag()
        await pool.execute("DELETE FROM normalized_data WHERE source_id = 'x'")
        assert not await still(tag)

        # A transaction that started first commits last.
        tag = await etag()
        t1, t2 = await pool.acquire(), await pool.acquire()
        try:
            tx1 = t1.transaction()
            await tx1.start()
            await write(t1, "s", {"c": "c:v1"})
            async with t2.transaction():
                await write(t2, "other", {"y": "y:v1"})
            assert not await still(tag)
            tag = await etag()
            await tx1.commit()
        finally:
            await pool.release(t1)
            await pool.release(t2)
        assert not await still(tag)



async def test_a_request_never_waits_behind_the_version_read(pool: asyncpg.Pool) -> None:
    """While the data version is being read again (here: held up by a lock), requests get
    the version they had, at once; the new one once the read is done."""
    version = changes.DataVersion(max_age=0.05, wait_after=30)
    before = await version.get(pool)
    async with pool.acquire() as writer:
        tx = writer.transaction()
        await tx.start()
        await write(writer, "s", {"a": "a:v1"})     # raises the version, holds its row
        await writer.execute("LOCK TABLE data_versions IN ACCESS EXCLUSIVE MODE")
        await asyncio.sleep(0.1)
        for _ in range(3):       # the first starts the read, which waits for the lock
            began = time.monotonic()
            assert await version.get(pool) == before
            assert time.monotonic() - began < 0.05
            await asyncio.sleep(0.05)
        await tx.commit()
    for _ in range(100):
        if await version.get(pool) != before:
            break
        await asyncio.sleep(0.02)
    assert await version.get(pool) > before
