-- name: open_of
-- The source's backfill that is not finished (pending or running), if any.
-- params: $1 source
SELECT * FROM etl_backfills WHERE source = $1 AND status IN ('pending', 'running')
ORDER BY id LIMIT 1

-- name: creating
-- Held while a backfill is looked for and made: two requests at once make one.
-- params: $1 source
SELECT pg_advisory_xact_lock(hashtext('etlsvc:backfill-create:' || $1))

-- name: failed_same
-- The source's last failed backfill of this range: asked again, it goes on from there.
-- params: $1 source, $2 stream, $3 from, $4 to
SELECT * FROM etl_backfills
WHERE source = $1 AND status = 'failed' AND stream IS NOT DISTINCT FROM $2
  AND range_from IS NOT DISTINCT FROM $3 AND range_to IS NOT DISTINCT FROM $4
ORDER BY id DESC LIMIT 1

-- name: last_checkpoint
-- A backfill's latest checkpoint (its key: 'SOURCE#backfill:ID').
-- params: $1 checkpoint key
SELECT state FROM etl_checkpoints WHERE source = $1 ORDER BY updated_at DESC LIMIT 1

-- name: create
-- params: $1 source, $2 kind, $3 stream, $4 from, $5 to
INSERT INTO etl_backfills (source, kind, stream, range_from, range_to)
VALUES ($1, $2, $3, $4, $5)
RETURNING *

-- name: get
-- params: $1 backfill id
SELECT * FROM etl_backfills WHERE id = $1

-- name: list
-- Newest first; $1 a source (NULL: every source), at most $2.
SELECT * FROM etl_backfills WHERE $1::text IS NULL OR source = $1 ORDER BY id DESC LIMIT $2

-- name: open_all
-- Every backfill not finished: the service takes up those nobody is running.
SELECT * FROM etl_backfills WHERE status IN ('pending', 'running') ORDER BY id

-- name: started
-- A run of the backfill began (the first, or one going on after an interruption).
-- params: $1 backfill id, $2 run id
UPDATE etl_backfills SET status = 'running', run_id = $2, runs = array_append(runs, $2),
       error = NULL, updated_at = now()
WHERE id = $1

-- name: finished
-- params: $1 backfill id, $2 status, $3 error, $4 progress (jsonb)
UPDATE etl_backfills SET status = $2, error = $3, progress = $4, updated_at = now(),
       finished_at = now()
WHERE id = $1
RETURNING *

-- name: progress
-- Where a running backfill is: written beside its batches (best effort; each batch's own
-- checkpoint is what it resumes from).
-- params: $1 backfill id, $2 progress (jsonb)
UPDATE etl_backfills SET progress = $2, updated_at = now() WHERE id = $1 AND status = 'running'

-- name: cancel
-- Asks a running backfill to stop (it looks every second); one nobody runs ends now.
-- params: $1 backfill id, $2 nobody runs it
UPDATE etl_backfills
SET cancel = true, updated_at = now(),
    status = CASE WHEN $2 THEN 'cancelled' ELSE status END,
    finished_at = CASE WHEN $2 THEN now() ELSE finished_at END
WHERE id = $1 AND status IN ('pending', 'running')
RETURNING *

-- name: cancel_asked
-- params: $1 backfill id
SELECT cancel FROM etl_backfills WHERE id = $1

-- name: counts
-- The counters of all the backfill's runs together.
-- params: $1 run ids (bigint[])
SELECT coalesce(sum(rows_read), 0)::bigint AS rows_read,
       coalesce(sum(rows_inserted), 0)::bigint AS rows_inserted,
       coalesce(sum(rows_updated), 0)::bigint AS rows_updated,
       coalesce(sum(rows_unchanged), 0)::bigint AS rows_unchanged,
       coalesce(sum(rows_rejected), 0)::bigint AS rows_rejected
FROM etl_runs WHERE id = ANY ($1::bigint[])
