-- name: insert
-- A batch's rejects in one statement (one execution per row cost the database more than
-- the rows): an array per column, all of one length, in the rejects' order.
-- params: $1 run id, $2 source, $3 streams, $4 positions (JSON text), $5 records (JSON text
--         or NULL), $6 reasons, $7 rules, $8 fields, $9 source fields, $10 values
INSERT INTO etl_rejects (run_id, source, stream, position, record, reason, rule, field,
                         source_field, value)
SELECT $1, $2, stream, position::jsonb, record::jsonb, reason, rule, field, source_field, value
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::text[])
     AS r (stream, position, record, reason, rule, field, source_field, value)

-- name: take_open
-- The next open rejects of a source, locked until the transaction ends (a racing retry
-- skips them: each reject is loaded once).
-- params: $1 source, $2 after id, $3 limit, $4 run id (NULL: any), $5 reject ids (NULL: any)
SELECT id, stream, position, record FROM etl_rejects
WHERE source = $1 AND status = 'open' AND id > $2
  AND ($4::bigint IS NULL OR run_id = $4) AND ($5::bigint[] IS NULL OR id = ANY ($5))
ORDER BY id
LIMIT $3
FOR UPDATE SKIP LOCKED

-- name: resolve
-- Rejects loaded by a retry run.
-- params: $1 reject ids, $2 the retry run
UPDATE etl_rejects SET status = 'resolved', status_changed_at = now(), resolved_run_id = $2
WHERE id = ANY ($1::bigint[]) AND status = 'open'

-- name: still_open
-- A retried reject that is still invalid: why, under the current rules.
-- params: $1 id, $2 reason, $3 rule, $4 field, $5 source field, $6 value
UPDATE etl_rejects SET reason = $2, rule = $3, field = $4, source_field = $5, value = $6
WHERE id = $1

-- name: ignore
-- Open rejects nobody will fix.
-- params: $1 source, $2 run id (NULL: any), $3 reject ids (NULL: any)
UPDATE etl_rejects SET status = 'ignored', status_changed_at = now()
WHERE source = $1 AND status = 'open'
  AND ($2::bigint IS NULL OR run_id = $2) AND ($3::bigint[] IS NULL OR id = ANY ($3))
