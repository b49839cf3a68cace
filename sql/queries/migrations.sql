-- name: create_table
CREATE TABLE IF NOT EXISTS etl_schema_migrations (
    version     integer PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)

-- name: applied
SELECT version, checksum FROM etl_schema_migrations ORDER BY version

-- name: record
-- params: $1 version, $2 file name, $3 sha256 of the file
INSERT INTO etl_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)

-- name: lock
-- One etlsvc process migrates at a time (every process takes the same key).
-- params: $1 key (bigint)
SELECT pg_advisory_lock($1)

-- name: unlock
-- params: $1 key (bigint)
SELECT pg_advisory_unlock($1)
