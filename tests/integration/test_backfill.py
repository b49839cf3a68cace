"""Backfills: a range of a source read again as runs of its own, beside the live run,
leaving the live position alone and never overwriting a newer live change."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import pytest

from etlsvc import db
from etlsvc.runtime import backfill
from tests.conftest import Env, run_source, shared_workers
from tests.integration.test_sql import add_pg, orders, sql_source

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


async def run_backfill(cfg: Any, name: str, *, start: str | None = None,
                       end: str | None = None, stream: str | None = None) -> dict[str, Any]:
    """Make (or find) the backfill and run it in this process; its finished row."""
    async with db.open_database(cfg) as database:
        made = await backfill.create(database.pool, cfg.source(name), stream=stream,
                                     start=start, end=end)
        return await backfill.run(database, cfg, cfg.source(name), made["id"],
                                  shared_workers())


def pg_orders(env: Env, schema: str, extra: str = "") -> Any:
    return env.config(sql_source("pg", f'url_env = "UPSTREAM_URL"\ntable = "{schema}.orders"'
                                       f'\ncursor = "updated_at"\nbatch_size = 100{extra}'))


async def test_a_sql_backfill_reloads_its_range_and_leaves_newer_live_rows_and_the_cursor(
    env: Env, pool: asyncpg.Pool, upstream_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_URL", env.database_url)
    # updated_at = T0 + id // 100 seconds: ids 100..399 are the range T0+1s .. T0+3s.
    await add_pg(pool, upstream_pg, orders(1, 1000, T0))
    cfg = pg_orders(env, upstream_pg)
    live = await run_source(cfg, "pg")
    assert live["status"] == "succeeded", live["error"]
    live_state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE source = 'pg'")
    # Fixes made upstream without moving the cursor column: a live run never sees them.
    await pool.execute(f"UPDATE {upstream_pg}.orders SET name = name || ' fixed' "
                       "WHERE id BETWEEN 50 AND 450")
    # Row 250 changed later, and the live side has that (newer) version; the source the
    # backfill reads still answers the older one (a lagging replica): left alone.
    await pool.execute(f"UPDATE {upstream_pg}.orders SET name = 'newer', "
                       "updated_at = updated_at + interval '1 hour' WHERE id = 250")
    again = await run_source(cfg, "pg")
    assert again["rows_updated"] == 1
    await pool.execute(f"UPDATE {upstream_pg}.orders SET name = 'older', "
                       f"updated_at = '{T0 + dt.timedelta(seconds=2)}' WHERE id = 250")
    live_state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE source = 'pg'")

    row = await run_backfill(cfg, "pg", start=str(T0 + dt.timedelta(seconds=1)),
                             end=str(T0 + dt.timedelta(seconds=3)))
    assert row["status"] == "succeeded", row["error"]
    names = dict(await pool.fetch("SELECT source_id::int, title FROM normalized_data"))
    assert all(names[i] == f"order {i} fixed" for i in range(100, 400) if i != 250)
    assert names[250] == "newer"                      # the newer live change stays
    assert names[99] == "order 99" and names[400] == "order 400"   # outside the range
    progress = row["progress"]
    assert (progress["rows_read"], progress["rows_updated"], progress["rows_unchanged"]) == \
        (300, 299, 1)
    assert progress["fraction"] == 1.0
    # The live cursor did not move, and the backfill's checkpoints are its own.
    assert await pool.fetchval(
        "SELECT state FROM etl_checkpoints WHERE source = 'pg'") == live_state
    assert await pool.fetchval("SELECT count(*) FROM etl_checkpoints WHERE source = $1",
                               f"pg#backfill:{row['id']}") == 1
    run = await pool.fetchrow("SELECT trigger, status FROM etl_runs WHERE id = $1",
                              row["run_id"])
    assert tuple(run) == ("backfill", "succeeded")
    # Asked again, the same range is a new backfill (the last one is over).
    second = await run_backfill(cfg, "pg", start=str(T0 + dt.timedelta(seconds=1)),
                                end=str(T0 + dt.timedelta(seconds=3)))
    assert second["id"] != row["id"] and second["progress"]["rows_unchanged"] == 300
