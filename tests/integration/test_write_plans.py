"""The write path's statements keep their plans when the statistics know nothing of a
source: a source loaded since the last ANALYZE is estimated at one row, and a plan made
for one row that meets forty thousand turned one batch of a backfill into minutes."""

from __future__ import annotations

from typing import Any

import asyncpg

from etlsvc.extract import pg_cdc
from etlsvc.load import normalize

ROWS = 20_000


def scans(plan: dict[str, Any]) -> list[tuple[str, str | None, int]]:
    """(node type, index, times run) of every scan of normalized_data in ``plan``."""
    found = []
    if plan.get("Relation Name") == "normalized_data" and "Scan" in plan["Node Type"]:
        found.append((plan["Node Type"], plan.get("Index Name"), plan["Actual Loops"]))
    for child in plan.get("Plans", ()):
        found += scans(child)
    return found


async def test_a_change_kinds_deletes_look_each_key_up_whatever_the_statistics_say(
    pool: asyncpg.Pool
) -> None:
    """1,000 deletes of a source the statistics have not seen yet: each key is one lookup
    in the unique index, and normalized_data is never scanned by source."""
    await pool.execute(f"""
        INSERT INTO normalized_data (kind, source, source_id, raw_table, raw_id, run_id)
        SELECT 'csv', 'old', 'k' || g, 'raw_csv_data', g, 0 FROM generate_series(1, {ROWS}) g;
        ANALYZE normalized_data;
        INSERT INTO normalized_data (kind, source, source_id, raw_table, raw_id, run_id)
        SELECT 'pg_cdc', 'new', g::text, 'raw_pg_cdc_data', g, 0
        FROM generate_series(1, {ROWS}) g;
        INSERT INTO raw_pg_cdc_data (run_id, source, relation, lsn, seq, op, snapshot,
                                     source_key, record, xid)
        SELECT 0, 'new', 'public.items', g, 0, 3, 0, g::text,
               jsonb_build_object('id', g), 1000 + g
        FROM generate_series(5001, 6000) g""")
    statement = normalize.kind_sql("normalize", "mark_gone", pg_cdc.KIND).replace(
        "{this_transaction}", "")
    async with pool.acquire() as conn:
        [plan] = await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, "new", 0, 2**62, [], ["id"])
        marked = await conn.fetchval(
            "SELECT count(*) FROM normalized_data WHERE source = 'new' AND "
            "source_version IS NOT NULL")
    assert marked == 1000
    assert sorted({(node, index) for node, index, _ in scans(plan["Plan"])}) == [
        ("Index Scan", "normalized_data_pkey"), ("Index Scan", "normalized_data_source_key")]


async def test_a_backfills_left_alone_rows_are_found_by_key_whatever_the_statistics_say(
    pool: asyncpg.Pool
) -> None:
    """A backfill batch's 1,000 raw rows of a source the statistics have not seen yet, each
    checked against its live row: one lookup in the unique index each, never a scan of
    the source's rows."""
    await pool.execute(f"""
        INSERT INTO normalized_data (kind, source, source_id, raw_table, raw_id, run_id)
        SELECT 'csv', 'old', 'k' || g, 'raw_csv_data', g, 0 FROM generate_series(1, {ROWS}) g;
        ANALYZE normalized_data;
        INSERT INTO normalized_data (kind, source, source_id, raw_table, raw_id, run_id,
                                     source_version)
        SELECT 'pg_cdc', 'new', g::text, 'raw_pg_cdc_data', g, 0, 5000000 + g
        FROM generate_series(1, {ROWS}) g""")
    async with pool.acquire() as conn, conn.transaction():
        # The batch's raw rows are this transaction's (as a batch's are).
        await conn.execute("""
            INSERT INTO raw_pg_cdc_data (run_id, source, relation, lsn, seq, op, snapshot,
                                         source_key, record, xid)
            SELECT 0, 'new', 'public.items', g, 0, 1, 0, g::text,
                   jsonb_build_object('id', g), 1000 + g
            FROM generate_series(5001, 6000) g""")
        read_point = await conn.fetchval("SELECT pg_current_snapshot()::text")
        [plan] = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " +
                                     normalize.drop_unseen_sql(pg_cdc.KIND),
                                     "new", 0, ["id"], read_point)
        left = await conn.fetchval("SELECT count(*) FROM raw_pg_cdc_data")
    # The live rows' versions are newer than the read point: every raw row leaves.
    assert left == 0
    assert {(node, index) for node, index, _ in scans(plan["Plan"])} == {
        ("Index Scan", "normalized_data_source_key")}
