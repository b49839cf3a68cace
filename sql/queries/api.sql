-- name: data_page
-- Keyset page of normalized_data in id order. The placeholder after "id > $1" becomes the
-- conditions of the filters a request gives (data_filters), so each combination is its own
-- statement with its own plan, instead of one catch-all whose cached plan fits some filters
-- and not others.
-- params: $1 after id, $2 limit, then one per filter given
SELECT id, kind, source, source_id, title, description, category, amount::text AS amount, url,
       tags, event_time, created_at, updated_at
FROM normalized_data
WHERE id > $1{filters}
ORDER BY id
LIMIT $2

-- name: data_window
-- A page with a range filter (event_from, event_to, updated_since). "ORDER BY id LIMIT"
-- makes the planner walk the primary key hoping to meet matching rows early; a recent window
-- sits at the end, and the walk reads the whole table. Here the matching ids are found
-- first, by whichever index suits (BRIN for a narrow window), at most 20,001 of them, then
-- sorted. When there are more, routes.py runs data_page instead: matches are dense then,
-- and the walk meets them early.
-- params: as data_page
WITH matching AS MATERIALIZED (
    SELECT id FROM normalized_data WHERE id > $1{filters} LIMIT 20001
)
SELECT id, kind, source, source_id, title, description, category, amount::text AS amount, url,
       tags, event_time, created_at, updated_at, (SELECT count(*) FROM matching) AS matching
FROM normalized_data
WHERE id IN (SELECT id FROM matching ORDER BY id LIMIT $2)
ORDER BY id

-- name: kind_sources
-- The sources with rows of a kind (data_versions lists each pair once).
-- params: $1 kind
SELECT source FROM data_versions WHERE kind = $1 ORDER BY source

-- name: data_by_kind
-- One source's part of a page filtered by kind, without source. kind has no index of its own
-- (three values): the page is the union of such parts, one per source with rows of that
-- kind, each a range of the (source, id) index (routes.data_by_kind_sql).
-- params: as data_page; {source}: the parameter of the source
SELECT id, kind, source, source_id, title, description, category, amount::text AS amount, url,
       tags, event_time, created_at, updated_at
FROM normalized_data
WHERE source = {source} AND id > $1{filters}
ORDER BY id
LIMIT $2

-- name: data_filters
-- The filters of GET /data: one per line, its name and then its condition ({n}: the number
-- of its parameter). Indexes: (source, id) and (category, id) B-trees, BRIN on event_time
-- and updated_at (see sql/migrations/0004_read_indexes.sql); kind goes through its sources
-- (data_by_kind).
source          source = ${n}
kind            kind = ${n}
category        category = ${n}
event_from      event_time >= ${n}
event_to        event_time < ${n}
updated_since   updated_at >= ${n}

-- name: changes
-- A page of the change feed: rows written and tombstones left after the position ($1, $2),
-- in (xid, id) order, only below the horizon: the xmin of this statement's snapshot, under
-- which every transaction has ended (committed and visible here, or rolled back). One row
-- even when nothing is new (change columns null), to give the horizon and the retention
-- limits (the last tombstone pruned; with $4, the versions purged). A row's op is "insert"
-- when it was created by the transaction that last wrote it.
-- With $4 (GET /data/changes?versions=all) the replaced versions too
-- (sql/migrations/0016_versions.sql), each at the position of the transaction that wrote
-- it: a version is first the current row and later a replaced one, at the same position,
-- so it comes once. Without, that part is a one-time filter that reads nothing.
-- params: $1 after xid, $2 after id, $3 limit, $4 every version (boolean)
WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xid)
SELECT h.xid AS horizon, f.pruned_xid, f.pruned_id,
       CASE WHEN $4 THEN (SELECT max(purged_xid) FROM data_history_settings)
       END AS versions_pruned_xid, c.*
FROM horizon h LEFT JOIN LATERAL (
    SELECT * FROM (
        (SELECT n.changed_xid AS xid, n.id,
                CASE WHEN n.created_at = n.updated_at THEN 'insert' ELSE 'update' END AS op,
                n.updated_at AS at, n.kind, n.source, n.source_id, n.title, n.description,
                n.category, n.amount::text AS amount, n.url, n.tags, n.event_time,
                n.created_at, n.updated_at
         FROM normalized_data n
         WHERE (n.changed_xid, n.id) > ($1::xid8, $2::bigint) AND n.changed_xid < h.xid
         ORDER BY n.changed_xid, n.id
         LIMIT $3)
        UNION ALL
        (SELECT v.from_xid, v.id,
                CASE WHEN v.created_at = v.updated_at THEN 'insert' ELSE 'update' END,
                v.updated_at, v.kind, v.source, v.source_id, v.title, v.description,
                v.category, v.amount::text, v.url, v.tags, v.event_time,
                v.created_at, v.updated_at
         FROM data_history v
         WHERE $4::boolean
           AND (v.from_xid, v.id) > ($1::xid8, $2::bigint) AND v.from_xid < h.xid
         ORDER BY v.from_xid, v.id
         LIMIT $3)
        UNION ALL
        (SELECT t.xid, t.id, 'delete', t.deleted_at, t.kind, t.source, t.source_id,
                NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
         FROM data_tombstones t
         WHERE (t.xid, t.id) > ($1::xid8, $2::bigint) AND t.xid < h.xid
         ORDER BY t.xid, t.id
         LIMIT $3)
    ) u
    ORDER BY xid, id
    LIMIT $3
) c ON true
LEFT JOIN data_feed_state f ON true

-- name: feed_head
-- The feed's head: every transaction below this xid has ended.
SELECT pg_snapshot_xmin(pg_current_snapshot())

-- name: prune_tombstones
-- Drop tombstones older than the retention; remember the last one dropped.
-- params: $1 retention (interval)
WITH pruned AS (
    DELETE FROM data_tombstones WHERE deleted_at < now() - $1::interval RETURNING xid, id
)
INSERT INTO data_feed_state AS s (pruned_xid, pruned_id)
SELECT xid, id FROM pruned ORDER BY xid DESC, id DESC LIMIT 1
ON CONFLICT (one) DO UPDATE SET pruned_xid = EXCLUDED.pruned_xid, pruned_id = EXCLUDED.pruned_id
    WHERE (EXCLUDED.pruned_xid, EXCLUDED.pruned_id) > (s.pruned_xid, s.pruned_id)

-- name: data_version
-- Which data /data pages are read from: the sum of the write counters.
SELECT coalesce(sum(version), 0)::bigint FROM data_versions

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
-- Per source: its latest load and latest successful load (a load reads its upstream: a reject
-- retry or a replay is not one, so it neither clears a failing source nor makes one fresh),
-- whether that successful load was anomalous (runtime/anomalies.py), the run of any kind
-- running now, and the database's clock, by which every replica judges freshness. Every
-- tenant's sources (0017_tenants.sql).
SELECT * FROM etlsvc_source_states()

-- name: source_stats
-- Per source: rows in normalized_data, runs, successes, records read and rejected, the
-- throughput of the last successful load (not a reject retry nor a replay, which read a
-- handful of rows), and the schema drift of the last run that had any.
SELECT s.source,
       (SELECT d.notes -> 'drift' FROM etl_runs d
         WHERE d.source = s.source AND d.notes ? 'drift'
         ORDER BY d.id DESC LIMIT 1) AS last_drift,
       (SELECT count(*) FROM normalized_data n WHERE n.source = s.source) AS rows,
       count(*) AS runs,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       sum(rows_read)::bigint AS rows_read, sum(rows_rejected)::bigint AS rows_rejected,
       max(id) AS last_run_id,
       (SELECT round(r.rows_read / greatest(extract(epoch FROM r.finished_at - r.started_at), 0.001))
          FROM etl_runs r WHERE r.source = s.source AND r.status = 'succeeded'
           AND r.trigger IN ('manual', 'schedule', 'startup', 'stream')
          ORDER BY r.id DESC LIMIT 1) AS last_rows_per_s
FROM etl_runs s
GROUP BY s.source

-- name: rejects_page
-- params: $1 after id, $2 limit, $3 run id, $4 source, $5 status
SELECT id, run_id, source, stream, position, record, reason, rule, field, source_field, value,
       status, status_changed_at, resolved_run_id, created_at
FROM etl_rejects
WHERE id > $1 AND ($3::bigint IS NULL OR run_id = $3) AND ($4::text IS NULL OR source = $4)
  AND ($5::text IS NULL OR status = $5)
ORDER BY id
LIMIT $2

-- name: running_runs
-- Runs running now, in any process (the sweep closes those whose process is gone).
SELECT id AS run_id, source, host, pid, started_at, heartbeat_at FROM etl_runs
WHERE status = 'running' ORDER BY id
