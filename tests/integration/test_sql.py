"""Kind sql: tables and queries of PostgreSQL and MariaDB, streamed and incremental."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from etlsvc import db
from etlsvc.runtime import replay
from tests.conftest import Env, log_events, run_source

MARIADB = "mysql://root@127.0.0.1:3306"
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def sql_source(name: str, settings: str,
               fields: str = 'source_id = "id"\ntitle = "name"\namount = "amount"\n'
                             'event_time = "updated_at"') -> str:
    return f"""
[[sources]]
name = "{name}"
kind = "sql"
{settings}
[sources.fields]
{fields}
"""


async def add_pg(pool: asyncpg.Pool, schema: str, rows: list[tuple[Any, ...]]) -> None:
    await pool.executemany(
        f"INSERT INTO {schema}.orders VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE "
        "SET name = EXCLUDED.name, amount = EXCLUDED.amount, updated_at = EXCLUDED.updated_at",
        rows)


def orders(first: int, last: int, at: dt.datetime) -> list[tuple[Any, ...]]:
    return [(i, f"order {i}", Decimal(i) / 4, at + dt.timedelta(seconds=i // 100),
             '{"gift": true}' if i % 7 == 0 else None) for i in range(first, last + 1)]


async def test_a_postgresql_table_loads_incrementally_by_its_cursor_column(
    env: Env, pool: asyncpg.Pool, upstream_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_pg(pool, upstream_pg, orders(1, 2500, T0))
    monkeypatch.setenv("UPSTREAM_URL", env.database_url)
    cfg = env.config(sql_source("pg", f'url_env = "UPSTREAM_URL"\ntable = "{upstream_pg}.orders"'
                                      '\ncursor = "updated_at"\nbatch_size = 1000'))
    first = await run_source(cfg, "pg")
    assert first["status"] == "succeeded", first["error"]
    assert (first["rows_read"], first["rows_inserted"]) == (2500, 2500)
    row = await pool.fetchrow("SELECT kind, title, amount, event_time FROM normalized_data "
                              "WHERE source_id = '10'")
    assert tuple(row) == ("sql", "order 10", Decimal("2.5"), T0)
    raw = await pool.fetchrow("SELECT relation, record FROM raw_sql_data WHERE source_key = '7'")
    assert raw["relation"] == f"{upstream_pg}.orders"
    assert raw["record"] == {"id": 7, "name": "order 7", "amount": 1.75,
                             "updated_at": "2024-05-01T12:00:00Z", "note": {"gift": True}}
    state = await pool.fetchval("SELECT state FROM etl_checkpoints")
    assert state["hwm"] == (T0 + dt.timedelta(seconds=25)).isoformat()
    assert sorted(state["boundary"], key=int) == ["2500"]
    # New rows at the mark and after it, and one changed row; nothing else is read again.
    await add_pg(pool, upstream_pg, [
        (2501, "same second as the mark", 1, T0 + dt.timedelta(seconds=25), None),
        (2502, "later", 2, T0 + dt.timedelta(seconds=30), None),
        (5, "renamed", 5, T0 + dt.timedelta(seconds=31), None)])
    second = await run_source(cfg, "pg")
    assert (second["rows_read"], second["rows_inserted"], second["rows_updated"]) == (3, 2, 1)
    third = await run_source(cfg, "pg")
    assert third["rows_read"] == 0
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == 2502
    # Replay from the raw rows (typed JSON values) validates and normalizes them again.
    async with db.open_database(cfg) as database:
        replayed = await replay.replay_source(database, cfg.source("pg"))
    assert (replayed["status"], replayed["rows_rejected"], replayed["rows_updated"]) == (
        "succeeded", 0, 0), replayed["error"]
    assert replayed["rows_valid"] == 2503          # every raw row (order 5 twice)


async def test_a_query_source_and_a_mapped_column_it_lacks(
    env: Env, pool: asyncpg.Pool, upstream_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_pg(pool, upstream_pg, orders(1, 30, T0))
    monkeypatch.setenv("UPSTREAM_URL", env.database_url)
    query = (f"SELECT id, upper(name) AS name, amount * 2 AS amount, updated_at "
             f"FROM {upstream_pg}.orders WHERE id % 2 = 0")
    cfg = env.config(
        sql_source("q", f'url_env = "UPSTREAM_URL"\nquery = "{query}"') +
        sql_source("bad", f'url_env = "UPSTREAM_URL"\ntable = "{upstream_pg}.orders"',
                   fields='source_id = "id"\ntitle = "title"'))
    run = await run_source(cfg, "q")
    assert (run["status"], run["rows_read"]) == ("succeeded", 15)
    assert await pool.fetchval("SELECT title FROM normalized_data WHERE source_id = '4'") == \
        "ORDER 4"
    bad = await run_source(cfg, "bad")
    assert bad["status"] == "failed"
    assert f"{upstream_pg}.orders: column 'title' not in the result (columns: id, name, " \
        "amount, updated_at, note)" in bad["error"]


async def test_a_missing_credential_and_a_refused_query_fail_the_run_clearly(
    env: Env, pool: asyncpg.Pool, upstream_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    cfg = env.config(
        sql_source("nourl", 'url_env = "NOT_SET_ANYWHERE"\ntable = "t"') +
        sql_source("notable", f'url = "{env.database_url}"\ntable = "{upstream_pg}.nope"'))
    run = await run_source(cfg, "nourl")
    assert "environment variable NOT_SET_ANYWHERE (the URL of this source's database) is " \
        "not set" in run["error"]
    run = await run_source(cfg, "notable")
    assert "postgresql query failed: UndefinedTableError" in run["error"]


@pytest.mark.parametrize(("settings", "message"), [
    ('url = "mysql://root:secret@127.0.0.1/db"\ntable = "t"', "no password in the config file"),
    ('url = "mysql://root@127.0.0.1/db"\ntable = "t"\nquery = "SELECT 1"', "set table or query"),
    ('url = "mysql://root@127.0.0.1/db"\ntable = "t; DROP TABLE x"', "not a plain column or"),
    ('url = "oracle://x@h/db"\ntable = "t"', "expected postgresql:// or mysql://"),
    ('table = "t"', "set url"),
])
def test_bad_sql_source_settings_are_config_errors(env: Env, settings: str, message: str) -> None:
    env.write_config(sql_source("s", settings))
    result = env.cli("check")
    assert result.returncode == 2
    assert message in result.stderr and "sources[0]" in result.stderr
    assert "secret" not in result.stderr


@asynccontextmanager
async def mariadb_database(*setup: str) -> AsyncIterator[str]:
    """A fresh database on the machine's MariaDB (127.0.0.1:3306, root), made by ``setup``
    (statements, ``{db}`` for its name), dropped at the end; its name. Skips the test
    without a MariaDB."""
    asyncmy = pytest.importorskip("asyncmy")
    try:
        conn = await asyncmy.connect(host="127.0.0.1", port=3306, user="root", password="",
                                     connect_timeout=3, autocommit=True)
    except Exception as exc:
        pytest.skip(f"no MariaDB on 127.0.0.1:3306 ({exc})")
    name = f"etlsvc_test_{uuid.uuid4().hex[:10]}"
    async with conn.cursor() as cur:
        await cur.execute(f"CREATE DATABASE {name}")
        for statement in setup:
            await cur.execute(statement.format(db=name))
    try:
        yield name
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE {name}")
        conn.close()


@pytest.fixture
async def upstream_mariadb() -> AsyncIterator[str]:
    """A fresh database on the machine's MariaDB with an empty ``items``; its name."""
    async with mariadb_database(
            "CREATE TABLE {db}.items (id INT PRIMARY KEY, name VARCHAR(50), "
            "amount DECIMAL(10,2), updated_at DATETIME(6), raw BLOB, `item.note` TEXT)"
    ) as name:
        yield name


async def add_mariadb(db: str, rows: list[tuple[Any, ...]]) -> None:
    import asyncmy

    conn = await asyncmy.connect(host="127.0.0.1", port=3306, user="root", password="",
                                 database=db, autocommit=True)
    async with conn.cursor() as cur:
        await cur.executemany("REPLACE INTO items VALUES (%s, %s, %s, %s, %s, %s)", rows)
    conn.close()


async def test_a_mariadb_table_streams_and_loads_incrementally_by_an_id(
    env: Env, pool: asyncpg.Pool, upstream_mariadb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    naive = T0.replace(tzinfo=None)
    await add_mariadb(upstream_mariadb, [(i, f"item {i}", Decimal(i) / 2, naive, b"\x00\xff",
                                          f"note {i}") for i in range(1, 12_001)])
    monkeypatch.setenv("MARIADB_PASSWORD", "")
    cfg = env.config(sql_source(
        "maria", f'url = "{MARIADB}/{upstream_mariadb}"\npassword_env = "MARIADB_PASSWORD"\n'
                 'table = "items"\ncursor = "id"\nbatch_size = 5000',
        fields='source_id = "id"\ntitle = "name"\namount = "amount"\n'
               'description = "item.note"'))
    first = await run_source(cfg, "maria")
    assert first["status"] == "succeeded", first["error"]
    assert (first["rows_read"], first["rows_inserted"]) == (12_000, 12_000)
    assert await pool.fetchval("SELECT count(*) FROM raw_sql_data WHERE run_id = $1",
                               first["id"]) == 12_000
    raw = await pool.fetchval("SELECT record FROM raw_sql_data WHERE source_key = '3'")
    assert raw == {"id": 3, "name": "item 3", "amount": 1.5,
                   "updated_at": "2024-05-01T12:00:00", "raw": "AP8=", "item.note": "note 3"}
    # A column whose name holds a dot is that column, not a path.
    assert tuple(await pool.fetchrow(
        "SELECT amount, description FROM normalized_data WHERE source_id = '3'")) == (
        Decimal("1.5"), "note 3")
    await add_mariadb(upstream_mariadb, [(12_001, "new", 1, naive, None, None)])
    second = await run_source(cfg, "maria")
    assert (second["rows_read"], second["rows_inserted"]) == (1, 1)
    state = await pool.fetchval("SELECT state FROM etl_checkpoints")
    assert (state["hwm"], state["boundary"]) == (12_001, ["12001"])


async def test_a_database_error_with_a_hint_is_one_line_naming_the_source_once(
    env: Env, pool: asyncpg.Pool
) -> None:
    # lower(integer) does not exist: PostgreSQL adds a HINT line about explicit casts
    env.write_config(sql_source(
        "hinted", f'url = "{env.database_url}"\nquery = "SELECT lower(1) AS id"',
        fields='source_id = "id"'))
    done = env.cli("run", "hinted")
    assert done.returncode == 1
    error = await pool.fetchval("SELECT error FROM etl_runs WHERE source = 'hinted'")
    assert "\n" not in error and "; HINT: " in error, error
    assert "function lower(integer) does not exist" in error
    said = [line for line in done.stderr.splitlines() if "lower(integer)" in line]
    assert said == [error], done.stderr           # once, whole, the source named once
    assert error.startswith("source 'hinted': ") and error.count("hinted") == 1
    for event in log_events(done.stdout) + log_events(done.stderr):
        assert "\n" not in str(event.get("error", ""))
