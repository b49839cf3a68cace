"""Migrations: applied once, in order, under a lock; changed history refused."""

from __future__ import annotations

import asyncio
import random
import types
import uuid

import asyncpg
import msgspec
import pytest

from etlsvc import db
from etlsvc.api import versions
from etlsvc.config import Source
from etlsvc.errors import DatabaseError
from etlsvc.extract import KINDS
from etlsvc.load import normalize
from etlsvc.runtime import pipeline
from etlsvc.transform.mapping import values_sql
from tests.conftest import _with_db


@pytest.fixture
async def empty_db(server_dsn: str):
    name = f"etlsvc_mig_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_concurrent_migrations_apply_each_file_once(empty_db: str) -> None:
    pools = [await asyncpg.create_pool(empty_db, min_size=1, max_size=2) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(db.apply_migrations(p) for p in pools))
    finally:
        for p in pools:
            await p.close()
    names = [f for _, f, _ in db.migration_files()]
    assert sorted(n for names_ in applied for n in names_) == sorted(
        names
    )  # each applied by exactly one
    conn = await asyncpg.connect(empty_db)
    try:
        rows = await conn.fetch("SELECT name FROM etl_schema_migrations ORDER BY version")
        assert [r["name"] for r in rows] == names
        tables = {
            r["t"]
            for r in await conn.fetch(
                "SELECT tablename AS t FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        assert {
            "raw_csv_data",
            "raw_api_data",
            "raw_rss_data",
            "normalized_data",
            "etl_checkpoints",
            "etl_runs",
            "etl_rejects",
        } <= tables
        await conn.execute("UPDATE etl_schema_migrations SET checksum = 'x' WHERE version = 1")
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(empty_db, min_size=1, max_size=1)
    try:
        with pytest.raises(DatabaseError, match="was changed after it was applied"):
            await db.apply_migrations(pool)
    finally:
        await pool.close()


async def test_unreachable_database_is_one_clear_error_without_the_password() -> None:
    from etlsvc.config import Config

    with pytest.raises(DatabaseError) as err:
        await db.connect_pool("postgresql://etl:s3cret@127.0.0.1:1/x", Config())
    assert "cannot connect to PostgreSQL at postgresql://etl:***@127.0.0.1:1/x" in str(err.value)
    assert "s3cret" not in str(err.value)


def named_queries() -> list[tuple[str, str, str]]:
    """(file, name, SQL) of every named query in sql/queries/, found by listing the folder:
    a new file or query is checked without being listed here."""
    found = [(path.stem, name, sql) for path in sorted(db.sql_dir().glob("queries/*.sql"))
             for name, sql in db.queries(path.stem).items()]
    assert {f for f, _, _ in found} >= {"api", "drift", "locks", "normalize", "replay", "runs"}
    return found


async def test_every_named_query_prepares_against_the_schema(pool: asyncpg.Pool) -> None:
    """Each statement, with its placeholders filled as the code fills them, for every kind's
    raw table where it names one; the filter table of GET /data condition by condition."""
    src = msgspec.convert({"name": "s", "kind": "csv", "path": "x",
                           "fields": {"source_id": "id"}}, Source)
    fill = {"{distinct}": "", "{order}": "", "{this_transaction}": "", "{values}": values_sql(src),
            "{column}": "url", "{guard}": "", "{tombstone}": "",
            "{filters}": " AND category = $3", "{source}": "$4"}
    prepared = 0
    async with pool.acquire() as conn, conn.transaction():
        # replay.sql's statements use the temporary table its first one makes.
        await conn.execute(db.query("replay", "keys_table"))
        # versions.sql's rollback statements, the one its rollback_target makes.
        await conn.execute(db.query("versions", "rollback_target"), "s", "3:3:")
        for file, name, sql in named_queries():
            if (file, name) == ("api", "data_filters"):
                statements = [f"SELECT id FROM normalized_data WHERE {cond.replace('{n}', '1')}"
                              for _, cond in (line.split(None, 1) for line in sql.splitlines()
                                              if line and not line.startswith("--"))]
            else:
                statements = [sql]
            for statement in statements:
                for kind in KINDS.values():
                    if (file == "cdc" or name == "mark_gone") and not kind.changes:
                        continue            # the change kinds' statements
                    text = normalize.kind_sql_of(statement, kind)
                    if name == "drop_unseen":               # the kinds with versions
                        if kind.seen_sql is None:
                            continue
                        text = normalize.drop_unseen_sql(kind) or ""
                    if name == "upsert" and kind.seen_sql:     # as a backfill's batch
                        text = normalize.upsert_sql(kind, False, True, values_sql(src),
                                                    kind.seen_sql)
                    if file == "versions" and name in ("data_page", "data_one"):
                        text = versions.reading_sql(name, "$3" if name == "data_page" else "$2")
                    text = text.replace("$S", "$1")        # moment_check on its own
                    for placeholder, value in fill.items():
                        text = text.replace(placeholder, value)
                    assert "{" not in text.replace("'{", ""), (
                        f"{file}.sql {name}: a placeholder this test does not fill")
                    await conn.prepare(text)
                    prepared += 1
                    if "{raw_table}" not in statement:
                        break
    assert prepared >= len(named_queries())


async def test_the_read_pool_serves_requests_in_the_order_they_asked(database_url: str) -> None:
    """Requests that wait for a connection get one in the order they asked, ahead of one
    that asks again the moment it gives its connection back. (What that order is worth under
    load is measured in bench/RESULTS.md: without it the read API's p90 was twice its p50.)"""

    async def no_reset(_: asyncpg.Connection) -> None:
        pass

    raw = await asyncpg.create_pool(database_url, min_size=1, max_size=1, reset=no_reset)
    pool = db.InTurn(raw)
    order: list[str] = []

    async def holder() -> None:
        await pool.fetchval("SELECT pg_sleep(0.3)")
        order.append("holder")
        await pool.fetchval("SELECT 1")      # asks again as it gives the connection back
        order.append("late")

    async def waiter(i: int) -> None:
        await asyncio.sleep(0.05 + 0.02 * i)  # ask in turn while the holder has it
        await pool.fetchval("SELECT 1")
        order.append(f"w{i}")

    try:
        await asyncio.gather(holder(), *(waiter(i) for i in range(5)))
    finally:
        await raw.close()
    assert order == ["holder", "w0", "w1", "w2", "w3", "w4", "late"]


async def _backend_states(database_url: str, name: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [r["state"] for r in await conn.fetch(
            "SELECT state FROM pg_stat_activity WHERE application_name = $1", name)]
    finally:
        await conn.close()


async def _one_connection_pool(database_url: str) -> tuple[str, asyncpg.Pool]:
    async def no_reset(_: asyncpg.Connection) -> None:
        pass

    name = f"handover-{uuid.uuid4().hex[:8]}"
    return name, await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, reset=no_reset,
        server_settings={"application_name": name})


async def test_a_read_handed_a_connection_reads_in_its_own_scope_and_none_idles_open(
    database_url: str
) -> None:
    """Under load a read hands its connection to the next with its transaction still open
    (the next one ends it): each read still sees only its own tenant and patterns, each is
    a transaction of its own, and once the reads are done the connection is not left idle
    in a transaction for more than a moment."""
    name, raw = await _one_connection_pool(database_url)
    pool = db.InTurn(raw)

    async def read(tenant: str | None) -> tuple[str, str, object]:
        db.READ_SCOPE.set(None if tenant is None else
                          db.ReadScope(tenant, (f"{tenant}%", "o'brien\\%")))
        row = await pool.fetchrow(
            "SELECT coalesce(current_setting('etlsvc.tenant', true), '') AS t, "
            "coalesce(current_setting('etlsvc.sources', true), '') AS s, "
            "now() AS began")
        return row["t"], row["s"], row["began"]

    tenants = [None if i % 4 == 3 else f"t{i % 4}" for i in range(40)]
    try:
        seen = await asyncio.gather(*(read(t) for t in tenants))
        assert [s[:2] for s in seen] == [("", "") if t is None else (t, f"{t}%\no'brien\\%")
                                         for t in tenants]
        assert len({s[2] for s in seen}) == len(tenants)    # each a transaction of its own
        # Parked for the next read a moment, then its transaction is ended.
        await asyncio.sleep(db.InTurn.PARK_S + 0.1)
        assert await _backend_states(database_url, name) == ["idle"]
    finally:
        await pool.close()


async def test_a_connection_handed_to_a_read_that_was_cancelled_goes_on_or_back(
    database_url: str
) -> None:
    """A read cancelled just as a connection was handed to it passes it on to the next
    waiting read, or, with none, ends its transaction and gives it back to the pool."""
    name, raw = await _one_connection_pool(database_url)
    pool = db.InTurn(raw)
    cancelled: list[asyncio.Task[object]] = []

    async def holder(then_cancel: int) -> None:
        await pool.fetchval("SELECT pg_sleep(0.2)")
        for task in cancelled[:then_cancel]:
            task.cancel()       # woken with the connection handed to it, it never reads

    try:
        holding = asyncio.create_task(holder(1))
        await asyncio.sleep(0.05)
        cancelled.append(asyncio.create_task(pool.fetchval("SELECT 1")))
        await asyncio.sleep(0.01)
        after = asyncio.create_task(pool.fetchval("SELECT 2"))
        await holding
        with pytest.raises(asyncio.CancelledError):
            await cancelled[0]
        assert await after == 2

        cancelled.clear()
        holding = asyncio.create_task(holder(1))
        await asyncio.sleep(0.05)
        cancelled.append(asyncio.create_task(pool.fetchval("SELECT 1")))
        await holding
        with pytest.raises(asyncio.CancelledError):
            await cancelled[0]
        await asyncio.sleep(0.1)
        assert await _backend_states(database_url, name) == ["idle"]
        assert raw.get_idle_size() == 1
        assert await pool.fetchval("SELECT 3") == 3
    finally:
        await pool.close()


async def test_reads_cancelled_at_random_moments_lose_no_connection(database_url: str) -> None:
    """Reads cancelled anywhere (waiting for a turn, handed a connection, mid-query, ending
    their transaction), as a client that hangs up cancels its request: every connection
    comes back to the pool, idle and out of any transaction, and the pool still closes."""
    name, raw = await _one_connection_pool(database_url)
    await raw.close()
    raw = await asyncpg.create_pool(database_url, min_size=3, max_size=3,
                                    server_settings={"application_name": name})
    pool = db.InTurn(raw)
    rng = random.Random(25)

    async def read(i: int) -> None:
        db.READ_SCOPE.set(db.ReadScope(f"t{i % 2}"))
        assert await pool.fetchval("SELECT $1::int", i) == i

    try:
        for _ in range(100):
            tasks = [asyncio.create_task(read(i)) for i in range(30)]
            loop = asyncio.get_running_loop()
            for task in tasks:
                loop.call_later(rng.uniform(0, 0.005), task.cancel)
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.1)
        assert raw.get_idle_size() == 3
        assert await _backend_states(database_url, name) == ["idle"] * 3
        assert await asyncio.gather(*(read(i) for i in range(10))) == [None] * 10
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_the_history_table_keeps_every_column_a_normalized_row_has(
    pool: asyncpg.Pool
) -> None:
    """data_history repeats normalized_data's columns (its changed_xid as from_xid): a
    column added to one and not the other would be lost from every version."""
    columns = """SELECT column_name, data_type FROM information_schema.columns
                 WHERE table_name = $1 AND column_name <> ALL ($2::text[])
                 ORDER BY column_name"""
    current = await pool.fetch(columns, "normalized_data", ["changed_xid"])
    kept = await pool.fetch(columns, "data_history", ["from_xid", "to_xid", "ended_at"])
    assert [tuple(r) for r in kept] == [tuple(r) for r in current]


async def test_a_batch_connection_closed_with_the_database_is_lost_while_the_runs_answers(
    database_url: str
) -> None:
    """A batch's connection dies with the database (a killed postmaster) while the run's
    own still answers for a moment, as the backends of a killed postmaster do: asyncpg's
    "connection is closed" from the batch is a lost database (the run reconnects and goes
    on), not a bug that fails the run. Seen in test_stream's database-crash test. An
    InterfaceError from a statement given the wrong arguments still is a bug."""
    conn = await asyncpg.connect(database_url)
    run = types.SimpleNamespace(conn=conn)
    try:
        closed = asyncpg.InterfaceError(
            "cannot call Transaction.__aexit__(): the underlying connection is closed")
        closed.__context__ = asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress")
        assert await pipeline._connection_lost(run, closed)
        assert not await pipeline._connection_lost(run, asyncpg.InterfaceError(
            "the server expects 2 arguments for this query, 1 was passed"))
    finally:
        await conn.close()
