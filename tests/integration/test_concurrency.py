"""Batches in flight at once: the files of a glob together, a file's next batch while one
commits; commits in file order, so a checkpoint is never ahead of the data."""

from __future__ import annotations

import gc
import tracemalloc
from itertools import pairwise
from pathlib import Path

import asyncpg

from etlsvc.extract import KINDS
from etlsvc.load import raw
from tests.conftest import Env, csv_source, run_source


def numbered(path: Path, first: int, last: int, prefix: str = "K") -> Path:
    path.write_text("id,title\n" + "".join(f"{prefix}{i},t{i}\n" for i in range(first, last + 1)))
    return path


async def test_the_files_of_a_glob_load_at_the_same_time_each_in_order(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    for k in range(4):
        numbered(tmp_path / f"part_{k}.csv", 1, 20_000, prefix=f"F{k}-")
    cfg = env.config(csv_source("g", tmp_path / "part_*.csv", fields='source_id = "id"\n'
                                'title = "title"', extra="batch_size = 2000"),
                     extra="[pipeline]\nparallel_streams = 4\nconnections_per_run = 4")
    # Each COPY takes 0.1 s longer in the database, so that the commits, not the parsing,
    # are what takes time, even on a machine whose cores the other tests keep busy.
    await pool.execute("""
        CREATE FUNCTION slow_copy() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.1); RETURN NULL; END $$;
        CREATE TRIGGER slow_copy AFTER INSERT ON raw_csv_data
            FOR EACH STATEMENT EXECUTE FUNCTION slow_copy();""")
    try:
        run = await run_source(cfg, "g")
    finally:
        await pool.execute("DROP TRIGGER slow_copy ON raw_csv_data; DROP FUNCTION slow_copy()")
    assert (run["status"], run["rows_inserted"]) == ("succeeded", 80_000)
    # Each batch is a transaction of its own (its xid): the files' transactions interleave.
    spans = await pool.fetch(
        "SELECT file, min(xmin::text::bigint) AS first, max(xmin::text::bigint) AS last "
        "FROM raw_csv_data GROUP BY file ORDER BY file")
    assert any(a["last"] > b["first"] for a, b in pairwise(spans)), [
        tuple(s) for s in spans]
    assert await pool.fetchval("SELECT count(DISTINCT (file, line)) FROM raw_csv_data") == 80_000
    states = await pool.fetch("SELECT stream, state FROM etl_checkpoints ORDER BY stream")
    assert [s["state"]["line"] for s in states] == [20_001] * 4


async def test_a_failed_batch_takes_the_one_in_flight_after_it_down_too(
    env: Env, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = numbered(tmp_path / "one.csv", 1, 10_000)
    cfg = env.config(csv_source("f", path, fields='source_id = "id"\ntitle = "title"',
                                extra="batch_size = 1000"),
                     extra="[pipeline]\nconnections_per_run = 3")
    # The fourth batch fails in the database, after the fifth (and sixth) have started.
    await pool.execute("""
        CREATE FUNCTION fail_k3500() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.source_key = 'K3500' THEN
                PERFORM pg_sleep(0.5);
                RAISE EXCEPTION 'injected failure at K3500';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_k3500 BEFORE INSERT ON raw_csv_data
            FOR EACH ROW EXECUTE FUNCTION fail_k3500();""")
    try:
        run = await run_source(cfg, "f")
    finally:
        await pool.execute("DROP TRIGGER fail_k3500 ON raw_csv_data; DROP FUNCTION fail_k3500()")
    assert run["status"] == "failed" and "injected failure at K3500" in run["error"]
    # Exactly the batches before the failed one are in, and the checkpoint says so.
    assert await pool.fetchval("SELECT max(line) FROM raw_csv_data") == 3001
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data") == 3000
    assert (await pool.fetchval("SELECT state FROM etl_checkpoints"))["line"] == 3001
    assert run["rows_read"] == 3000
    # The batches after it had copied their rows (the ids are taken) before rolling back.
    assert await pool.fetchval("SELECT last_value FROM raw_csv_data_id_seq") > 4000
    again = await run_source(cfg, "f")
    assert (again["status"], again["rows_read"], again["rows_inserted"]) == (
        "succeeded", 7000, 7000)
    assert await pool.fetchval("SELECT count(DISTINCT line) FROM raw_csv_data") == 10_000
    assert await pool.fetchval("SELECT count(*) FROM normalized_data") == 10_000


async def test_a_batch_payload_is_freed_as_soon_as_its_copy_returns(pool: asyncpg.Pool) -> None:
    # What keeps etlsvc's RSS flat over a long load: with a file object around the payload,
    # asyncpg's reader (a class it makes per call, so in a reference cycle) kept each batch
    # alive until the next garbage collection, and RSS grew by a batch at a time.
    kind = KINDS["csv"]
    rows = 20_000
    gc.disable()
    tracemalloc.start()
    try:
        payload = raw.payload(1, "s", "f.csv", [(i + 2, 100 * i) for i in range(rows)],
                              [f"K{i}" for i in range(rows)],
                              (b'{"id":"K%d","title":"t"}' % i for i in range(rows)))
        size = len(payload)
        async with pool.acquire() as conn:
            await raw.copy(conn, kind.raw_table, kind.copy_columns, payload)
        held = tracemalloc.get_traced_memory()[0]
        del payload
        freed = held - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        gc.enable()
    assert freed >= size, f"{freed:,} of the payload's {size:,} bytes freed"
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data") == rows
