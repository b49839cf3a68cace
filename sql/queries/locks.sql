-- Advisory locks of etlsvc, by a text key ($1): 'etlsvc:source:NAME' (a source's run,
-- retry or replay), 'etlsvc:raw:NAME' (a source's raw rows: a replay against a purge),
-- 'etlsvc:maintenance' (one purge at a time). hashtextextended makes the key a bigint.

-- name: try_lock
-- Take a session-level lock if it is free; whether it was taken.
-- params: $1 key
SELECT pg_try_advisory_lock(hashtextextended($1, 0))

-- name: unlock
-- params: $1 key
SELECT pg_advisory_unlock(hashtextextended($1, 0))

-- name: xact_lock
-- A transaction-level lock, waiting for it.
-- params: $1 key
SELECT pg_advisory_xact_lock(hashtextextended($1, 0))

-- name: try_xact_lock
-- A transaction-level lock if it is free; whether it was taken.
-- params: $1 key
SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))
