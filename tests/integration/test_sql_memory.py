"""A MySQL/MariaDB ``sql`` source reads in flat memory whatever the table's size: 300,000
rows of about 120 bytes (held at once, as Python rows, they would take more than 100 MiB)
load with the process tree's peak RSS under 150 MiB. bench/bench_sql_memory.py loads a
million and more."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import Env
from tests.integration.test_sql import MARIADB, mariadb_database, sql_source

pytestmark = pytest.mark.slow

ROWS = 300_000


@pytest.fixture
async def big_table() -> AsyncIterator[str]:
    """A database with ``items``: ROWS rows of about 120 bytes (the Sequence engine makes
    them on the server)."""
    async with mariadb_database(
            "CREATE TABLE {db}.items (id INT PRIMARY KEY, name VARCHAR(50), "
            "amount DECIMAL(10,2), updated_at DATETIME(6), note VARCHAR(100))",
            "INSERT INTO {db}.items SELECT seq, CONCAT('item ', seq), seq / 100, "
            "TIMESTAMP'2026-01-01 00:00:00' + INTERVAL seq SECOND, REPEAT('n', 60) "
            f"FROM {{db}}.seq_1_to_{ROWS}") as name:
        yield name


@pytest.mark.parametrize("cursor", [None, "updated_at"])
async def test_a_large_mariadb_table_loads_in_flat_memory(
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
