-- name: insert
-- params: $1 run id, $2 source, $3 stream, $4 position (jsonb), $5 record (jsonb), $6 reason,
--         $7 rule, $8 field, $9 source field, $10 value
INSERT INTO etl_rejects (run_id, source, stream, position, record, reason, rule, field,
                         source_field, value)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
