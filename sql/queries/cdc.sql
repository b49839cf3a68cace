-- Statements of the change kinds (pg_cdc, mysql_cdc) that no other kind needs; the write
-- path (load/write.py) runs them in a batch's transaction. {raw_table} and {stream_column}
-- are the kind's.

-- name: clear
-- A TRUNCATE of source tables: every normalized row of the source that came from them
-- leaves (its tombstone is left by the delete trigger).
-- params: $1 source, $2 streams (text[]: the tables)
WITH gone AS (
    DELETE FROM normalized_data n USING {raw_table} r
    WHERE n.source = $1 AND n.raw_table = '{raw_table}' AND r.id = n.raw_id
      AND r.{stream_column} = ANY ($2::text[])
    RETURNING 1
)
SELECT count(*) FROM gone

-- name: sweep_plan
-- Before a sweep, in its transaction: no nested loops. Right after a snapshot's COPY the
-- statistics still say the tables are small, and a nested loop over the join below took
-- minutes for 50,000 rows on a fresh PostgreSQL 18; hash joins are linear whatever the
-- statistics say.
SET LOCAL enable_nestloop = off

-- name: sweep
-- A table's snapshot is complete: its normalized rows whose key the snapshot did not read
-- (nor rejected, in this run) are gone from the source and leave. Only a snapshot that
-- restarted (after a crash, or a slot made again) can find any.
-- params: $1 source, $2 stream (the table), $3 snapshot id, $4 run id,
--         $5 JSON path of source_id (text[])
-- EXCEPT, not NOT EXISTS: right after a snapshot's COPY the statistics still say the tables
-- are small, and the planner's nested anti-join took 40 s for 20,000 rows; a set operation
-- is linear whatever the statistics say.
WITH gone AS (
    DELETE FROM normalized_data n
    WHERE n.source = $1 AND n.source_id IN (
        SELECT o.source_id FROM normalized_data o JOIN {raw_table} r ON r.id = o.raw_id
        WHERE o.source = $1 AND o.raw_table = '{raw_table}' AND r.{stream_column} = $2
        EXCEPT
        SELECT k.source_key FROM {raw_table} k
        WHERE k.source = $1 AND k.snapshot = $3 AND k.{stream_column} = $2
        EXCEPT
        SELECT j.record #>> $5::text[] FROM etl_rejects j
        WHERE j.run_id = $4 AND j.source = $1 AND j.stream = $2)
    RETURNING 1
)
SELECT count(*) FROM gone
