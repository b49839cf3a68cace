-- name: data_page
-- Keyset page of normalized_data in id order. NULL filters are not applied.
-- params: $1 after id, $2 limit, $3 source, $4 kind, $5 category, $6 event time from,
--         $7 event time to, $8 updated since
SELECT id, kind, source, source_id, title, description, category, amount::text AS amount, url,
       tags, event_time, created_at, updated_at
FROM normalized_data
WHERE id > $1
  AND ($3::text IS NULL OR source = $3)
  AND ($4::text IS NULL OR kind = $4)
  AND ($5::text IS NULL OR category = $5)
  AND ($6::timestamptz IS NULL OR event_time >= $6)
  AND ($7::timestamptz IS NULL OR event_time < $7)
  AND ($8::timestamptz IS NULL OR updated_at >= $8)
ORDER BY id
LIMIT $2

-- name: data_one
-- params: $1 id
SELECT id, kind, source, source_id, title, description, category, amount::text AS amount, url,
       tags, event_time, created_at, updated_at, raw_table, raw_id, run_id
FROM normalized_data WHERE id = $1

-- name: runs_page
-- params: $1 before id (keyset, newest first), $2 limit, $3 source, $4 status
SELECT * FROM etl_runs
WHERE id < $1 AND ($3::text IS NULL OR source = $3) AND ($4::text IS NULL OR status = $4)
ORDER BY id DESC
LIMIT $2

-- name: last_runs
-- The latest run and the latest successful run of each source.
SELECT DISTINCT ON (source) source, id, status, started_at, finished_at, error,
       (SELECT max(finished_at) FROM etl_runs s
         WHERE s.source = r.source AND s.status = 'succeeded') AS last_success
FROM etl_runs r
ORDER BY source, id DESC

-- name: source_stats
-- Per source: rows in normalized_data, runs, successes, records read and rejected, and the
-- throughput of the last successful run.
SELECT s.source,
       (SELECT count(*) FROM normalized_data n WHERE n.source = s.source) AS rows,
       count(*) AS runs,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       sum(rows_read)::bigint AS rows_read, sum(rows_rejected)::bigint AS rows_rejected,
       max(id) AS last_run_id,
       (SELECT round(r.rows_read / greatest(extract(epoch FROM r.finished_at - r.started_at), 0.001))
          FROM etl_runs r WHERE r.source = s.source AND r.status = 'succeeded'
          ORDER BY r.id DESC LIMIT 1) AS last_rows_per_s
FROM etl_runs s
GROUP BY s.source

-- name: rejects_page
-- params: $1 after id, $2 limit, $3 run id, $4 source
SELECT id, run_id, source, stream, position, record, reason, created_at FROM etl_rejects
WHERE id > $1 AND ($3::bigint IS NULL OR run_id = $3) AND ($4::text IS NULL OR source = $4)
ORDER BY id
LIMIT $2

-- name: running_runs
-- Runs running now, in any process (the sweep closes those whose process is gone).
SELECT id AS run_id, source, host, pid, started_at, heartbeat_at FROM etl_runs
WHERE status = 'running' ORDER BY id
