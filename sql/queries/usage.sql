-- name: add
-- Add counts: $1 days, $2 tenants, $3 key names, $4 sources, $5 requests, $6 rows.
INSERT INTO etl_usage AS u (day, tenant, key_name, source, requests, rows)
SELECT * FROM unnest($1::date[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                     $6::bigint[])
ON CONFLICT (day, source, tenant, key_name) DO UPDATE
SET requests = u.requests + EXCLUDED.requests, rows = u.rows + EXCLUDED.rows

-- name: page
-- What the caller may see of the counts (row-level security: its datasets' consumers, its
-- own keys' consumption) over the last $1 days, of source $2 (null: all).
SELECT u.day, u.source, e.tenant AS owner, u.tenant, u.key_name, u.requests, u.rows
FROM etl_usage u LEFT JOIN etl_sources e USING (source)
WHERE u.day > current_date - $1::int AND ($2::text IS NULL OR u.source = $2)
ORDER BY u.day DESC, u.source, u.tenant, u.key_name
