-- name: read
-- params: $1 source
SELECT stream, state, run_id FROM etl_checkpoints WHERE source = $1

-- name: write
-- params: $1 source, $2 stream, $3 state (jsonb), $4 run id
INSERT INTO etl_checkpoints (source, stream, state, run_id) VALUES ($1, $2, $3, $4)
ON CONFLICT (source, stream) DO UPDATE
    SET state = EXCLUDED.state, run_id = EXCLUDED.run_id, updated_at = now(),
        changed_xid = pg_current_xact_id()


-- name: forget
-- Every checkpoint of a source: its next run starts from the beginning (a change source:
-- with a new slot and snapshot, after `etlsvc cdc drop-slot`).
-- params: $1 source
DELETE FROM etl_checkpoints WHERE source = $1
