-- name: datasets
-- The datasets the caller may read (row-level security on etl_sources) with their
-- figures: rows, the last write (freshness), the last successful load, the share of
-- records rejected over 7 days, and the schema changes of the last 10 runs that had any.
SELECT e.source, e.tenant AS owner, e.description, e.tags,
       (SELECT count(*) FROM normalized_data n WHERE n.source = e.source) AS rows,
       (SELECT max(n.updated_at) FROM normalized_data n WHERE n.source = e.source)
           AS freshness,
       (SELECT max(r.finished_at) FROM etl_runs r
         WHERE r.source = e.source AND r.status = 'succeeded'
           AND r.trigger IN ('manual', 'schedule', 'startup', 'stream')) AS last_success,
       (SELECT sum(r.rows_rejected)::float8 / nullif(sum(r.rows_read), 0) FROM etl_runs r
         WHERE r.source = e.source AND r.started_at > now() - interval '7 days')
           AS reject_rate_7d,
       (SELECT jsonb_agg(jsonb_build_object('run_id', d.id, 'at', d.finished_at,
                                            'changes', d.notes -> 'drift') ORDER BY d.id DESC)
          FROM (SELECT id, finished_at, notes FROM etl_runs
                 WHERE source = e.source AND notes ? 'drift'
                 ORDER BY id DESC LIMIT 10) d) AS schema_changes
FROM etl_sources e
ORDER BY e.source
