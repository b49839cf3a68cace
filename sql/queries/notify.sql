-- name: record
-- A new event, held by this sender for $7 seconds; no row when the same one (once_key) was
-- recorded already.
-- params: $1 event, $2 source, $3 run id, $4 once key, $5 summary, $6 details (jsonb),
--         $7 seconds
INSERT INTO etl_notifications (event, source, run_id, once_key, summary, details, due_at)
VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
ON CONFLICT (once_key) DO NOTHING
RETURNING id, created_at

-- name: delivered
-- params: $1 id, $2 outcomes (text[])
UPDATE etl_notifications SET outcomes = $2, due_at = NULL WHERE id = $1

-- name: release
-- Deliveries cut short at shutdown: due for the next sender now.
-- params: $1 ids (bigint[])
UPDATE etl_notifications SET due_at = now() WHERE id = ANY($1) AND outcomes IS NULL

-- name: take_undelivered
-- Up to 100 notifications whose delivery no live sender holds, each held by this one for $1
-- seconds (replicas that look at once take different rows).
-- params: $1 seconds
UPDATE etl_notifications n SET due_at = now() + make_interval(secs => $1)
FROM (SELECT id FROM etl_notifications
      WHERE outcomes IS NULL AND due_at <= now()
      ORDER BY due_at, id LIMIT 100
      FOR UPDATE SKIP LOCKED) due
WHERE n.id = due.id
RETURNING n.id, n.event, n.source, n.run_id, n.summary, n.details, n.created_at
