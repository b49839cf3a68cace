-- name: raw_upto
-- The highest raw id of a table ingested before the cutoff (its BRIN index finds the old
-- ranges): purging walks ids up to it, never past it.
-- params: $1 cutoff
SELECT max(id) FROM {raw_table} WHERE ingested_at < $1

-- name: purge_raw
-- One batch: the next raw rows of a source ingested before the cutoff, minus those a
-- normalized row still points at (its lineage), deleted. The raw_id BRIN index of
-- normalized_data finds the pointers into the batch's id range.
-- params: $1 source, $2 after id, $3 up to id, $4 cutoff, $5 batch rows
WITH doomed AS (
    SELECT id FROM {raw_table}
    WHERE id > $2 AND id <= $3 AND source = $1 AND ingested_at < $4
    ORDER BY id
    LIMIT $5
), bounds AS (
    SELECT min(id) AS lo, max(id) AS hi FROM doomed
), gone AS (
    DELETE FROM {raw_table} r
    WHERE r.id IN (SELECT id FROM doomed
                   EXCEPT
                   SELECT n.raw_id FROM normalized_data n, bounds b
                   WHERE n.raw_id BETWEEN b.lo AND b.hi AND n.raw_table = '{raw_table}')
    RETURNING 1
)
SELECT (SELECT hi FROM bounds) AS last, (SELECT count(*) FROM gone) AS deleted

-- name: purge_rejects
-- One batch of a source's rejects created before the cutoff.
-- params: $1 source, $2 cutoff, $3 batch rows
WITH gone AS (
    DELETE FROM etl_rejects WHERE id IN (
        SELECT id FROM etl_rejects WHERE source = $1 AND created_at < $2
        ORDER BY id LIMIT $3)
    RETURNING 1
)
SELECT count(*) FROM gone
