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
