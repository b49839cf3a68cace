-- name: upsert
-- Normalize raw rows of one source into normalized_data. {raw_table} is one of the raw tables.
-- Within the rows selected, the later raw row of a natural key wins ({distinct} and {order}
-- are "DISTINCT ON (key)" and "ORDER BY key, id DESC", or empty when the caller knows the
-- keys are distinct: the sort is a third of the cost); a row is written only when its
-- content differs from what normalized_data holds, and a written row carries this
-- transaction's id for the change feed (changed_xid: the column default on insert).
-- {this_transaction} is "AND r.xmin = pg_current_xact_id()::xid" for a load: only the raw rows this
-- transaction copied (batches of one source commit concurrently, and the raw id range may
-- hold another batch's rows once it has committed); empty for a replay.
-- params: $1 source, $2 kind, $3 raw ids above, $4 raw ids up to, $5 raw ids to skip (bigint[]),
--         $6..$13 JSON paths (text[]) of source_id, title, description, category, amount, url,
--         tags, event_time (NULL: not mapped), $14 separator of tags given as one string
-- The values placeholder: the casts of title … event_time from the raw record, made by the fields' compiled
-- rules (transform/rules.FieldCheck.sql): what validation checked is what is cast.
-- A change kind (SourceKind.changes): {op} is ", r.op" and {live} "AND op <> 3": a key
-- whose last change is a delete is not written here (delete_gone removes it), and a mapped
-- column an update did not send keeps the value normalized_data has (transform/mapping.py).
-- {version} is the kind's source version of a raw row (SourceKind.version_sql), kept in
-- source_version. A backfill's batch ({guard} and {tombstone}, else empty; $15 its read
-- point) leaves a row alone whose live version its read did not see, and does not bring
-- back a row whose delete its read did not see.
WITH src AS (
    SELECT {distinct} id, run_id, key, record, version {op_out}
    FROM (
        SELECT r.id, r.run_id, r.record #>> $6::text[] AS key, r.record, {version} AS version {op}
        FROM {raw_table} r
        WHERE r.source = $1 AND r.id > $3 AND r.id <= $4 AND r.id <> ALL ($5::bigint[]) {this_transaction}
    ) s
    WHERE key <> ''
    {order}
), live AS (
    SELECT id, run_id, key, record, version FROM src WHERE true {live} {tombstone}
), up AS (
    INSERT INTO normalized_data AS n
        (kind, source, source_id, title, description, category, amount, url, tags, event_time,
         raw_table, raw_id, run_id, source_version)
    SELECT $2, $1, key,
           {values},
           '{raw_table}', id, run_id, version
    FROM live
    ON CONFLICT (source, source_id) DO UPDATE SET
        title = EXCLUDED.title, description = EXCLUDED.description,
        category = EXCLUDED.category, amount = EXCLUDED.amount, url = EXCLUDED.url,
        tags = EXCLUDED.tags, event_time = EXCLUDED.event_time, kind = EXCLUDED.kind,
        raw_table = EXCLUDED.raw_table, raw_id = EXCLUDED.raw_id, run_id = EXCLUDED.run_id,
        source_version = EXCLUDED.source_version,
        updated_at = now(), changed_xid = pg_current_xact_id()
    WHERE (n.title, n.description, n.category, n.amount, n.url, n.tags, n.event_time)
          IS DISTINCT FROM
          (EXCLUDED.title, EXCLUDED.description, EXCLUDED.category, EXCLUDED.amount,
           EXCLUDED.url, EXCLUDED.tags, EXCLUDED.event_time) {guard}
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted,
       count(*) FILTER (WHERE NOT inserted) AS updated
FROM up

-- name: drop_unseen
-- A backfill's batch, after its upsert: its raw rows that were left alone, because the live
-- row, or its delete, is newer than what the backfill read, leave the raw table. Kept, a
-- replay (a key's last raw row wins) would undo that newer change with them. {seen_row} and
-- {seen_tombstone} are the kind's seen_sql for the normalized row's and the tombstone's
-- version against this raw row's; $4 is the batch's read point. (IS NOT DISTINCT FROM: as
-- in mark_gone, a lookup by source_id's unique index whatever the statistics say.)
-- params: $1 source, $2 raw ids above, $3 JSON path of source_id (text[]), $4 read point
DELETE FROM {raw_table} r
WHERE r.source = $1 AND r.id > $2 AND r.xmin = pg_current_xact_id()::xid
  AND (EXISTS (SELECT 1 FROM normalized_data n
               WHERE n.source IS NOT DISTINCT FROM $1
                 AND n.source_id = r.record #>> $3::text[]
                 AND n.source_version IS NOT NULL AND NOT {seen_row})
       OR EXISTS (SELECT 1 FROM data_tombstones t
                  WHERE t.source = $1 AND t.source_id = r.record #>> $3::text[]
                    AND t.source_version IS NOT NULL AND NOT {seen_tombstone}))

-- name: mark_gone
-- A change kind's deletes, first step: the keys of the raw rows selected (as in upsert)
-- whose last change is a delete take that change's source version ({version}), which the
-- delete trigger of 0015_backfill.sql keeps in their tombstones. Returns their ids, for
-- delete_ids (a statement cannot update and delete the same row).
-- params: $1 source, $2 raw ids above, $3 raw ids up to, $4 raw ids to skip (bigint[]),
--         $5 JSON path of source_id (text[])
WITH last AS MATERIALIZED (
    SELECT DISTINCT ON (key) key, op, version
    FROM (
        SELECT r.id, r.record #>> $5::text[] AS key, r.op, {version} AS version
        FROM {raw_table} r
        WHERE r.source = $1 AND r.id > $2 AND r.id <= $3 AND r.id <> ALL ($4::bigint[]) {this_transaction}
    ) s
    ORDER BY key, id DESC
), gone AS MATERIALIZED (
    -- Each deleted key looked up by the unique index on (source_id, source), whatever the
    -- statistics say: a source new since the last ANALYZE is estimated at one row, and
    -- planned as a join, or by its (source, id) index, its rows were scanned whole once
    -- per key (20 s a batch at 40,000 rows). OFFSET 0 keeps the lookup from being
    -- flattened into a join; IS NOT DISTINCT FROM (source is never null) is no index
    -- condition, so only source_id's index applies.
    SELECT g.id, last.version
    FROM last, LATERAL (SELECT n.id FROM normalized_data n
                        WHERE n.source_id = last.key AND n.source IS NOT DISTINCT FROM $1
                        OFFSET 0) g
    WHERE last.op = 3
), marked AS (
    UPDATE normalized_data n SET source_version = gone.version
    FROM gone
    WHERE n.id = gone.id
    RETURNING n.id
)
SELECT coalesce(array_agg(id), '{}') FROM marked

-- name: delete_ids
-- The second step: they leave normalized_data (the delete trigger of 0005_change_feed.sql
-- leaves their tombstones and raises the data version).
-- params: $1 ids (bigint[])
DELETE FROM normalized_data WHERE id = ANY ($1::bigint[])

-- name: bump_version
-- Raise the data version of a source and kind (sql/migrations/0005_change_feed.sql), after
-- an upsert that wrote rows. Separate from the upsert, and last in a batch's transaction:
-- the row lock it takes is what concurrent batches of a source queue on, so it is held
-- only until the commit.
-- params: $1 source, $2 kind
INSERT INTO data_versions AS v (source, kind, version) VALUES ($1, $2, 1)
ON CONFLICT (source, kind) DO UPDATE SET version = v.version + 1

-- name: next_raw_id
-- The raw rows a COPY adds next all have ids above this one.
-- params: $1 sequence of the raw table's id
SELECT nextval($1::regclass)


-- name: unique_conflicts
-- The raw rows this load copied (as in upsert: {raw_table}, {this_transaction}) whose value of a unique
-- field ({column}, at path $6) another natural key of the source already holds, in
-- normalized_data or in an earlier raw row of the range: the first key to hold a value
-- keeps it (a window over the batch, not a lookup per row). The md5 condition is what the
-- index of ensure_unique_indexes serves.
-- params: $1 source, $2 raw ids above, $3 raw ids up to, $4 raw ids to skip (bigint[]),
--         $5 path of source_id, $6 path of the unique field
WITH batch AS (
    SELECT r.id, r.record #>> $5::text[] AS key, r.record #>> $6::text[] AS value
    FROM {raw_table} r
    WHERE r.source = $1 AND r.id > $2 AND r.id <= $3 AND r.id <> ALL ($4::bigint[]) {this_transaction}
), ranked AS (
    SELECT id, key, value, first_value(key) OVER (PARTITION BY value ORDER BY id) AS holder
    FROM batch
    WHERE value <> ''
)
SELECT b.id, b.value FROM ranked b
WHERE b.holder <> b.key
   OR EXISTS (SELECT 1 FROM normalized_data n
              WHERE n.source = $1 AND md5(n.{column}) = md5(b.value)
                AND n.{column} = b.value AND n.source_id <> b.key)
ORDER BY b.id

-- name: take_raw
-- Raw rows that became rejects after they were copied (a unique value already held): they
-- leave the raw table with their position and record, for the reject.
-- params: $1 raw ids (bigint[])
DELETE FROM {raw_table} WHERE id = ANY ($1::bigint[])
RETURNING id, {stream_column} AS stream, {position} AS position, record

-- name: raw_as_rejects
-- Raw rows a replay found breaking a unique rule: their position and record, for the
-- reject (they stay in the raw table, which the replay reads but does not own).
-- params: $1 raw ids (bigint[])
SELECT id, {stream_column} AS stream, {position} AS position, record
FROM {raw_table} WHERE id = ANY ($1::bigint[])

-- name: copied_ids
-- The raw rows this transaction copied above an id, in copy order (the k-th row of the
-- payload has the k-th id: a sequence hands a COPY's ids in order).
-- params: $1 source, $2 raw ids above
SELECT id FROM {raw_table}
WHERE source = $1 AND id > $2 AND xmin = pg_current_xact_id()::xid
ORDER BY id

-- name: unique_index
-- The index the unique_conflicts check of a field ({column}) looks values up with: made on
-- first use, since which fields are unique is config, not schema.
CREATE INDEX IF NOT EXISTS normalized_data_{column}_md5_idx ON normalized_data (source, md5({column}))

-- name: detect_gone
-- deletes = "detect": after a whole read (run $2), the source's normalized keys that the
-- read neither loaded nor rejected are gone from it, and leave, unless they are more than
-- $4 (max_delete_fraction) of the source's rows: then none leaves. The delete trigger of
-- 0005_change_feed.sql leaves their tombstones. Returns (gone, total, deleted).
-- params: $1 source, $2 run id, $3 JSON path of source_id (text[]), $4 fraction
WITH gone AS (
    SELECT n.source_id FROM normalized_data n WHERE n.source = $1
    EXCEPT
    SELECT r.source_key FROM {raw_table} r WHERE r.source = $1 AND r.run_id = $2
    EXCEPT
    SELECT j.record #>> $3::text[] FROM etl_rejects j WHERE j.run_id = $2 AND j.source = $1
), counts AS (
    SELECT (SELECT count(*) FROM gone) AS gone,
           (SELECT count(*) FROM normalized_data WHERE source = $1) AS total
), deleted AS (
    DELETE FROM normalized_data n USING gone g, counts c
    WHERE n.source = $1 AND n.source_id = g.source_id AND c.gone <= $4::float8 * c.total
    RETURNING 1
)
SELECT c.gone, c.total, (SELECT count(*) FROM deleted) AS deleted FROM counts c
