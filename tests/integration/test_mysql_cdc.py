"""Kind mysql_cdc: a MariaDB server of the tests' own with the binlog on (row-based, with
column names), its changes read from the binlog: snapshot then stream, deletes, key
changes, TRUNCATE, values alike from both paths, schema changes, exactly once under
kill -9, a server restarted mid-stream, a purged binlog, and clear errors for a server
not set up for it."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from tests.clusters import MARIADBD, MariaDB, scratch_dir
from tests.conftest import Env, run_source
from tests.integration.test_pg_cdc import cdc_source as pg_cdc_source
from tests.integration.test_pg_cdc import normalized, run_killed_twice
from tests.integration.test_service import free_port

pytestmark = pytest.mark.skipif(MARIADBD is None, reason="no mariadbd (apt-get install "
                                                         "mariadb-server)")


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDB]:
    """A MariaDB server with the binlog on, for every test of this module."""
    with scratch_dir() as folder:
        server = MariaDB(folder, free_port())
        try:
            yield server
        finally:
            server.stop()


class Upstream:
    """A fresh database on the test's MariaDB: the source of one test."""

    def __init__(self, server: MariaDB, name: str) -> None:
        self.server = server
        self.name = name
        self.url = f"{server.url}/{name}"

    async def connect(self, database: str | None = None) -> Any:
        import asyncmy

        return await asyncmy.connect(host="127.0.0.1", port=self.server.port, user="root",
                                     database=database or self.name, autocommit=True)

    async def execute(self, *statements: str) -> None:
        conn = await self.connect()
        try:
            async with conn.cursor() as cur:
                for sql in statements:
                    await cur.execute(sql)
        finally:
            conn.close()

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        conn = await self.connect()
        try:
            async with conn.cursor() as cur:
                await cur.execute("SET time_zone = '+00:00'")
                await cur.execute(sql)
                return list(await cur.fetchall())
        finally:
            conn.close()


@pytest.fixture
async def upstream(mariadb: MariaDB, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Upstream]:
    name = f"up_{uuid.uuid4().hex[:8]}"
    up = Upstream(mariadb, name)
    conn = await up.connect("mysql")
    async with conn.cursor() as cur:
        await cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    monkeypatch.setenv("CDC_URL", up.url)
    try:
        yield up
    finally:
        conn = await up.connect("mysql")
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.close()


def cdc_source(name: str, extra: str = "", tables: str = '["items"]',
               fields: str = 'source_id = "id"\ntitle = "name"\namount = "amount"') -> str:
    return pg_cdc_source(name, extra, tables, fields, kind="mysql_cdc")


ITEMS = ("CREATE TABLE items (id bigint PRIMARY KEY, name varchar(200), amount decimal(12,2), "
         "at datetime(3), ts timestamp NULL, doc json, b blob, f float, s set('a','b','c'))")


async def upstream_rows(up: Upstream, table: str = "items") -> dict[str, tuple[Any, ...]]:
    return {str(r[0]): (r[1], r[2]) for r in await up.fetch(
        f"SELECT id, name, amount FROM {table}")}


async def test_snapshot_then_stream_with_writes_during_the_snapshot(
        env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    up = upstream
    await up.execute(ITEMS)
    values = ", ".join(f"({i}, 'item {i}', {i})" for i in range(1, 20_001))
    await up.execute(f"INSERT INTO items (id, name, amount) VALUES {values}")
    cfg = env.config(cdc_source("cdc"))
    rng = random.Random(7)
    started = asyncio.Event()

    async def writer() -> int:
        conn = await up.connect()
        done = 0
        try:
            async with conn.cursor() as cur:
                started.set()
                for n in range(300):
                    await cur.execute("BEGIN")
                    for _ in range(rng.randint(1, 10)):
                        key, what = rng.randint(1, 25_000), rng.random()
                        if what < 0.2:
                            await cur.execute("DELETE FROM items WHERE id = %s", (key,))
                        elif what < 0.6:
                            await cur.execute("UPDATE items SET name = %s, amount = amount + 1 "
                                              "WHERE id = %s", (f"changed {n}", key))
                        else:
                            await cur.execute(
                                "INSERT INTO items (id, name, amount) VALUES (%s, %s, %s) "
                                "ON DUPLICATE KEY UPDATE name = VALUES(name)",
                                (key, f"new {n}", key))
                        done += 1
                    await cur.execute("COMMIT")
                    await asyncio.sleep(0.002)
        finally:
            conn.close()
        return done

    task = asyncio.create_task(writer())
    await started.wait()
    first = await run_source(cfg, "cdc")
    assert first["status"] == "succeeded", first["error"]
    assert await task > 500
    second = await run_source(cfg, "cdc")
    assert second["status"] == "succeeded", second["error"]
    assert await normalized(pool, "cdc") == await upstream_rows(up)
    # Every streamed change once: no (file, position, seq) twice.
    assert await pool.fetchval(
        "SELECT count(*) = count(DISTINCT (binlog_file, binlog_pos, seq)) "
        "FROM raw_mysql_cdc_data WHERE snapshot = 0")
    assert await pool.fetchval(
        "SELECT count(*) FROM raw_mysql_cdc_data WHERE snapshot = 0") > 0


async def test_values_deletes_key_changes_truncate_and_a_snapshot_like_the_stream(
        env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    up = upstream
    await up.execute(ITEMS, "CREATE TABLE other (id bigint PRIMARY KEY, name text)")
    row = ("'één', 1.50, '2024-05-01 12:00:00.123', '2024-05-01 12:00:00', "
           "'{\"a\": [1, 2.50]}', x'00ff', 1.1, 'c,a'")
    await up.execute(f"INSERT INTO items VALUES (1, {row})",
                     "INSERT INTO items (id, name, amount) VALUES (2, 'two', 2), (3, 'three', 3)")
    cfg = env.config(cdc_source("cdc", fields='source_id = "id"\ntitle = "name"\n'
                                              'amount = "amount"'))
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    await up.execute(f"INSERT INTO items VALUES (4, {row})",                  # streamed
                     "UPDATE items SET name = 'renamed' WHERE id = 2",
                     "DELETE FROM items WHERE id = 3",
                     "UPDATE items SET id = 30 WHERE id = 1",                # a key change
                     "INSERT INTO other VALUES (1, 'not captured')")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "succeeded", run["error"]
    assert run["rows_deleted"] == 2
    assert await normalized(pool, "cdc") == {"2": ("renamed", Decimal(2)),
                                             "4": ("één", Decimal("1.50")),
                                             "30": ("één", Decimal("1.50"))}
    # The snapshot's record of row 1 and the stream's of row 4 are the same but for the key.
    records = {r["k"]: r["record"] for r in await pool.fetch(
        "SELECT DISTINCT ON (source_key) source_key AS k, record::text AS record "
        "FROM raw_mysql_cdc_data WHERE source_key IN ('1', '4') ORDER BY source_key, id")}
    assert records["1"].replace('"id": 1', '"id": 4') == records["4"]
    assert '"s": "a,c"' in records["4"] and '"f": 1.1' in records["4"]
    assert '"ts": "2024-05-01T12:00:00"' in records["4"]
    # The deletes are in the change feed as tombstones: the deleted key and the old one.
    assert {r["source_id"] for r in await pool.fetch(
        "SELECT source_id FROM data_tombstones WHERE source = 'cdc'")} == {"1", "3"}
    # TRUNCATE: the table's rows leave; a row inserted after it in the stream stays.
    await up.execute("TRUNCATE TABLE items", "INSERT INTO items (id, name, amount) "
                     "VALUES (7, 'after', 7)")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "succeeded", run["error"]
    assert await normalized(pool, "cdc") == {"7": ("after", Decimal(7))}


async def test_schema_changes_go_through_the_drift_policy(
        env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    up = upstream
    await up.execute(ITEMS, "INSERT INTO items (id, name, amount) VALUES (1, 'one', 1)")
    cfg = env.config(cdc_source("cdc", 'schema_drift = "freeze"'))
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    await up.execute("ALTER TABLE items ADD COLUMN color text",
                     "INSERT INTO items (id, name, amount, color) VALUES (2, 'two', 2, 'red')")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed"
    assert "schema drift" in run["error"] and "color" in run["error"]
    assert set(await normalized(pool, "cdc")) == {"1"}       # nothing of it loaded
    run = await run_source(env.config(cdc_source("cdc", 'schema_drift = "evolve"')), "cdc")
    assert run["status"] == "succeeded", run["error"]
    assert set(await normalized(pool, "cdc")) == {"1", "2"}
    assert {c["column"] for c in run["notes"]["drift"]} == {"color"}


async def test_a_server_not_set_up_for_it_and_a_table_without_a_key_are_clear_errors(
        env: Env, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    await upstream.execute("CREATE TABLE items (id bigint, name text, amount int)")
    cfg = env.config(cdc_source("cdc"))
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed" and "has no primary key" in run["error"]
    await upstream.execute("ALTER TABLE items ADD PRIMARY KEY (name(20))")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed"
    assert "fields.source_id ('id') is not in its primary key (name)" in run["error"]
    await upstream.execute("SET GLOBAL binlog_row_metadata = MINIMAL")
    try:
        run = await run_source(cfg, "cdc")
    finally:
        await upstream.execute("SET GLOBAL binlog_row_metadata = FULL")
    assert run["status"] == "failed"
    assert "binlog_row_metadata is MINIMAL" in run["error"]
    # The machine's shared MariaDB has no binary log.
    monkeypatch.setenv("CDC_URL", "mysql://root@127.0.0.1:3306/mysql")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed"
    assert ("binary log is off" in run["error"] or "cannot connect" in run["error"])


async def test_a_purged_binlog_stops_the_source_until_reset(
        env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    up = upstream
    await up.execute(ITEMS, "INSERT INTO items (id, name, amount) VALUES (1, 'a', 1), "
                     "(2, 'b', 2), (3, 'c', 3)")
    env.write_config(cdc_source("cdc"))
    cfg = env.config(cdc_source("cdc"))
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    await up.execute("DELETE FROM items WHERE id = 1", "FLUSH BINARY LOGS")
    (current,) = (await up.fetch("SHOW MASTER STATUS"))[0][:1]
    for _ in range(100):        # the server keeps a file until its binlog checkpoint moves on
        await up.execute(f"PURGE BINARY LOGS TO '{current}'")     # the delete goes with it
        if len(await up.fetch("SHOW BINARY LOGS")) == 1:
            break
        await asyncio.sleep(0.1)
    await up.execute("UPDATE items SET name = 'later' WHERE id = 2")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed"
    assert "is not on the server any more" in run["error"]
    assert "etlsvc cdc reset cdc" in run["error"]
    assert set(await normalized(pool, "cdc")) == {"1", "2", "3"}     # nothing skipped silently
    ran = env.cli("cdc", "reset", "cdc", CDC_URL=up.url)
    assert ran.returncode == 0, ran.stderr
    assert "checkpoint(s) forgotten" in ran.stderr
    run = await run_source(cfg, "cdc")
    assert run["status"] == "succeeded", run["error"]
    assert await normalized(pool, "cdc") == await upstream_rows(up)    # 1 swept away


TOTAL = 1_000_000


async def test_kill9_during_a_stream_exactly_once_and_whole(
        env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    """Transfers between accounts in transactions of 1–50 rows (with inserts and deletes
    that keep the total): a reader polling normalized_data meanwhile always sees the same
    total; etlsvc is killed twice mid-stream and catches up after."""
    up = upstream
    await up.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, name text, amount bigint)")
    values = ", ".join(f"({i}, 'acct', 1000)" for i in range(1, 1001))
    await up.execute(f"INSERT INTO accounts VALUES {values}")
    env.write_config(cdc_source("cdc", tables='["accounts"]'))
    ran = env.cli("run", "cdc", CDC_URL=up.url)
    assert ran.returncode == 0, ran.stderr
    rng = random.Random(23)
    ids, next_id, changes = list(range(1, 1001)), 1001, 0

    async def writer() -> None:
        nonlocal next_id, changes
        conn = await up.connect()
        try:
            async with conn.cursor() as cur:
                while changes < 30_000:
                    rows, moved = rng.randint(1, 50), 0
                    sink = rng.choice(ids)
                    await cur.execute("BEGIN")
                    for _ in range(rows - 1):
                        what, acct = rng.random(), rng.choice(ids)
                        if acct == sink:
                            continue
                        if what < 0.05 and len(ids) > 100:
                            ids.remove(acct)
                            await cur.execute("SELECT amount FROM accounts WHERE id = %s",
                                              (acct,))
                            moved += (await cur.fetchone())[0]
                            await cur.execute("DELETE FROM accounts WHERE id = %s", (acct,))
                        elif what < 0.1:
                            await cur.execute("INSERT INTO accounts VALUES (%s, 'new', 0)",
                                              (next_id,))
                            ids.append(next_id)
                            next_id += 1
                        else:
                            await cur.execute("UPDATE accounts SET amount = amount - 1 "
                                              "WHERE id = %s", (acct,))
                            moved += 1
                    await cur.execute("UPDATE accounts SET amount = amount + %s WHERE id = %s",
                                      (moved, sink))
                    await cur.execute("COMMIT")
                    changes += rows
        finally:
            conn.close()

    seen: list[int] = []

    async def reader() -> None:
        while True:
            seen.append(await pool.fetchval(
                "SELECT sum(amount) FROM normalized_data WHERE source = 'cdc'"))
            await asyncio.sleep(0.01)

    writing = asyncio.create_task(writer())
    reading = asyncio.create_task(reader())
    try:
        kills = await run_killed_twice(env, pool, "raw_mysql_cdc_data", up.url, writing)
    finally:
        reading.cancel()
        writing.cancel()
    assert kills == 2
    assert len(seen) > 50 and set(seen) == {TOTAL}, sorted(set(seen))[:10]
    source = {str(r[0]): (r[1], r[2]) for r in await up.fetch(
        "SELECT id, name, amount FROM accounts")}
    assert await normalized(pool, "cdc") == {k: (n, Decimal(a)) for k, (n, a) in source.items()}
    assert await pool.fetchval(
        "SELECT count(*) = count(DISTINCT (binlog_file, binlog_pos, seq)) "
        "FROM raw_mysql_cdc_data WHERE snapshot = 0")


async def test_a_server_restarted_mid_stream_is_followed(
        env: Env, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MariaDB of this test's own, stopped and started while a run streams from it."""
    with scratch_dir() as folder:
        own = MariaDB(folder, free_port())
        try:
            up = Upstream(own, "shop")
            conn = await up.connect("mysql")
            async with conn.cursor() as cur:
                await cur.execute("CREATE DATABASE shop")
            conn.close()
            monkeypatch.setenv("CDC_URL", up.url)
            await up.execute("CREATE TABLE items (id bigint PRIMARY KEY, name text, "
                             "amount int)", "INSERT INTO items VALUES (1, 'item', 1)")
            cfg = env.config(cdc_source("cdc", "reconnect_timeout_s = 30"))
            assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
            for k in range(40):
                values = ", ".join(f"({i}, 'more', {i})" for i in range(2 + 500 * k,
                                                                          502 + 500 * k))
                await up.execute(f"INSERT INTO items VALUES {values}",
                                 f"UPDATE items SET name = 'u{k}' WHERE id = {k + 1}")
            running = asyncio.create_task(run_source(cfg, "cdc"))
            while not await pool.fetchval("SELECT count(*) FROM raw_mysql_cdc_data "
                                          "WHERE snapshot = 0"):
                await asyncio.sleep(0.01)
            stopped_at = dt.datetime.now(dt.UTC)
            await asyncio.to_thread(own.stop)
            await asyncio.sleep(1)
            await asyncio.to_thread(own.start)
            run = await running
            assert run["status"] == "succeeded", run["error"]
            assert run["finished_at"] > stopped_at          # it was streaming across it
            assert await normalized(pool, "cdc") == {
                k: (n, Decimal(a)) for k, (n, a) in (await upstream_rows(up)).items()}
        finally:
            own.stop()


async def test_a_backfill_of_a_key_range_never_undoes_a_newer_live_change(
        env: Env, pool: asyncpg.Pool, upstream: Upstream) -> None:
    from tests.integration.test_backfill import assert_backfill_left_alone, backfill_held_while

    up, n = upstream, 20_000
    await up.execute(ITEMS)
    values = ", ".join(f"({i}, 'item {i}', {i})" for i in range(1, n + 1))
    await up.execute(f"INSERT INTO items (id, name, amount) VALUES {values}")
    cfg = env.config(cdc_source("my").replace("batch_size = 500", "batch_size = 1000"))
    assert (await run_source(cfg, "my"))["status"] == "succeeded"
    await pool.execute("UPDATE normalized_data SET title = 'damaged' "
                       "WHERE source = 'my' AND source_id::int BETWEEN 15000 AND 15004")
    binlog = "SELECT state FROM etl_checkpoints WHERE source = 'my' AND stream = 'binlog'"
    positions: list[Any] = []

    async def meanwhile() -> dict[str, Any]:
        await up.execute(f"UPDATE items SET name = 'newer' WHERE id = {n - 1}",
                         f"DELETE FROM items WHERE id = {n}")
        ran = await run_source(cfg, "my")
        positions.append(await pool.fetchval(binlog))
        return ran

    live, row = await backfill_held_while(pool, cfg, "my", f"{up.name}.items", meanwhile,
                                          start="1", end=str(n))
    assert (live["rows_updated"], live["rows_deleted"]) == (1, 1), live
    assert row["status"] == "succeeded", row["error"]
    await assert_backfill_left_alone(cfg, pool, "raw_mysql_cdc_data", str(n - 1), str(n))
    items = await normalized(pool, "my")
    assert len(items) == n - 1 and all(items[str(i)][0] == f"item {i}"
                                       for i in range(15000, 15005))
    assert (row["progress"]["rows_read"], row["progress"]["rows_updated"]) == (n, 5)
    assert [await pool.fetchval(binlog)] == positions       # the live position did not move
