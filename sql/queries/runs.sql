-- name: start
-- params: $1 source, $2 kind, $3 trigger, $4 full refresh, $5 host, $6 pid
INSERT INTO etl_runs (source, kind, trigger, full_refresh, host, pid)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id

-- name: running_of
-- The running runs of a source (backfills' if $3, else the others), and whether their
-- heartbeat is older than $2 seconds.
-- params: $1 source, $2 seconds, $3 backfill runs
SELECT id, host, pid, heartbeat_at < now() - make_interval(secs => $2) AS stale
FROM etl_runs WHERE source = $1 AND status = 'running' AND (trigger = 'backfill') = $3

-- name: interrupt
-- A run whose process is gone (the caller holds the source's lock).
-- params: $1 run id
UPDATE etl_runs SET status = 'interrupted', finished_at = now(),
       finished_snapshot = pg_current_snapshot(),
       error = format('interrupted: its process (pid %s on %s) stopped before finishing it; '
                      'last heartbeat at %s', coalesce(pid::text, '?'), coalesce(host, '?'),
                      heartbeat_at)
WHERE id = $1 AND status = 'running'
RETURNING id

-- name: stopped
-- Runs this process cancelled at shutdown (each batch committed or rolled back whole).
-- params: $1 run ids
UPDATE etl_runs SET status = 'interrupted', finished_at = now(),
       finished_snapshot = pg_current_snapshot(),
       error = 'interrupted: the service stopped before the run finished; the next run '
               'resumes from the last committed batch'
WHERE id = ANY($1::bigint[]) AND status = 'running'
RETURNING id

-- name: running_all
-- Every running run, and whether its heartbeat is older than $1 seconds.
SELECT id, source, trigger = 'backfill' AS backfill, host, pid,
       heartbeat_at < now() - make_interval(secs => $1) AS stale
FROM etl_runs WHERE status = 'running'

-- name: heartbeat
-- params: $1 run id
UPDATE etl_runs SET heartbeat_at = now() WHERE id = $1 AND status = 'running'

-- name: resume
-- A run that lost its connection and got it back: running again, counters as committed.
-- params: $1 run id
UPDATE etl_runs SET status = 'running', finished_at = NULL, error = NULL, heartbeat_at = now()
WHERE id = $1
RETURNING *

-- name: this_tick
-- The source's last scheduled run, if it started less than $2 seconds ago.
-- params: $1 source, $2 seconds
SELECT id FROM (
    SELECT id, started_at FROM etl_runs WHERE source = $1 AND trigger = 'schedule'
    ORDER BY id DESC LIMIT 1
) AS last
WHERE started_at > now() - make_interval(secs => $2)

-- name: running
-- params: $1 source, $2 backfill runs (else the others)
SELECT id FROM etl_runs
WHERE source = $1 AND status = 'running' AND (trigger = 'backfill') = $2
ORDER BY id DESC LIMIT 1

-- name: set_total
-- params: $1 run id, $2 bytes to read
UPDATE etl_runs SET bytes_total = $2 WHERE id = $1

-- name: add
-- Counters of one committed batch, in the batch's transaction.
-- params: $1 run id, $2 read, $3 valid, $4 rejected, $5 inserted, $6 updated, $7 unchanged,
--         $8 bytes, $9 pages, $10 lines, $11 deleted
UPDATE etl_runs SET rows_read = rows_read + $2, rows_valid = rows_valid + $3,
       rows_rejected = rows_rejected + $4, rows_inserted = rows_inserted + $5,
       rows_updated = rows_updated + $6, rows_unchanged = rows_unchanged + $7,
       bytes_read = bytes_read + $8, pages_read = pages_read + $9,
       lines_read = lines_read + $10, rows_deleted = rows_deleted + $11, heartbeat_at = now()
WHERE id = $1

-- name: finish
-- The snapshot of the finish sees every batch the run committed: the moment a rollback
-- to the run goes back to (sql/migrations/0016_versions.sql).
-- params: $1 run id, $2 status, $3 error text
UPDATE etl_runs SET status = $2, error = $3, finished_at = now(),
       finished_snapshot = pg_current_snapshot()
WHERE id = $1
RETURNING *

-- name: get
-- params: $1 run id
SELECT * FROM etl_runs WHERE id = $1

-- name: note
-- params: $1 run id, $2 notes (jsonb, merged into the run's notes)
UPDATE etl_runs SET notes = notes || $2 WHERE id = $1

-- name: history
-- The source's recent successful runs that read something, before run $2, newest first:
-- the baseline an anomaly is judged against (retries and replays are not loads).
-- params: $1 source, $2 run id, $3 how many
SELECT rows_read, rows_rejected,
       extract(epoch FROM finished_at - started_at)::float8 AS seconds
FROM etl_runs
WHERE source = $1 AND id < $2 AND status = 'succeeded' AND rows_read > 0
  AND trigger IN ('manual', 'schedule', 'startup', 'stream')
ORDER BY id DESC
LIMIT $3

-- name: flag_anomaly
-- params: $1 run id, $2 anomaly (jsonb)
UPDATE etl_runs SET anomaly = $2 WHERE id = $1
