"""Retention: old raw rows and rejects are purged in batches; a raw row a normalized row
points at is never deleted; a replay under way postpones the purge of its source."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx

from etlsvc import db
from etlsvc.runtime import retention
from tests.conftest import Env, csv_source, run_source
from tests.integration.test_service import servers

FIELDS = 'source_id = "id"\ntitle = "title"\namount = "amount"\n'


def write(env: Env, name: str, n: int, changed: int = 0, bad: int = 0) -> None:
    """n rows; the first ``changed`` with another title; ``bad`` more with a bad amount."""
    rows = [f"k{i},{'new ' if i < changed else ''}t{i},{i}" for i in range(n)]
    rows += [f"b{i},t,x" for i in range(bad)]
    (env.dir / f"{name}.csv").write_text("id,title,amount\n" + "\n".join(rows) + "\n")


def sources(env: Env, extra: str = "") -> str:
    keep = csv_source("kept", env.dir / "kept.csv", fields=FIELDS, extra="max_error_rate = 1")
    old = csv_source("items", env.dir / "items.csv", fields=FIELDS,
                     extra="retention_days = 7\nmax_error_rate = 1")
    return old + keep + extra


async def age(pool: asyncpg.Pool, days: int) -> None:
    for table in ("raw_csv_data",):
        await pool.execute(f"UPDATE {table} SET ingested_at = now() - make_interval(days => $1)",
                           days)
    await pool.execute("UPDATE etl_rejects SET created_at = now() - make_interval(days => $1)",
                       days)


async def lineage_intact(pool: asyncpg.Pool) -> bool:
    return await pool.fetchval(
        "SELECT count(*) FROM normalized_data n WHERE NOT EXISTS "
        "(SELECT 1 FROM raw_csv_data r WHERE r.id = n.raw_id)") == 0


async def test_old_raw_rows_go_in_batches_but_never_one_a_normalized_row_points_at(
        env: Env, pool: asyncpg.Pool) -> None:
    write(env, "items", 3000, bad=40)
    write(env, "kept", 500, bad=10)
    cfg = env.config(sources(env))
    await run_source(cfg, "items")
    await run_source(cfg, "kept")
    write(env, "items", 3000, changed=1000)         # a third of the rows change
    second = await run_source(cfg, "items", full_refresh=True)
    assert (second["rows_updated"], second["rows_unchanged"]) == (1000, 2000)
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data WHERE source = 'items'") \
        == 6000
    await age(pool, 10)
    async with db.open_database(cfg) as database:
        done = await retention.purge(database.pool, cfg, batch=400, pause=0)
    # Of 6000 raw rows, the 3000 no normalized row points at are gone: the changed rows'
    # first versions and the unchanged rows' second copies.
    assert done == {"items": {"raw": 3000, "rejects": 40, "postponed": 0}}
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data WHERE source = 'items'") \
        == 3000
    assert await lineage_intact(pool)
    # The source without retention_days is untouched.
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data WHERE source = 'kept'") == 500
    assert await pool.fetchval("SELECT count(*) FROM etl_rejects WHERE source = 'kept'") == 10
    # All titles change (the first 1000 already had): the 2000 old rows replaced go; the
    # 3000 young ones stay, the 1000 no normalized row points at included.
    write(env, "items", 3000, changed=3000)
    await run_source(cfg, "items", full_refresh=True)
    done = env.cli("purge")
    assert done.returncode == 0, done.stderr
    assert "items: 2,000 raw row(s) and 0 reject(s) purged" in done.stderr
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data WHERE source = 'items' "
                               "AND ingested_at > now() - interval '1 day'") == 3000
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data WHERE source = 'items'") \
        == 4000
    assert await lineage_intact(pool)


async def test_a_replay_under_way_postpones_the_purge_of_its_raw_rows(
        env: Env, pool: asyncpg.Pool) -> None:
    write(env, "items", 500)
    cfg = env.config(sources(env))
    await run_source(cfg, "items")
    write(env, "items", 500, changed=500)
    await run_source(cfg, "items", full_refresh=True)
    await age(pool, 10)
    async with pool.acquire() as conn, conn.transaction():
        await retention.lock_raw(conn, "items", wait=True)  # as a replay does
        async with db.open_database(cfg) as database:
            done = await retention.purge(database.pool, cfg, pause=0)
    assert done["items"]["postponed"] == 1 and done["items"]["raw"] == 0
    async with db.open_database(cfg) as database:
        done = await retention.purge(database.pool, cfg, pause=0)
    assert done["items"]["raw"] == 500 and await lineage_intact(pool)


async def test_serve_runs_the_purge_as_a_scheduled_job(env: Env, pool: asyncpg.Pool) -> None:
    write(env, "items", 800, changed=0)
    cfg = env.config(sources(env))
    await run_source(cfg, "items")
    write(env, "items", 800, changed=800)
    await run_source(cfg, "items", full_refresh=True)
    await age(pool, 30)
    env.write_config(sources(env), extra="[server]\nmaintenance_every_s = 1")
    with servers(env) as (server,):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = await pool.fetchval("SELECT count(*) FROM raw_csv_data")
            if left == 800:
                break
            await asyncio.sleep(0.3)
        assert left == 800
        assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200
    assert await lineage_intact(pool)
