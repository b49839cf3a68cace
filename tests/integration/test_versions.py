"""Data versioning: every version kept, reads as of a moment, the feed of every version,
and rollback to a run — under writers racing, operators' SQL and kill -9."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient

from etlsvc import db
from etlsvc.api.app import create_app
from etlsvc.runtime import pipeline, rollback, runs
from tests.conftest import Env, csv_source, run_source, shared_workers
from tests.integration.test_changes import drain, follow_while_writing, sse_events, write
from tests.integration.test_service import servers

COLUMNS = ("id", "kind", "source", "source_id", "title", "description", "category", "amount",
           "url", "tags", "event_time", "created_at", "updated_at")


async def table_at(conn: asyncpg.Connection) -> tuple[str, list[dict[str, Any]]]:
    """The whole table as this (repeatable read) transaction sees it, with its snapshot,
    in the shape GET /data answers with."""
    snap = await conn.fetchval("SELECT pg_current_snapshot()::text")
    rows = await conn.fetch(f"SELECT {', '.join(COLUMNS)}, amount::text AS amount "
                            "FROM normalized_data ORDER BY id")
    return snap, [shape(r) for r in rows]


def shape(row: Any) -> dict[str, Any]:
    """A row as JSON gives it back (times as ISO strings, amount as text)."""
    out = {}
    for name in COLUMNS:
        value = row[name]
        if isinstance(value, dt.datetime):
            value = value.isoformat().replace("+00:00", "Z")
        out[name] = value
    return out


def api_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GET /data rows with times normalized as ``shape`` writes them."""
    out = []
    for r in rows:
        r = dict(r)
        for name in ("event_time", "created_at", "updated_at"):
            if r[name] is not None:
                r[name] = dt.datetime.fromisoformat(r[name]).isoformat().replace(
                    "+00:00", "Z")
        out.append(r)
    return out


async def pages(client: Any, limit: int = 7, **params: Any) -> tuple[list[dict], set[str]]:
    """Every page of GET /data as of a moment; the rows and the as_of each page gave."""
    rows: list[dict] = []
    seen: set[str] = set()
    cursor = None
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        r = await client.get("/data", params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        rows += body["data"]
        pagination = body["metadata"]["pagination"]
        seen.add(pagination["as_of"])
        # Later pages ask with the moment the first resolved to, as a client is told to.
        params["as_of"] = pagination["as_of"]
        cursor = pagination["next_cursor"]
        if not cursor:
            return api_rows(rows), seen


async def test_a_row_updated_a_thousand_times_by_loads_and_by_sql_has_every_version(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Runs of a CSV source (every tenth change), the write path they and every kind use,
    and an operator's UPDATEs by hand take turns on one row. Its history lists all 1,001
    versions, newest first, each valid from when the one before it ended, with the run and
    raw row that wrote it (the operator's keep the lineage of the row they changed).
    Unchanged reloads write no version."""
    path = tmp_path / "s.csv"
    cfg = env.config(csv_source("s", path, fields='source_id = "id"\ntitle = "title"'))
    async with db.open_database(cfg) as database, pool.acquire() as conn:
        await write(conn, "s", {"k": "v0", "other": "x"})
        for i in range(1, 1001):
            if i % 10 == 1:           # a real run of the source, every tenth change
                path.write_text(f"id,title\nk,v{i}\n")
                run = await pipeline.run_source(database, cfg, cfg.source("s"),
                                                shared_workers())
                assert run["rows_updated"] == 1, run
            elif i % 2:
                await write(conn, "s", {"k": f"v{i}"})
                await write(conn, "s", {"k": f"v{i}"})      # unchanged: no version
            else:
                await conn.execute("UPDATE normalized_data SET title = $1 "
                                   "WHERE source_id = 'k'", f"v{i}")
    row_id = await pool.fetchval("SELECT id FROM normalized_data WHERE source_id = 'k'")
    async with AsyncTestClient(app=create_app(env.config(""))) as client:
        r = await client.get(f"/data/{row_id}/history", params={"limit": 1000})
        assert r.status_code == 200, r.text
        first = r.json()
        cursor = first["metadata"]["pagination"]["next_cursor"]
        rest = (await client.get(f"/data/{row_id}/history",
                                 params={"limit": 1000, "cursor": cursor})).json()
        assert rest["metadata"]["pagination"]["next_cursor"] is None
        versions = first["data"] + rest["data"]
        assert [v["record"]["title"] for v in versions] == [f"v{i}" for i in range(1000, -1, -1)]
        assert versions[0]["valid_to"] is None and versions[0]["ended_by"] is None
        assert all(v["ended_by"] == "update" for v in versions[1:])
        for newer, older in itertools.pairwise(versions):
            assert older["to_xid"] == newer["from_xid"]
            assert older["valid_to"] == newer["valid_from"]
            assert (dt.datetime.fromisoformat(older["valid_from"])
                    < dt.datetime.fromisoformat(older["valid_to"]))
        # Lineage: a load's version names its raw row; the operator's keeps the load's.
        raw = {(table, r["id"]): r["record"]["title"]
               for table in ("raw_api_data", "raw_csv_data") for r in await pool.fetch(
                   f"SELECT id, record FROM {table} WHERE source_key = 'k'")}
        for v in versions:
            title = v["record"]["title"]
            loaded = int(title[1:]) % 2 or title == "v0"
            expected = title if loaded else f"v{int(title[1:]) - 1}"
            lineage = v["lineage"]
            assert raw[lineage["raw_table"], lineage["raw_id"]] == expected, v
            assert lineage["raw_table"] == (
                "raw_csv_data" if int(expected[1:]) % 10 == 1 else "raw_api_data"), v
        # The other row was never changed: one version.
        other = await pool.fetchval("SELECT id FROM normalized_data WHERE source_id = 'other'")
        only = (await client.get(f"/data/{other}/history")).json()["data"]
        assert [v["record"]["title"] for v in only] == ["x"]
        assert (await client.get("/data/999999/history")).status_code == 404
    assert await pool.fetchval("SELECT count(*) FROM data_history") == 1000


async def test_reads_as_of_a_moment_with_four_writers_racing(
    env: Env, database_url: str, pool: asyncpg.Pool
) -> None:
    """Four writers insert, update and delete rows of their own sources (loads and SQL by
    hand) while a reader takes snapshots of the whole table and pages through GET /data as
    of each, in pages of 7, as writing goes on: every walk equals its snapshot exactly, with
    the filters too. As of a time, a walk equals the state each writer had after its last
    transaction stamped by then."""
    rng = random.Random(20261204)
    writers = await asyncpg.create_pool(database_url, min_size=4, max_size=4,
                                        init=db.init_connection)
    # Per writer: (stamp, {key: title}) after each of its transactions.
    states: dict[str, list[tuple[dt.datetime, dict[str, str]]]] = {}
    done = asyncio.Event()

    async def writer(w: int) -> None:
        source, live, fresh = f"w{w}", {}, 0
        states[source] = []
        async with writers.acquire() as conn:
            for step in range(40):
                async with conn.transaction():
                    items = {f"k{fresh + i}": f"{source}-{step}" for i in range(3)}
                    fresh += 3
                    for key in rng.sample(sorted(live), min(3, len(live))):
                        items[key] = f"{source}-{step}"
                    await write(conn, source, items)
                    live.update(items)
                    if len(live) > 5 and rng.random() < 0.5:
                        key = rng.choice(sorted(live))
                        await conn.execute("UPDATE normalized_data SET title = $3 WHERE "
                                           "source = $1 AND source_id = $2", source, key,
                                           f"{source}-{step}-sql")
                        live[key] = f"{source}-{step}-sql"
                    if len(live) > 5 and rng.random() < 0.4:
                        gone = rng.choice(sorted(live))
                        del live[gone]
                        await conn.execute("DELETE FROM normalized_data WHERE source = $1 "
                                           "AND source_id = $2", source, gone)
                    stamp = await conn.fetchval(
                        "SELECT at FROM data_commits WHERE xid = pg_current_xact_id()")
                    await asyncio.sleep(rng.uniform(0, 0.02))
                states[source].append((stamp, dict(live)))
                await asyncio.sleep(rng.uniform(0, 0.01))

    checked = {"snapshots": 0, "times": 0}

    async def reader(client: Any) -> None:
        while not done.is_set():
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
                snap, expected = await table_at(conn)
                moment = await conn.fetchval("SELECT clock_timestamp()")
            got, seen = await pages(client, as_of=snap)
            assert seen == {snap}
            assert got == expected
            one = [r for r in expected if r["source"] == "w1"]
            assert (await pages(client, as_of=snap, source="w1"))[0] == one
            checked["snapshots"] += 1
            # As of a time: a moment between the writers' stamps.
            got, seen = await pages(client, as_of=moment.isoformat())
            assert len(seen) == 1
            times.append((moment, got, seen))
            checked["times"] += 1
            await asyncio.sleep(0.05)

    times: list[tuple[dt.datetime, list[dict], set[str]]] = []
    env.write_config("")
    # A server of its own: a request as of a recent time waits for the writers of then to
    # commit, and in-process (AsyncTestClient) it would hold up this loop, theirs.
    with servers(env) as (server,):
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            try:
                tasks = [asyncio.create_task(writer(w)) for w in range(4)]
                read = asyncio.create_task(reader(client))
                await asyncio.gather(*tasks)
                done.set()
                await read
            finally:
                await writers.close()
            assert checked["snapshots"] >= 3 and checked["times"] >= 3
            for moment, got, seen in times:
                expected = {}
                for source, steps in states.items():
                    before = [live for stamp, live in steps if stamp <= moment]
                    for key, title in (before[-1] if before else {}).items():
                        expected[(source, key)] = title
                assert {(r["source"], r["source_id"]): r["title"] for r in got} == expected
                # And again now, long after: the same answer.
                again, resolved = await pages(client, as_of=moment.isoformat(), limit=100)
                assert again == got and resolved == seen


async def test_the_feed_of_every_version_sends_each_write_once_in_order(
    env: Env, pool: asyncpg.Pool
) -> None:
    async with AsyncTestClient(app=create_app(env.config(""))) as client:
        r = await client.get("/data/changes", params={"after": "now", "versions": "all"})
        start = r.json()["metadata"]["pagination"]["next"]
        async with pool.acquire() as conn:
            await write(conn, "s", {"a": "a1", "b": "b1"})
            await write(conn, "s", {"a": "a2"})
            await conn.execute("UPDATE normalized_data SET title = 'a3' WHERE source_id = 'a'")
            await conn.execute("DELETE FROM normalized_data WHERE source_id = 'b'")
            await write(conn, "s", {"a": "a4"})
        every, _ = await drain(client, start, versions="all")
        assert [(c["op"], c["source_id"], c["record"] and c["record"]["title"])
                for c in every] == [
            ("insert", "a", "a1"), ("insert", "b", "b1"), ("update", "a", "a2"),
            ("update", "a", "a3"), ("delete", "b", None), ("update", "a", "a4")]
        latest, _ = await drain(client, start)
        assert [(c["op"], c["source_id"]) for c in latest] == [("delete", "b"),
                                                               ("update", "a")]
        # In pages of one, the same.
        paged, after = [], start
        for _ in range(20):
            r = await client.get("/data/changes", params={"after": after, "limit": 1,
                                                          "versions": "all"})
            page = r.json()
            if not page["data"]:
                break
            paged += page["data"]
            after = page["metadata"]["pagination"]["next"]
        assert paged == every
    # The stream of every version, resumed from the middle with Last-Event-ID.
    env.write_config("")
    with servers(env) as (server,), httpx.stream(
            "GET", f"{server.base}/data/changes/stream", params={"versions": "all"},
            headers={"Last-Event-ID": every[2]["token"]}, timeout=10) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines(), 3)
    assert [e["id"] for e in events] == [c["token"] for c in every[3:]]
    assert [e["data"] for e in events] == every[3:]


LINEAGE = ("id", "source_id", "title", "description", "category", "amount", "url", "tags",
           "event_time", "raw_table", "raw_id", "run_id", "source_version")


async def source_state(pool: asyncpg.Pool, source: str) -> dict[int, tuple]:
    """The source's rows: content and lineage, by id."""
    return {r["id"]: tuple(r) for r in await pool.fetch(
        f"SELECT {', '.join(LINEAGE)} FROM normalized_data WHERE source = $1", source)}


async def checkpoints(pool: asyncpg.Pool, source: str) -> dict[str, Any]:
    return {r["stream"]: (r["state"], r["run_id"]) for r in await pool.fetch(
        "SELECT stream, state, run_id FROM etl_checkpoints WHERE source = $1", source)}


def rows_csv(rows: dict[int, str]) -> str:
    return "id,title\n" + "".join(f"{k},{t}\n" for k, t in sorted(rows.items()))


async def test_rollback_to_a_run_after_three_more_restores_rows_feed_and_position(
    env: Env, pool: asyncpg.Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run N loads ten rows; N+1 changes three (and an operator fixes one by hand), N+2 adds
    four, N+3 deletes three. A dry run counts and changes nothing; the rollback to N makes
    the table equal to its state after N (content and lineage, deleted rows back with their
    ids), the feed tells consumers exactly those changes, and the checkpoints go back."""
    monkeypatch.setenv("ETLSVC_API_KEYS", "ops:admin:admin-key,reader:run:run-key")
    admin = {"Authorization": "Bearer admin-key"}
    path = tmp_path / "p.csv"
    rows = {i: f"t{i}" for i in range(1, 11)}
    path.write_text(rows_csv(rows))
    cfg = env.config(csv_source("p", path, fields='source_id = "id"\ntitle = "title"',
                                extra='deletes = "detect"'))
    n = await run_source(cfg, "p")
    assert n["status"] == "succeeded" and n["rows_inserted"] == 10
    after_n, position_n = await source_state(pool, "p"), await checkpoints(pool, "p")

    rows.update({2: "changed", 3: "changed", 4: "changed"})
    path.write_text(rows_csv(rows))
    assert (await run_source(cfg, "p"))["rows_updated"] == 3
    await pool.execute("UPDATE normalized_data SET title = 'by hand' WHERE source_id = '5'")
    rows.update({i: f"new{i}" for i in range(11, 15)})
    path.write_text(rows_csv(rows))
    assert (await run_source(cfg, "p"))["rows_inserted"] == 4
    for gone in (1, 3, 12):
        del rows[gone]
    path.write_text(rows_csv(rows))
    n3 = await run_source(cfg, "p")
    assert n3["status"] == "succeeded" and n3["rows_deleted"] == 3, n3
    after_n3 = await source_state(pool, "p")

    dry = env.cli("rollback", "p", "--to-run", str(n["id"]), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    # Deleted: 11, 13, 14; updated: 2, 4, 5 (by hand); inserted again: 1, 3.
    assert "would delete 3 row(s), update 3 and insert 2 again" in dry.stderr
    assert await source_state(pool, "p") == after_n3

    async with AsyncTestClient(app=create_app(cfg)) as client:
        # "now" is the oldest transaction still running anywhere in the cluster: wait
        # until that is past N+3's commit (another test's transaction can hold it back), so
        # the feed from "now" holds only the rollback's changes.
        mark = await pool.fetchval("SELECT pg_current_xact_id()")
        deadline = time.monotonic() + 60
        while await pool.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot()) <= $1::xid8",
                                  mark):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        token = (await client.get("/data/changes", params={"after": "now"})).json()[
            "metadata"]["pagination"]["next"]
        body = {"source": "p", "to_run": n["id"]}
        refused = await client.post("/etl/rollback", json=body,
                                    headers={"Authorization": "Bearer run-key"})
        assert refused.status_code == 403
        # Refused while the source runs (its lock is held).
        async with pool.acquire() as conn:
            assert await runs.try_lock(conn, "p")
            busy = await client.post("/etl/rollback", json=body, headers=admin)
            await runs.unlock(conn, "p")
        assert busy.status_code == 409, busy.text
        r = await client.post("/etl/rollback", json=body, headers=admin)
        assert r.status_code == 200, r.text
        done = r.json()["data"]
        assert (done["deleted"], done["updated"], done["inserted"]) == (3, 3, 2)
        assert done["run"]["trigger"] == "rollback" and done["run"]["status"] == "succeeded"
        assert await source_state(pool, "p") == after_n
        assert await checkpoints(pool, "p") == position_n
        feed, _ = await drain(client, token)
        ids = {r[1]: i for i, r in after_n3.items()} | {r[1]: i for i, r in after_n.items()}
        assert sorted((c["op"], c["source_id"]) for c in feed) == sorted(
            [("delete", "11"), ("delete", "13"), ("delete", "14"), ("update", "2"),
             ("update", "4"), ("update", "5"), ("insert", "1"), ("insert", "3")])
        assert all(c["id"] == ids[c["source_id"]] for c in feed)
        assert {c["source_id"]: c["record"]["title"] for c in feed if c["record"]} == {
            "1": "t1", "2": "t2", "3": "t3", "4": "t4", "5": "t5"}
        # Histories: 1 was deleted by N+3 and is back; 2 was changed by N+1 and back. Read
        # whole and one version a page, the same.
        for source_id, expected in (
                ("1", [("t1", None), ("t1", "delete")]),
                ("2", [("t2", None), ("changed", "update"), ("t2", "update")])):
            whole = (await client.get(f"/data/{ids[source_id]}/history")).json()["data"]
            assert [(v["record"]["title"], v["ended_by"]) for v in whole] == expected
            paged, cursor = [], None
            while True:
                page = (await client.get(f"/data/{ids[source_id]}/history", params={
                    "limit": 1, **({"cursor": cursor} if cursor else {})})).json()
                paged += page["data"]
                if not (cursor := page["metadata"]["pagination"]["next_cursor"]):
                    break
            assert paged == whole
            for newer, older in itertools.pairwise(whole):
                # Updated: the newer began as the older ended; deleted: later.
                assert (older["to_xid"] == newer["from_xid"]) == (
                    older["ended_by"] == "update")
                assert dt.datetime.fromisoformat(older["valid_to"]) <= \
                    dt.datetime.fromisoformat(newer["valid_from"])
                assert all(v["valid_from"] for v in whole)

        # The next run reads the file (whole, as ever): N+3's rows are back.
        again = await run_source(cfg, "p")
        assert again["status"] == "succeeded", again["error"]
        assert {r[1]: r[2] for r in (await source_state(pool, "p")).values()} == {
            str(k): t for k, t in rows.items()}
        # What cannot be: an unknown run, another source's run, a run still running.
        for bad, code in (({"source": "p", "to_run": 999}, "no_run"),
                          ({"source": "nope", "to_run": n["id"]}, "unknown_source")):
            r = await client.post("/etl/rollback", json=bad, headers=admin)
            assert r.json()["error"]["code"] == code, r.text


async def test_a_rollback_killed_mid_way_changes_nothing_and_runs_again_whole(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """kill -9 of `etlsvc rollback` while its transaction is under way: the table is what it
    was, whole; the rollback started again finishes and the table is the run's state."""
    path = tmp_path / "big.csv"
    path.write_text("id,title\n" + "".join(f"{i},v1-{i}\n" for i in range(60_000)))
    cfg = env.config(csv_source("big", path, fields='source_id = "id"\ntitle = "title"'))
    n = await run_source(cfg, "big")
    assert n["status"] == "succeeded", n["error"]
    after_n = await source_state(pool, "big")
    path.write_text("id,title\n" + "".join(f"{i},v2-{i}\n" for i in range(60_000)))
    assert (await run_source(cfg, "big", full_refresh=True))["rows_updated"] == 60_000
    before = await source_state(pool, "big")

    proc = subprocess.Popen(
        [sys.executable, "-m", "etlsvc", "rollback", "big", "--to-run", str(n["id"]),
         "--config", str(env.dir / "config.toml")],
        env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Killed once the transaction has written (the history of the updated rows).
        deadline = time.monotonic() + 60
        while not await pool.fetchval(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE "
                "'%UPDATE normalized_data n SET%' AND state = 'active' "
                "AND pid <> pg_backend_pid()"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # The server notices the client is gone and rolls the transaction back.
    deadline = time.monotonic() + 30
    while await pool.fetchval("SELECT count(*) FROM pg_stat_activity "
                              "WHERE query LIKE '%normalized_data n SET%' "
                              "AND pid <> pg_backend_pid()"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await source_state(pool, "big") == before
    assert await pool.fetchval("SELECT status FROM etl_runs WHERE trigger = 'rollback'") \
        == "running"      # until the next run of the source (or the sweep) sees it is gone

    result = env.cli("rollback", "big", "--to-run", str(n["id"]))
    assert result.returncode == 0, result.stderr
    assert "60,000 updated" in result.stderr
    assert await source_state(pool, "big") == after_n
    assert [r["status"] for r in await pool.fetch(
        "SELECT status FROM etl_runs WHERE trigger = 'rollback' ORDER BY id")] == [
        "interrupted", "succeeded"]


async def test_a_rollback_moves_the_position_back_unless_told_to_keep_it(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """An append-only file: run N reads ten lines, N+1 the five appended after them (two
    updates, three new keys). Rolled back to N, the offset goes back with the rows and the
    next run reads the five lines again; rolled back keeping the position, it reads
    nothing, and the table stays as it was after N."""
    path = tmp_path / "a.csv"
    path.write_text(rows_csv({i: f"t{i}" for i in range(1, 11)}))
    cfg = env.config(csv_source("a", path, fields='source_id = "id"\ntitle = "title"'))
    n = await run_source(cfg, "a")
    after_n, position_n = await source_state(pool, "a"), await checkpoints(pool, "a")
    with path.open("a") as f:
        f.write("".join(f"{k},{t}\n" for k, t in
                        [(3, "late"), (5, "late"), (11, "x"), (12, "x"), (13, "x")]))
    n1 = await run_source(cfg, "a")
    assert (n1["rows_read"], n1["rows_updated"], n1["rows_inserted"]) == (5, 2, 3)
    after_n1 = await source_state(pool, "a")
    async with db.open_database(cfg) as database:
        done = await rollback.rollback(database, cfg.source("a"), n["id"])
        assert done["checkpoints"] == 1 and await checkpoints(pool, "a") == position_n
        assert await source_state(pool, "a") == after_n
        again = await run_source(cfg, "a")
        assert again["rows_read"] == 5
        assert {r[1]: r[2] for r in (await source_state(pool, "a")).values()} == {
            r[1]: r[2] for r in after_n1.values()}
        position_end = await checkpoints(pool, "a")
        await rollback.rollback(database, cfg.source("a"), n["id"], keep_position=True)
        assert await checkpoints(pool, "a") == position_end
        assert (await run_source(cfg, "a"))["rows_read"] == 0
        assert await source_state(pool, "a") == after_n


async def test_history_days_purges_old_versions_and_zero_keeps_none(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A source with history_days = 1 loses the versions replaced more than a day ago to
    `etlsvc purge`, and a read as of a moment that needed them answers 410 with the oldest
    moment there is; a source with history_days = 0 keeps no version, is left out of reads
    as of a moment, and named in one answers 410."""
    kept, off = tmp_path / "kept.csv", tmp_path / "off.csv"
    kept.write_text(rows_csv({1: "a", 2: "b"}))
    off.write_text(rows_csv({1: "a", 2: "b"}))
    fields = 'source_id = "id"\ntitle = "title"'
    cfg = env.config(csv_source("kept", kept, fields=fields, extra="history_days = 1") +
                     csv_source("off", off, fields=fields, extra="history_days = 0"))
    for name in ("kept", "off"):
        assert (await run_source(cfg, name))["status"] == "succeeded"
    before = await pool.fetchval("SELECT pg_current_snapshot()::text")
    kept.write_text(rows_csv({1: "a2", 2: "b2"}))
    off.write_text(rows_csv({1: "a2", 2: "b2"}))
    for name in ("kept", "off"):
        assert (await run_source(cfg, name))["rows_updated"] == 2
    assert await pool.fetchval("SELECT array_agg(DISTINCT source) FROM data_history") == [
        "kept"]
    async with AsyncTestClient(app=create_app(cfg)) as client:
        then = (await client.get("/data", params={"as_of": before})).json()["data"]
        assert [(r["source"], r["title"]) for r in then] == [("kept", "a"), ("kept", "b")]
        r = await client.get("/data", params={"as_of": before, "source": "off"})
        assert r.status_code == 410 and r.json()["error"]["code"] == "no_history"
        # A day and a half later, for the versions: purged.
        await pool.execute("UPDATE data_history SET ended_at = ended_at - interval '36 hours'")
        result = env.cli("purge")
        assert result.returncode == 0, result.stderr
        assert "kept: 2 replaced version(s) purged" in result.stderr
        assert await pool.fetchval("SELECT count(*) FROM data_history") == 0
        gone = await client.get("/data", params={"as_of": before})
        assert gone.status_code == 410, gone.text
        error = gone.json()["error"]
        assert error["code"] == "as_of_expired"
        oldest = dt.datetime.fromisoformat(error["oldest"])
        assert abs((dt.datetime.now(dt.UTC) - oldest) - dt.timedelta(days=1)) < \
            dt.timedelta(minutes=5)
        one = await pool.fetchval("SELECT id FROM normalized_data WHERE source = 'kept' "
                                  "AND source_id = '1'")
        assert (await client.get(f"/data/{one}", params={"as_of": before})).status_code == 410
        # A moment after the purge reads today's rows. Its snapshot must see the purged
        # versions' replacing transaction as ended by all: on a shared cluster another
        # test's transaction that was open before it holds the snapshot's xmin back, and
        # the moment is, rightly, taken as possibly needing them (410).
        purged = int(await pool.fetchval(
            "SELECT purged_xid::text FROM data_history_settings WHERE source = 'kept'"))
        deadline = time.monotonic() + 60
        while int((now := await pool.fetchval("SELECT pg_current_snapshot()::text"))
                  .split(":")[0]) < purged and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        page = await client.get("/data", params={"as_of": now})
        assert page.status_code == 200, page.text
        current = page.json()["data"]
        assert [(r["source"], r["title"]) for r in current] == [("kept", "a2"), ("kept", "b2")]
        # A page as of a moment never changes: its ETag answers 304 after later writes too.
        kept.write_text(rows_csv({1: "a3", 2: "b3"}))
        assert (await run_source(cfg, "kept"))["rows_updated"] == 2
        same = await client.get("/data", params={"as_of": now},
                                headers={"If-None-Match": page.headers["etag"]})
        assert same.status_code == 304
        for bad in ("yesterday", "5:3:", "9-", "2999-01-01T00:00:00Z"):
            r = await client.get("/data", params={"as_of": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_as_of", bad


async def test_the_feed_of_every_version_under_four_racing_writers_skips_and_repeats_none(
    env: Env, database_url: str, pool: asyncpg.Pool
) -> None:
    """Four writers update and delete rows of their own sources in transactions that commit
    out of order, while a consumer follows GET /data/changes?versions=all of a real server
    in pages of 7. Every version a transaction left is delivered once, each row's in the
    order written, its delete last; a version a transaction wrote and replaced itself was
    never seen, and is not sent."""
    rng = random.Random(20261204)
    writers = await asyncpg.create_pool(database_url, min_size=4, max_size=4,
                                        init=db.init_connection)
    expected: dict[tuple[str, str], list[str]] = {}
    committed: list[int] = []

    async def writer(w: int) -> None:
        source, live, fresh = f"w{w}", set(), 0
        async with writers.acquire() as conn:
            for step in range(30):
                wrote: dict[str, str] = {}
                async with conn.transaction():
                    xid = await conn.fetchval("SELECT pg_current_xact_id()")
                    keys = [f"k{fresh + i}" for i in range(2)] + rng.sample(
                        sorted(live), min(2, len(live)))
                    fresh += 2
                    wrote = {k: f"{step}" for k in keys}
                    await write(conn, source, wrote)
                    live.update(keys)
                    if rng.random() < 0.5:      # and by hand, in the same transaction
                        key = rng.choice(sorted(live))
                        await conn.execute("UPDATE normalized_data SET title = $3 WHERE "
                                           "source = $1 AND source_id = $2", source, key,
                                           f"{step}-sql")
                        wrote[key] = f"{step}-sql"
                    gone = None
                    if len(live) > 4 and rng.random() < 0.4:
                        gone = rng.choice(sorted(live))
                        live.discard(gone)
                        await conn.execute("DELETE FROM normalized_data WHERE source = $1 "
                                           "AND source_id = $2", source, gone)
                    await asyncio.sleep(rng.uniform(0, 0.02))
                committed.append(xid)
                for key, title in wrote.items():
                    if key != gone:             # a version its own transaction replaced
                        expected.setdefault((source, key), []).append(title)
                if gone:
                    expected.setdefault((source, gone), []).append("deleted")
                await asyncio.sleep(rng.uniform(0, 0.01))

    delivered = await follow_while_writing(env, writer, writers, committed, rng,
                                           versions="all")
    assert committed != sorted(committed)       # commits did land out of xid order
    tokens = [tuple(map(int, c["token"].split(".")[0].split("-"))) for c in delivered]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    got: dict[tuple[str, str], list[str]] = {}
    for c in delivered:
        got.setdefault((c["source"], c["source_id"]), []).append(
            "deleted" if c["op"] == "delete" else c["record"]["title"])
    assert got == expected


async def test_four_sources_loading_while_a_reader_pages_as_of_fixed_moments(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Four CSV sources load run after run (rows changed, added and, with deletes =
    "detect", deleted) while a reader takes REPEATABLE READ snapshots and pages through a
    real server's GET /data as of each, in pages of 9: every walk equals its snapshot."""
    rng = random.Random(24)
    fields = 'source_id = "id"\ntitle = "title"'
    paths = {f"s{i}": tmp_path / f"s{i}.csv" for i in range(4)}
    for path in paths.values():
        path.write_text(rows_csv({k: "v0" for k in range(300)}))
    sources = "".join(csv_source(name, path, fields=fields,
                                 extra='deletes = "detect"\nbatch_size = 40')
                      for name, path in paths.items())
    env.write_config(sources)      # for the server
    cfg = env.config(sources)
    done = asyncio.Event()
    walks = during = 0

    async def loader(name: str) -> None:
        rows = {k: "v0" for k in range(300)}
        for run in range(1, 7):
            assert (await run_source(cfg, name))["status"] == "succeeded"
            for k in rng.sample(sorted(rows), 40):
                rows[k] = f"v{run}"
            for k in rng.sample(sorted(rows), 10):
                del rows[k]
            rows.update({1000 * run + i: f"v{run}" for i in range(15)})
            paths[name].write_text(rows_csv(rows))

    async def reader(client: httpx.AsyncClient) -> None:
        nonlocal walks, during
        while not done.is_set() or walks < 3:
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
                snap, expected = await table_at(conn)
            got, seen = await pages(client, limit=9, as_of=snap)
            assert seen == {snap} and got == expected
            walks += 1
            during += not done.is_set()

    with servers(env) as (server,):
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            read = asyncio.create_task(reader(client))
            try:
                await asyncio.gather(*(loader(name) for name in paths))
            finally:
                done.set()
            await read
    assert during >= 3, "the reader walked too little while the sources loaded"
    assert await pool.fetchval("SELECT count(*) FROM data_history") > 0
