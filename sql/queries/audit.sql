-- name: add
INSERT INTO etl_audit (tenant, actor, action, target, outcome, status, request_id, client,
                       details)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)

-- name: page
-- The audit log of the caller's tenant (row-level security), newest first, before id $1,
-- optionally of one action ($3) or actor ($4).
SELECT id, at, tenant, actor, action, target, outcome, status, request_id, client, details
FROM etl_audit
WHERE id < $1 AND ($3::text IS NULL OR action = $3) AND ($4::text IS NULL OR actor = $4)
ORDER BY id DESC
LIMIT $2
