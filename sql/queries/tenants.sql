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
SELECT etlsvc_visible(true)

-- name: sync_shares
-- The shares the config makes: ($1 source, $2 subscriber, $3 JSON array of each one's
-- fields, null: all). A config share no longer in the config goes; one made by the API
-- stays, unless the config now makes it.
WITH wanted AS (
    SELECT source, subscriber,
           CASE WHEN ($3::jsonb) -> (ord - 1)::int = 'null' THEN NULL
                ELSE ARRAY(SELECT jsonb_array_elements_text(($3::jsonb) -> (ord - 1)::int))
           END AS fields
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(source, subscriber, ord)
), gone AS (
    DELETE FROM etl_shares h
    WHERE h.origin = 'config'
      AND NOT EXISTS (SELECT 1 FROM wanted w
                      WHERE w.source = h.source AND w.subscriber = h.subscriber)
)
INSERT INTO etl_shares AS h (source, subscriber, fields, origin)
SELECT source, subscriber, fields, 'config' FROM wanted
ON CONFLICT (source, subscriber) DO UPDATE SET fields = EXCLUDED.fields, origin = 'config'

-- name: shares
-- Every share, for each replica's cache (who sees which fields of which dataset).
SELECT source, subscriber, fields FROM etl_shares

-- name: share
-- Publish source $1 (of tenant $4) to tenant $2 with fields $3 (null: all).
INSERT INTO etl_shares AS h (source, subscriber, fields, origin)
SELECT $1, $2, $3, 'api' FROM etl_sources WHERE source = $1 AND tenant = $4
ON CONFLICT (source, subscriber) DO UPDATE SET fields = EXCLUDED.fields
RETURNING source, subscriber, fields, origin, created_at

-- name: unshare
-- Withdraw source $1 (of tenant $3) from tenant $2, if the API published it.
DELETE FROM etl_shares h USING etl_sources e
WHERE h.source = $1 AND h.subscriber = $2 AND e.source = h.source AND e.tenant = $3
  AND h.origin = 'api'
RETURNING h.source, h.subscriber

-- name: list_shares
-- The shares of tenant $1's datasets, and those made to it.
SELECT h.source, e.tenant AS owner, h.subscriber, h.fields, h.origin, h.created_at
FROM etl_shares h JOIN etl_sources e USING (source)
WHERE e.tenant = $1 OR h.subscriber = $1
ORDER BY h.source, h.subscriber
