-- name: raw_chunk
-- The next raw rows of a source, with their stream and position as a reject holds them.
-- {raw_table}, {stream_column}, {position}: the kind's (extract/<kind>.py).
-- params: $1 source, $2 raw ids above, $3 limit
SELECT id, {stream_column} AS stream, {position} AS position, record
FROM {raw_table} WHERE source = $1 AND id > $2 ORDER BY id LIMIT $3

-- name: keys_table
-- The natural keys the replayed raw rows produce, to find the normalized rows none does.
CREATE TEMP TABLE replay_keys (key text PRIMARY KEY) ON COMMIT DROP

-- name: keep_keys
-- The keys of a chunk's raw rows that were normalized (not skipped as rejects).
-- params: $1 source, $2 raw ids above, $3 raw ids up to, $4 path of source_id,
--         $5 raw ids skipped (bigint[])
INSERT INTO replay_keys
SELECT DISTINCT record #>> $4::text[] FROM {raw_table}
WHERE source = $1 AND id > $2 AND id <= $3 AND id <> ALL ($5::bigint[])
ON CONFLICT DO NOTHING

-- name: delete_stale
-- Normalized rows of the source whose key no raw row produces any more.
-- params: $1 source
DELETE FROM normalized_data n
WHERE n.source = $1 AND NOT EXISTS (SELECT 1 FROM replay_keys k WHERE k.key = n.source_id)
