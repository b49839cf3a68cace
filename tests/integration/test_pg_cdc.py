"""Kind pg_cdc: a PostgreSQL cluster of the tests' own with wal_level = logical, its
changes read from a replication slot: snapshot then stream, deletes, TOAST, TRUNCATE,
schema changes, exactly once under kill -9, a restarted source, a slot dropped."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from etlsvc.errors import BackfillError
from tests.clusters import Cluster, scratch_dir
from tests.conftest import Env, run_source

CHROMIUM = os.environ.get("ETLSVC_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def logical() -> Iterator[Cluster]:
    """A cluster with wal_level = logical, for every test of this module."""
    with scratch_dir() as folder:
        c = Cluster(folder / "pg", settings={"wal_level": "logical",
                                              "max_replication_slots": "20"})
        try:
            yield c
        finally:
            c.server.stop()


class Upstream:
    """A fresh database on the logical cluster: the source of one test."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.url = cluster.dsn.replace("/postgres?", f"/{name}?")

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url)

    async def execute(self, sql: str, *args: Any) -> None:
        conn = await self.connect()
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await self.connect()
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()


@pytest.fixture
async def upstream_db(logical: Cluster, monkeypatch: pytest.MonkeyPatch
                      ) -> AsyncIterator[Upstream]:
    name = f"up_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(logical.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    up = Upstream(logical, name)
    monkeypatch.setenv("CDC_URL", up.url)
    try:
        yield up
    finally:
        for _ in range(50):     # a killed etlsvc's backend may hold its slot a moment
            try:
                await admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                                    "pg_replication_slots WHERE database = $1", name)
                break
            except asyncpg.ObjectInUseError:
                await asyncio.sleep(0.1)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def cdc_source(name: str, extra: str = "", tables: str = '["items"]',
               fields: str = 'source_id = "id"\ntitle = "name"\namount = "amount"',
               kind: str = "pg_cdc") -> str:
    return f"""
[[sources]]
name = "{name}"
kind = "{kind}"
url_env = "CDC_URL"
tables = {tables}
batch_size = 500
{extra}
[sources.fields]
{fields}
"""


ITEMS = ("CREATE TABLE items (id bigint PRIMARY KEY, name text, amount numeric, "
         "big text, note jsonb, at timestamptz)")


async def normalized(pool: asyncpg.Pool, source: str) -> dict[str, tuple[Any, ...]]:
    return {r["source_id"]: (r["title"], r["amount"]) for r in await pool.fetch(
        "SELECT source_id, title, amount FROM normalized_data WHERE source = $1", source)}


async def upstream_rows(up: Upstream, table: str = "items") -> dict[str, tuple[Any, ...]]:
    return {str(r["id"]): (r["name"], r["amount"]) for r in await up.fetch(
        f"SELECT id, name, amount FROM {table}")}


async def test_snapshot_then_stream_with_writes_during_the_snapshot(
        env: Env, pool: asyncpg.Pool, upstream_db: Upstream) -> None:
    up = upstream_db
    await up.execute(ITEMS)
    await up.execute("INSERT INTO items (id, name, amount) SELECT g, 'item ' || g, g "
                     "FROM generate_series(1, 20000) g")
    cfg = env.config(cdc_source("cdc"))
    writing = asyncio.Event()
    rng = random.Random(7)

    async def writer() -> int:
        conn = await up.connect()
        done = 0
        try:
            writing.set()
            for n in range(400):
                async with conn.transaction():
                    for _ in range(rng.randint(1, 10)):
                        key = rng.randint(1, 25000)
                        what = rng.random()
                        if what < 0.2:
                            await conn.execute("DELETE FROM items WHERE id = $1", key)
                        elif what < 0.6:
                            await conn.execute("UPDATE items SET name = $2, amount = amount + 1 "
                                               "WHERE id = $1", key, f"changed {n}")
                        else:
                            await conn.execute(
                                "INSERT INTO items (id, name, amount) VALUES ($1, $2, $3) "
                                "ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name", key,
                                f"new {n}", key)
                        done += 1
                await asyncio.sleep(0.002)
        finally:
            await conn.close()
        return done

    task = asyncio.create_task(writer())
    await writing.wait()
    first = await run_source(cfg, "cdc")
    assert first["status"] == "succeeded", first["error"]
    changes = await task
    assert changes > 1000
    second = await run_source(cfg, "cdc")
    assert second["status"] == "succeeded", second["error"]
    assert await normalized(pool, "cdc") == {
        k: (name, Decimal(amount)) for k, (name, amount) in (await upstream_rows(up)).items()}
    # Every streamed change once: no (lsn, seq) twice.
    assert await pool.fetchval(
        "SELECT count(*) = count(DISTINCT (lsn, seq)) FROM raw_pg_cdc_data WHERE snapshot = 0")
    # The slot was advanced to the checkpoint.
    state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE stream = 'wal'")
    slot = await up.fetch("SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint AS lsn "
                          "FROM pg_replication_slots WHERE slot_name = 'etlsvc_cdc'")
    assert slot[0]["lsn"] == state["lsn"]


async def test_deletes_updates_toast_key_changes_and_truncate(
        env: Env, pool: asyncpg.Pool, upstream_db: Upstream) -> None:
    up = upstream_db
    await up.execute(ITEMS)
    big = "x" * 100_000          # TOASTed: an update that leaves it alone does not send it
    await up.execute("INSERT INTO items (id, name, amount, big, note, at) SELECT g, 'item ' || g, "
                     "g, $1, '{\"a\": [1, 2]}', '2024-05-01 12:00:00+00' "
                     "FROM generate_series(1, 10) g", big)
    cfg = env.config(cdc_source(
        "cdc", fields='source_id = "id"\ntitle = "name"\namount = "amount"\n'
                     'description = "big"\nevent_time = "at"'))
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    assert await pool.fetchval("SELECT count(*) FROM normalized_data "
                               "WHERE description = $1", big) == 10
    await up.execute("UPDATE items SET name = 'renamed' WHERE id = 1")        # big not sent
    await up.execute("DELETE FROM items WHERE id = 2")
    await up.execute("UPDATE items SET id = 100 WHERE id = 3")               # key changed
    await up.execute("INSERT INTO items (id, name, amount) VALUES (11, 'eleven', 11)")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "succeeded", run["error"]
    assert (run["rows_inserted"], run["rows_updated"], run["rows_deleted"]) == (2, 1, 2)
    row = await pool.fetchrow("SELECT title, description, event_time FROM normalized_data "
                              "WHERE source_id = '1'")
    assert row["title"] == "renamed" and row["description"] == big
    assert row["event_time"].isoformat() == "2024-05-01T12:00:00+00:00"
    ids = {r["source_id"] for r in await pool.fetch("SELECT source_id FROM normalized_data")}
    assert ids == {"1", *map(str, range(4, 12)), "100"}
    assert {r["source_id"] for r in await pool.fetch("SELECT source_id FROM data_tombstones")} \
        == {"2", "3"}
    raw = await pool.fetchrow("SELECT record, op FROM raw_pg_cdc_data WHERE source_key = '4'")
    assert raw["record"] == {"id": 4, "name": "item 4", "amount": 4, "big": big,
                             "note": {"a": [1, 2]}, "at": "2024-05-01T12:00:00+00:00"}
    # TRUNCATE, then rows again in the same transaction: only those stay.
    await up.execute("BEGIN; INSERT INTO items (id, name, amount) VALUES (50, 'gone', 1); "
                     "TRUNCATE items; INSERT INTO items (id, name, amount) VALUES "
                     "(7, 'after', 7); COMMIT")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "succeeded", run["error"]
    assert await normalized(pool, "cdc") == {"7": ("after", Decimal(7))}


async def test_schema_changes_go_through_the_drift_policy(
        env: Env, pool: asyncpg.Pool, upstream_db: Upstream) -> None:
    up = upstream_db
    await up.execute(ITEMS)
    await up.execute("INSERT INTO items (id, name, amount) VALUES (1, 'one', 1)")
    cfg = env.config(cdc_source("cdc", 'schema_drift = "freeze"'))
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    await up.execute("ALTER TABLE items ADD COLUMN color text")
    await up.execute("INSERT INTO items (id, name, amount, color) VALUES (2, 'two', 2, 'red')")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed"
    assert "schema drift" in run["error"] and "color" in run["error"]
    assert set(await normalized(pool, "cdc")) == {"1"}       # nothing of it loaded
    evolve = env.config(cdc_source("cdc", 'schema_drift = "evolve"'))
    run = await run_source(evolve, "cdc")
    assert run["status"] == "succeeded", run["error"]
    assert set(await normalized(pool, "cdc")) == {"1", "2"}
    assert {c["column"] for c in run["notes"]["drift"]} == {"color"}


async def test_a_table_without_replica_identity_and_a_wrong_wal_level_are_clear_errors(
        env: Env, pool: asyncpg.Pool, upstream_db: Upstream, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await upstream_db.execute("CREATE TABLE items (id bigint, name text, amount numeric)")
    cfg = env.config(cdc_source("cdc"))
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed"
    assert "public.items has no replica identity" in run["error"]
    assert "REPLICA IDENTITY FULL" in run["error"]
    await upstream_db.execute("ALTER TABLE items REPLICA IDENTITY FULL")
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    # The shared server has wal_level = replica.
    shared = await asyncpg.connect(database_url)
    level = await shared.fetchval("SHOW wal_level")
    await shared.close()
    if level != "logical":
        monkeypatch.setenv("CDC_URL", database_url)
        run = await run_source(cfg, "cdc")
        assert run["status"] == "failed"
        assert f"wal_level is '{level}' on the source" in run["error"]



async def test_an_idle_slot_moves_past_wal_without_changes_of_its_tables(
        env: Env, pool: asyncpg.Pool, upstream_db: Upstream) -> None:
    """Writes to a table the source does not capture: the slot is moved past them (the
    checkpoint first), so an idle source never pins the source's WAL."""
    up = upstream_db
    await up.execute(ITEMS)
    await up.execute("CREATE TABLE other (id serial PRIMARY KEY, pad text)")
    cfg = env.config(cdc_source("cdc"))
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    await up.execute("INSERT INTO other (pad) SELECT repeat('x', 1000) "
                     "FROM generate_series(1, 3000)")                     # ~3 MB of WAL
    (before,) = await up.fetch("SELECT (pg_current_wal_lsn() - '0/0')::bigint AS lsn")
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    slot = await up.fetch("SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint AS lsn "
                          "FROM pg_replication_slots WHERE slot_name = 'etlsvc_cdc'")
    state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE stream = 'wal'")
    assert slot[0]["lsn"] >= before["lsn"] and slot[0]["lsn"] == state["lsn"]

async def test_a_slot_dropped_behind_its_back_stops_the_source_until_drop_slot(
        env: Env, pool: asyncpg.Pool, upstream_db: Upstream) -> None:
    up = upstream_db
    await up.execute(ITEMS)
    await up.execute("INSERT INTO items (id, name, amount) SELECT g, 'item ' || g, g "
                     "FROM generate_series(1, 100) g")
    env.write_config(cdc_source("cdc"))
    cfg = env.config(cdc_source("cdc"))
    assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
    await up.execute("SELECT pg_drop_replication_slot('etlsvc_cdc')")
    await up.execute("DELETE FROM items WHERE id <= 10")         # lost with the slot
    await up.execute("UPDATE items SET name = 'later' WHERE id = 50")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed"
    assert "replication slot 'etlsvc_cdc' does not exist" in run["error"]
    assert "etlsvc cdc drop-slot cdc" in run["error"]
    assert len(await normalized(pool, "cdc")) == 100               # nothing skipped silently
    ran = env.cli("cdc", "drop-slot", "cdc", CDC_URL=up.url)
    assert ran.returncode == 0, ran.stderr
    assert "was not there" in ran.stderr and "checkpoint(s) forgotten" in ran.stderr
    run = await run_source(cfg, "cdc")
    assert run["status"] == "succeeded", run["error"]
    assert await normalized(pool, "cdc") == {
        k: (name, Decimal(amount)) for k, (name, amount) in (await upstream_rows(up)).items()}
    # A slot moved past the checkpoint by someone else is refused too.
    await up.execute("INSERT INTO items (id, name, amount) VALUES (1000, 'x', 1)")
    await up.execute("SELECT pg_replication_slot_advance('etlsvc_cdc', pg_current_wal_lsn())")
    run = await run_source(cfg, "cdc")
    assert run["status"] == "failed" and "past this source's checkpoint" in run["error"]


TOTAL = 1_000_000


async def test_kill9_twice_during_a_stream_of_100000_changes_exactly_once_and_whole(
        env: Env, pool: asyncpg.Pool, upstream_db: Upstream) -> None:
    """Transfers between accounts in transactions of 1–100 rows (with inserts and deletes
    that keep the total): a reader polling normalized_data meanwhile must always see the
    same total, whatever transactions have arrived; etlsvc is killed twice mid-stream."""
    up = upstream_db
    await up.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, name text, amount bigint)")
    await up.execute("INSERT INTO accounts SELECT g, 'acct', 1000 FROM generate_series(1, 1000) g")
    env.write_config(cdc_source("cdc", tables='["accounts"]'))
    ran = env.cli("run", "cdc", CDC_URL=up.url)
    assert ran.returncode == 0, ran.stderr
    assert await pool.fetchval("SELECT sum(amount) FROM normalized_data") == TOTAL

    rng = random.Random(23)
    ids = list(range(1, 1001))
    next_id = 1001
    changes = 0

    async def writer() -> None:
        nonlocal next_id, changes
        conn = await up.connect()
        try:
            while changes < 100_000:
                rows = rng.randint(1, 100)
                async with conn.transaction():
                    sink = rng.choice(ids)
                    moved = 0
                    for _ in range(rows - 1):
                        what = rng.random()
                        if what < 0.05 and len(ids) > 100:
                            gone = rng.choice(ids)
                            if gone == sink:
                                continue
                            ids.remove(gone)
                            moved += await conn.fetchval(
                                "DELETE FROM accounts WHERE id = $1 RETURNING amount", gone)
                        elif what < 0.1:
                            await conn.execute("INSERT INTO accounts VALUES ($1, 'new', 0)",
                                               next_id)
                            ids.append(next_id)
                            next_id += 1
                        else:
                            acct = rng.choice(ids)
                            if acct == sink:
                                continue
                            moved += await conn.fetchval(
                                "UPDATE accounts SET amount = amount - 1 WHERE id = $1 "
                                "RETURNING 1", acct)
                    await conn.execute("UPDATE accounts SET amount = amount + $2 WHERE id = $1",
                                       sink, moved)
                    changes += rows
        finally:
            await conn.close()

    seen: list[int] = []

    async def reader() -> None:
        while True:
            seen.append(await pool.fetchval(
                "SELECT sum(amount) FROM normalized_data WHERE source = 'cdc'"))
            await asyncio.sleep(0.01)

    writing = asyncio.create_task(writer())
    reading = asyncio.create_task(reader())
    try:
        kills = await run_killed_twice(env, pool, "raw_pg_cdc_data", up.url, writing)
    finally:
        reading.cancel()
        writing.cancel()
    assert kills == 2
    assert changes >= 100_000
    assert len(seen) > 50 and set(seen) == {TOTAL}, sorted(set(seen))[:10]
    source = await upstream_rows(up, "accounts")
    assert await normalized(pool, "cdc") == {k: (n, Decimal(a)) for k, (n, a) in source.items()}
    # Exactly once: no change was loaded twice.
    assert await pool.fetchval(
        "SELECT count(*) = count(DISTINCT (lsn, seq)) FROM raw_pg_cdc_data WHERE snapshot = 0")


async def run_killed_twice(env: Env, pool: asyncpg.Pool, raw_table: str, url: str,
                           writing: asyncio.Task[None]) -> int:
    """`etlsvc run cdc` again and again while ``writing`` writes, each killed -9 as soon
    as it has loaded a batch of the stream (twice), then once more to the end: the kills."""
    async def streamed() -> int:
        return await pool.fetchval(f"SELECT count(*) FROM {raw_table} WHERE snapshot = 0")

    kills = 0
    for _ in range(300):
        if writing.done() and kills >= 2:
            break
        before = await streamed()
        with (env.dir / "run.log").open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "etlsvc", "run", "cdc", "--config",
                 str(env.dir / "config.toml")], cwd=env.dir, start_new_session=True,
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "ETLSVC_DATABASE_URL": env.database_url, "CDC_URL": url})
        while proc.poll() is None and await streamed() == before:
            await asyncio.sleep(0.01)
        if proc.poll() is None and kills < 2:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        await asyncio.to_thread(proc.wait)
        assert proc.returncode in (0, -9), (env.dir / "run.log").read_text()[-2000:]
    await writing
    ran = env.cli("run", "cdc", CDC_URL=url)
    assert ran.returncode == 0, ran.stderr
    return kills


async def test_a_source_restarted_mid_stream_is_followed(
        env: Env, pool: asyncpg.Pool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source database of the test's own, stopped and started while `etlsvc run`
    streams: the run reconnects and the table equals the source."""
    with scratch_dir() as folder:
        own = Cluster(folder / "pg", settings={"wal_level": "logical"})
        try:
            up = Upstream(own, "postgres")
            monkeypatch.setenv("CDC_URL", up.url)
            await up.execute("CREATE TABLE items (id bigint PRIMARY KEY, name text, "
                             "amount numeric)")
            await up.execute("INSERT INTO items SELECT g, 'item', g FROM "
                             "generate_series(1, 100) g")
            cfg = env.config(cdc_source("cdc", "reconnect_timeout_s = 30"))
            assert (await run_source(cfg, "cdc"))["status"] == "succeeded"
            for k in range(60):
                await up.execute("INSERT INTO items SELECT g, 'more', g FROM "
                                 "generate_series($1::int, $1::int + 499) g", 101 + 500 * k)
                await up.execute("UPDATE items SET name = $2 WHERE id = $1", k + 1, f"u{k}")
            running = asyncio.create_task(run_source(cfg, "cdc"))
            while not await pool.fetchval("SELECT count(*) FROM raw_pg_cdc_data "
                                          "WHERE snapshot = 0"):
                await asyncio.sleep(0.01)
            stopped_at = dt.datetime.now(dt.UTC)
            await asyncio.to_thread(own.stop_fast)
            await asyncio.sleep(1)
            await asyncio.to_thread(own.start)
            run = await running
            assert run["status"] == "succeeded", run["error"]
            assert run["finished_at"] > stopped_at          # it was streaming across it
            assert await normalized(pool, "cdc") == {
                k: (n, Decimal(a)) for k, (n, a) in (await upstream_rows(up)).items()}
        finally:
            own.server.stop()


async def test_serve_streams_and_shows_the_slot_in_health_metrics_and_the_console(
        env: Env, upstream_db: Upstream) -> None:
    """Under `etlsvc serve` the source streams by itself; a transaction left open on the
    source pins the slot's WAL past max_retained_wal, and /health calls the source failing,
    /metrics carries the gauges the alerts use, and the console's card shows it."""
    from tests.integration.test_service import KEY, servers

    up = upstream_db
    await up.execute(ITEMS)
    await up.execute("CREATE TABLE other (id serial PRIMARY KEY, pad text)")
    await up.execute("INSERT INTO items (id, name, amount) SELECT g, 'item ' || g, g "
                     "FROM generate_series(1, 10) g")
    env.write_config(cdc_source("cdc", extra='max_retained_wal = "64kB"\npoll_interval_s = 0.1'))
    with servers(env, environs=[{"CDC_URL": up.url}]) as (server,):
        async def data() -> dict[str, str]:
            rows = httpx.get(f"{server.base}/data", params={"source": "cdc", "limit": 100},
                             headers=KEY).json()["data"]
            return {r["source_id"]: r["title"] for r in rows}

        async def until(check: Any, what: str) -> Any:
            for _ in range(200):
                if found := await check():
                    return found
                await asyncio.sleep(0.1)
            raise AssertionError(f"{what}: not within 20 s\n{server.proc.pid}")

        await until(lambda: _eq(data(), 10), "the snapshot's 10 rows")
        held = await up.connect()        # an open transaction with an xid pins restart_lsn
        await held.execute("BEGIN; INSERT INTO other (pad) VALUES ('held')")
        try:
            await up.execute("UPDATE items SET name = 'streamed' WHERE id = 3")
            await up.execute("INSERT INTO other (pad) SELECT repeat('x', 1000) "
                             "FROM generate_series(1, 200)")          # ~200 kB of WAL
            await until(lambda: _title(data(), "3", "streamed"), "the streamed update")

            async def over() -> dict[str, Any] | None:
                body = httpx.get(f"{server.base}/health", headers=KEY).json()
                cdc = body["data"]["sources"]["cdc"]
                return cdc if cdc["failing"] else None

            health = await until(over, "/health failing over max_retained_wal")
            slot = health["slot"]
            assert slot["slot"] == "etlsvc_cdc" and slot["over_max_retained_wal"]
            assert slot["retained_wal_bytes"] > 64 * 1024 == slot["max_retained_wal_bytes"]
            assert "over max_retained_wal" in health["error"]
            # Caught up: the WAL of a table it does not capture is not lag.
            assert slot["lag_bytes"] < 16 * 1024 and slot["lag_seconds"] == 0
            metrics = httpx.get(f"{server.base}/metrics", headers=KEY).text
            for gauge in ("lag_bytes", "lag_seconds", "retained_wal_bytes",
                          "max_retained_wal_bytes"):
                assert f'etlsvc_cdc_{gauge}{{slot="etlsvc_cdc",source="cdc"}}' in metrics
            if not shutil.which(CHROMIUM):
                pytest.skip(f"no Chromium at {CHROMIUM}: the console's card is not checked")
            from playwright.async_api import async_playwright, expect
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM,
                                                  args=["--no-sandbox"])
                page = await browser.new_page()
                await page.goto(f"{server.base}/console#/")
                await page.click("#key-button")
                await page.fill("#key-input", "test-key")
                await page.click("dialog button[value=save]")
                card = page.locator('article[data-source="cdc"]')
                await expect(card.locator("dd span.bad", has_text="WAL retained")).to_be_visible()
                await expect(card).to_contain_text("Slot lag")
                await expect(card).to_contain_text("streaming")
                assert await card.locator("button").count() == 0     # no "Run now"
                await browser.close()
        finally:
            await held.execute("ROLLBACK")
            await held.close()


async def test_a_table_added_to_the_publication_mid_stream_is_snapshotted_then_streamed(
        env: Env, pool: asyncpg.Pool, upstream_db: Upstream) -> None:
    """`publication = …`: a table added to it while `serve` streams is read in a snapshot
    of its own when its first change arrives (its rows from before included), then
    streamed; the other table's changes go on."""
    from tests.integration.test_service import KEY, servers

    up = upstream_db
    await up.execute(ITEMS)
    await up.execute("INSERT INTO items (id, name, amount) SELECT g, 'item ' || g, g "
                     "FROM generate_series(1, 10) g")
    await up.execute("CREATE PUBLICATION pub FOR TABLE items")
    env.write_config(cdc_source("cdc", tables="[]", extra='publication = "pub"\n'
                                'poll_interval_s = 0.1').replace("tables = []\n", ""))
    with servers(env, environs=[{"CDC_URL": up.url}]) as (server,):
        async def rows() -> dict[str, str]:
            page = httpx.get(f"{server.base}/data", params={"source": "cdc", "limit": 1000},
                             headers=KEY).json()["data"]
            return {r["source_id"]: r["title"] for r in page}

        for _ in range(200):
            if len(await rows()) == 10:
                break
            await asyncio.sleep(0.1)
        await up.execute("CREATE TABLE extra (id bigint PRIMARY KEY, name text, amount int)")
        await up.execute("INSERT INTO extra SELECT g, 'extra ' || g, g "
                         "FROM generate_series(1001, 1050) g")     # before: the snapshot's
        await up.execute("ALTER PUBLICATION pub ADD TABLE extra")
        await up.execute("UPDATE extra SET name = 'streamed' WHERE id = 1001")
        await up.execute("INSERT INTO extra VALUES (1051, 'late', 1)")
        await up.execute("UPDATE items SET name = 'still streamed' WHERE id = 2")
        await up.execute("DELETE FROM extra WHERE id = 1002")
        want = {str(k): f"item {k}" for k in range(1, 11)} | {
            str(k): f"extra {k}" for k in range(1001, 1051)} | {
            "2": "still streamed", "1001": "streamed", "1051": "late"}
        del want["1002"]
        for _ in range(200):
            if (got := await rows()) == want:
                break
            await asyncio.sleep(0.1)
        assert got == want
        runs = httpx.get(f"{server.base}/etl/runs", params={"source": "cdc"},
                         headers=KEY).json()["data"]
        assert [r["status"] for r in runs] == ["running"]        # one run throughout
    # extra's rows from before it was added came from a snapshot of its own.
    assert await pool.fetchval("SELECT count(*) FROM raw_pg_cdc_data WHERE "
                               "relation = 'public.extra' AND snapshot <> 0") >= 49


async def _eq(rows: Any, n: int) -> bool:
    return len(await rows) == n


async def _title(rows: Any, key: str, title: str) -> bool:
    return (await rows).get(key) == title


async def test_a_backfill_repairs_a_key_range_and_never_undoes_a_newer_live_change(
    env: Env, pool: asyncpg.Pool, upstream_db: Upstream
) -> None:
    from tests.integration.test_backfill import (
        assert_backfill_left_alone,
        backfill_held_while,
        run_backfill,
    )

    n = 50_000
    await upstream_db.execute(ITEMS)
    await upstream_db.execute("INSERT INTO items (id, name, amount) SELECT i, 'item ' || i, i "
                              "FROM generate_series(1, $1) i", n)
    cfg = env.config(cdc_source("pgc", tables='["items"]').replace("batch_size = 500",
                                                                    "batch_size = 1000"))
    first = await run_source(cfg, "pgc")
    assert first["status"] == "succeeded", first["error"]
    # normalized_data damaged by hand (what a backfill is for, with a log-based source).
    # (Not in the first batch: that one is held below, before its checkpoint.)
    await pool.execute("UPDATE normalized_data SET title = 'damaged' "
                       "WHERE source = 'pgc' AND source_id::int BETWEEN 20010 AND 20020")
    live_position = "SELECT state FROM etl_checkpoints WHERE source = 'pgc' AND stream = 'wal'"
    slot_position = "SELECT confirmed_flush_lsn FROM pg_replication_slots"
    positions: list[Any] = []
    # The backfill of the whole table runs; once its snapshot is taken it is held while the
    # last rows change at the source and the live stream applies that first.

    async def meanwhile() -> dict[str, Any]:
        await upstream_db.execute(f"UPDATE items SET name = 'newer' WHERE id = {n - 1}")
        await upstream_db.execute(f"DELETE FROM items WHERE id = {n}")
        ran = await run_source(cfg, "pgc")
        positions.extend([await pool.fetchval(live_position),
                          await upstream_db.fetch(slot_position)])
        return ran

    live, row = await backfill_held_while(pool, cfg, "pgc", "public.items", meanwhile,
                                          start="1", end=str(n))
    assert (live["rows_updated"], live["rows_deleted"]) == (1, 1), live
    assert row["status"] == "succeeded", row["error"]
    await assert_backfill_left_alone(cfg, pool, "raw_pg_cdc_data", str(n - 1), str(n))
    items = await normalized(pool, "pgc")
    assert all(items[str(i)][0] == f"item {i}" for i in range(20010, 20021))   # repaired
    assert len(items) == n - 1
    assert row["progress"]["rows_read"] == n and row["progress"]["rows_updated"] == 11
    # The backfill moved neither the live checkpoint nor the slot.
    assert [await pool.fetchval(live_position), await upstream_db.fetch(slot_position)] == \
        positions
    assert await pool.fetchval("SELECT count(*) FROM etl_checkpoints WHERE source = $1",
                               f"pgc#backfill:{row['id']}") == 1
    # A table the source does not capture is refused, with the tables it does.
    with pytest.raises(BackfillError, match=r"does not capture table public\.other"):
        await run_backfill(cfg, "pgc", stream="other")
