-- name: insert
-- params: $1 run id, $2 source, $3 stream, $4 position (jsonb), $5 record (jsonb), $6 reason
INSERT INTO etl_rejects (run_id, source, stream, position, record, reason)
VALUES ($1, $2, $3, $4, $5, $6)
