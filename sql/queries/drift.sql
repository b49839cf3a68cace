-- name: known
-- A source's known shape: each column with the type it was last seen with, in any stream.
-- params: $1 source
SELECT DISTINCT ON (name) name, type FROM etl_schema_columns
WHERE source = $1
ORDER BY name, last_seen_at DESC

-- name: record
-- The shape a committed batch showed (what its policy accepted).
-- params: $1 source, $2 stream, $3 run id, $4 names (text[]), $5 types (text[])
INSERT INTO etl_schema_columns AS s (source, stream, name, type, first_run_id, last_run_id)
SELECT $1, $2, c.name, c.type, $3, $3 FROM unnest($4::text[], $5::text[]) AS c (name, type)
ON CONFLICT (source, stream, name) DO UPDATE
SET type = EXCLUDED.type, last_run_id = EXCLUDED.last_run_id, last_seen_at = now()
WHERE (s.type, s.last_run_id) IS DISTINCT FROM (EXCLUDED.type, EXCLUDED.last_run_id)

-- name: forget
-- Columns a stream no longer has, once its policy accepted that (evolve).
-- params: $1 source, $2 stream, $3 names it has (text[])
DELETE FROM etl_schema_columns WHERE source = $1 AND stream = $2 AND name <> ALL ($3::text[])
