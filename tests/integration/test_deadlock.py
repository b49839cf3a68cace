"""A batch that PostgreSQL rolls back to break a deadlock with an operator's transaction is
done again from its checkpoint in the same run, which succeeds with every row loaded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
from structlog.testing import capture_logs

from tests.conftest import Env, csv_source, run_source

FIELDS = 'source_id = "id"\ntitle = "title"\n'


def write_items(path: Path, title: str) -> None:
    path.write_text("id,title\n" + "".join(f"k{i:04},{title}\n" for i in range(1000)))


async def waiting_for_a_lock(pool: asyncpg.Pool) -> bool:
    return await pool.fetchval(
        "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE NOT l.granted AND a.datname = current_database()")


async def test_a_batch_chosen_to_break_a_deadlock_is_done_again_in_the_same_run(
        env: Env, pool: asyncpg.Pool) -> None:
    path = env.dir / "items.csv"
    write_items(path, "first")
    cfg = env.config(csv_source("items", path, fields=FIELDS))
    await run_source(cfg, "items")
    write_items(path, "second")              # the next run updates every row, in key order
    operator = await asyncpg.connect(env.database_url)
    try:
        tx = operator.transaction()
        await tx.start()
        # The batch's session (deadlock_timeout 1 s) finds the deadlock first: it is the
        # one PostgreSQL rolls back.
        await operator.execute("SET LOCAL deadlock_timeout = '60s'")
        await operator.execute("UPDATE normalized_data SET title = 'operator' "
                               "WHERE source = 'items' AND source_id = 'k0900'")
        with capture_logs() as logs:
            run = asyncio.create_task(run_source(cfg, "items", full_refresh=True))
            deadline = time.monotonic() + 30
            while not await waiting_for_a_lock(pool):   # the batch waits for k0900
                assert time.monotonic() < deadline and not run.done(), "no lock wait"
                await asyncio.sleep(0.02)
            # ... and the operator now wants k0001, which the batch holds
            await operator.execute("UPDATE normalized_data SET title = 'operator' "
                                   "WHERE source = 'items' AND source_id = 'k0001'")
            await tx.commit()
            row = await asyncio.wait_for(run, 60)
    finally:
        await operator.close()
    assert row["status"] == "succeeded", row["error"]
    assert (row["rows_read"], row["rows_valid"], row["rows_rejected"]) == (1000, 1000, 0)
    again = [e for e in logs if "rolled back by the database" in e["event"]]
    assert [(e["sqlstate"], e["attempt"]) for e in again] == [("40P01", 1)]
    # The batch went again after the operator's commit: every row holds the file's title.
    titles = await pool.fetch("SELECT title, count(*) FROM normalized_data GROUP BY title")
    assert [tuple(t) for t in titles] == [("second", 1000)]
    state = await pool.fetchval("SELECT state FROM etl_checkpoints WHERE source = 'items'")
    assert state["line"] == 1001
    assert await pool.fetchval("SELECT count(*) FROM raw_csv_data") == 2000
