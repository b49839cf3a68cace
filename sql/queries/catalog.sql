-- name: datasets
-- The datasets the caller may read (row-level security on etl_sources) with their
-- figures: rows, the last write (freshness), and from the publisher's runs
-- (etlsvc_dataset_figures, 0019_keys_audit_usage.sql) the last successful load, the share
-- of records rejected over 7 days and the schema changes of the last 10 runs that had any.
SELECT e.source, e.tenant AS owner, e.description, e.tags,
       (SELECT count(*) FROM normalized_data n WHERE n.source = e.source) AS rows,
       (SELECT max(n.updated_at) FROM normalized_data n WHERE n.source = e.source)
           AS freshness,
       f.last_success, f.reject_rate_7d, f.schema_changes
FROM etl_sources e
LEFT JOIN etlsvc_dataset_figures() f USING (source)
ORDER BY e.source
