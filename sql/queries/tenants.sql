-- name: sync_sources
-- Each configured source's tenant, description and tags (0017_tenants.sql). A source the
-- config no longer names keeps its row: its data stays its tenant's.
-- params: $1 sources (text[]), $2 tenants (text[]), $3 descriptions (text[]), $4 tags (JSON
--         array of text arrays, one per source)
INSERT INTO etl_sources AS s (source, tenant, description, tags)
SELECT source, tenant, description,
       ARRAY(SELECT jsonb_array_elements_text(($4::jsonb) -> (ord - 1)::int))
FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(source, tenant, description, ord)
ON CONFLICT (source) DO UPDATE SET
    tenant = EXCLUDED.tenant, description = EXCLUDED.description, tags = EXCLUDED.tags,
    configured_at = now()

-- name: readable
-- The sources the transaction's caller may read (row-level security's own answer).
SELECT etlsvc_readable()
