-- name: read
-- params: $1 source
SELECT stream, state, run_id FROM etl_checkpoints WHERE source = $1

-- name: write
-- params: $1 source, $2 stream, $3 state (jsonb), $4 run id
INSERT INTO etl_checkpoints (source, stream, state, run_id) VALUES ($1, $2, $3, $4)
ON CONFLICT (source, stream) DO UPDATE
    SET state = EXCLUDED.state, run_id = EXCLUDED.run_id, updated_at = now()

