"""A MySQL/MariaDB ``sql`` source reads in flat memory whatever the table's size: 1,000,000
rows of about 120 bytes load with the process tree's peak RSS under 150 MiB."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import Env
from tests.integration.test_sql import MARIADB, sql_source

pytestmark = pytest.mark.slow

ROWS = 1_000_000


@pytest.fixture
async def big_table() -> AsyncIterator[str]:
    """A database with ``items``: ROWS rows of about 120 bytes (the Sequence engine makes
    them on the server)."""
    asyncmy = pytest.importorskip("asyncmy")
    try:
        conn = await asyncmy.connect(host="127.0.0.1", port=3306, user="root", password="",
                                     connect_timeout=3, autocommit=True)
    except Exception as exc:
        pytest.skip(f"no MariaDB on 127.0.0.1:3306 ({exc})")
    name = f"etlsvc_big_{uuid.uuid4().hex[:10]}"
    async with conn.cursor() as cur:
        await cur.execute(f"CREATE DATABASE {name}")
        await cur.execute(f"CREATE TABLE {name}.items (id INT PRIMARY KEY, name VARCHAR(50), "
                          "amount DECIMAL(10,2), updated_at DATETIME(6), note VARCHAR(100))")
        await cur.execute(
            f"INSERT INTO {name}.items SELECT seq, CONCAT('item ', seq), seq / 100, "
            "TIMESTAMP'2026-01-01 00:00:00' + INTERVAL seq SECOND, REPEAT('n', 60) "
            f"FROM {name}.seq_1_to_{ROWS}")
    try:
        yield name
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE {name}")
        conn.close()


@pytest.mark.parametrize("cursor", [None, "updated_at"])
async def test_a_million_mariadb_rows_load_in_flat_memory(
        env: Env, pool: asyncpg.Pool, big_table: str, cursor: str | None) -> None:
    env.write_config(sql_source(
        "big", f'url = "{MARIADB}/{big_table}"\ntable = "items"\nbatch_size = 10000'
               + (f'\ncursor = "{cursor}"' if cursor else ""),
        fields='source_id = "id"\ntitle = "name"\namount = "amount"\n'
               'description = "note"\nevent_time = "updated_at"'))
    done, peak = env.cli_peak("run", "big")
    assert done.returncode == 0, done.stderr[-2000:]
    run = await pool.fetchrow("SELECT * FROM etl_runs")
    assert (run["rows_read"], run["rows_inserted"]) == (ROWS, ROWS)
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == ROWS
    print(f"peak RSS of the process tree: {peak:.0f} MiB")
    assert peak <= 150, f"peak RSS {peak:.0f} MiB"
