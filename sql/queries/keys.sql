-- name: make_hash_key
-- The key of the API keys' hash, made once per database (0019_keys_audit_usage.sql).
INSERT INTO etl_secrets (name, value) VALUES ('key_hash', $1) ON CONFLICT DO NOTHING

-- name: hash_key
SELECT value FROM etl_secrets WHERE name = 'key_hash'

-- name: create
INSERT INTO etl_api_keys (tenant, name, scope, sources, hidden_fields, digest, expires_at,
                          created_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING *

-- name: list
-- A tenant's keys ($1; NULL: every tenant's), newest first.
SELECT * FROM etl_api_keys WHERE $1::text IS NULL OR tenant = $1 ORDER BY id DESC

-- name: rotate
-- A new secret for live key $1 (of tenant $2; NULL: any); the current one stays valid for
-- $4 seconds.
UPDATE etl_api_keys
SET previous_digest = digest, digest = $3,
    previous_until = now() + make_interval(secs => $4), rotated_at = now()
WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) AND revoked_at IS NULL
RETURNING *

-- name: revoke
UPDATE etl_api_keys SET revoked_at = now(), previous_digest = NULL, previous_until = NULL
WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) AND revoked_at IS NULL
RETURNING *

-- name: generation
SELECT n FROM etl_key_changes

-- name: live
-- Keys that may still let a request in (expiry is checked at each request).
SELECT id, tenant, name, scope, sources, hidden_fields, digest, expires_at,
       CASE WHEN previous_until > now() THEN previous_digest END AS previous_digest,
       previous_until
FROM etl_api_keys
WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())

-- name: used
-- When keys $1 were last used ($2), never moving back (replicas write theirs apart).
UPDATE etl_api_keys k SET last_used_at = greatest(k.last_used_at, u.at)
FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, at)
WHERE k.id = u.id
