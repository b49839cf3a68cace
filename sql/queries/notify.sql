-- name: record
-- A new event; no row when the same one (once_key) was recorded already.
-- params: $1 event, $2 source, $3 run id, $4 once key, $5 summary, $6 details (jsonb)
INSERT INTO etl_notifications (event, source, run_id, once_key, summary, details)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (once_key) DO NOTHING
RETURNING id, created_at

-- name: delivered
-- params: $1 id, $2 outcomes (text[])
UPDATE etl_notifications SET outcomes = $2 WHERE id = $1
