-- name: sync_settings
-- Each configured source's history_days (NULL: for ever, 0: versioning off), for the
-- triggers of 0016_versions.sql and for purging.
-- params: $1 sources (text[]), $2 their history_days (float8[])
INSERT INTO data_history_settings AS s (source, keep_days)
SELECT * FROM unnest($1::text[], $2::float8[])
ON CONFLICT (source) DO UPDATE SET keep_days = EXCLUDED.keep_days
    WHERE s.keep_days IS DISTINCT FROM EXCLUDED.keep_days

-- name: time_reference
-- Resolving "as of $1" (a time) into a snapshot, first step: the first transaction stamped
-- after it, with the snapshot it took after its stamp (or, when none is, a snapshot of
-- now). Every transaction stamped at or before $1 has an xid below that snapshot's xmax.
-- params: $1 time
WITH first_after AS (
    SELECT c.snap::text AS snap, c.snap_at FROM data_commits c
    WHERE c.at > $1 AND c.snap IS NOT NULL
    ORDER BY c.at LIMIT 1
)
SELECT coalesce((SELECT snap FROM first_after), data_complete_snapshot()) AS snap,
       coalesce((SELECT snap_at FROM first_after), clock_timestamp()) AS snap_at,
       statement_timestamp() AS now

-- name: settled
-- Whether every transaction below the reference snapshot's xmax has ended (their stamps
-- are then final), and the snapshot now.
-- params: $1 reference snapshot
SELECT pg_snapshot_xmin(pg_current_snapshot()) >= pg_snapshot_xmax($1::text::pg_snapshot)

-- name: time_snapshot
-- Second step, once settled: the snapshot in which exactly the transactions stamped at or
-- before $1 are visible, written the one way the time gives (two references give the same
-- text). It ends after the newest of them (or, when none is, at the first stamped later:
-- rows older than the stamps stay visible). Hidden below that are the writers stamped
-- later: those the reference saw running, and those that ended before it was taken
-- (stamped before its snap_at, $3). Transactions that never wrote the table do not matter.
-- params: $1 time, $2 reference snapshot, $3 its snap_at
WITH ref AS (SELECT $2::text::pg_snapshot AS snap), upto AS (
    SELECT coalesce(
        (SELECT (max(c.xid)::text::bigint + 1)::text::xid8 FROM data_commits c, ref
         WHERE c.xid < pg_snapshot_xmax(ref.snap) AND c.at <= $1),
        (SELECT min(c.xid) FROM data_commits c, ref
         WHERE c.xid < pg_snapshot_xmax(ref.snap) AND c.at > $1),
        (SELECT pg_snapshot_xmax(snap) FROM ref)) AS xid
), hidden AS (
    SELECT c.xid FROM ref, pg_snapshot_xip(ref.snap) x
    JOIN data_commits c ON c.xid = x
    WHERE c.at > $1
    UNION
    SELECT c.xid FROM data_commits c
    WHERE c.at > $1 AND c.at <= $3
), below AS (
    SELECT h.xid FROM hidden h, upto WHERE h.xid < upto.xid
)
SELECT coalesce((SELECT min(xid) FROM below), upto.xid) || ':' || upto.xid || ':' ||
       coalesce((SELECT string_agg(xid::text, ',' ORDER BY xid) FROM below), '')
FROM upto

-- name: moment_check
-- Whether a moment ($S: its snapshot) can be read here, asked by the statements that read
-- as of it (their chk), in the same round trip: "ahead" if the snapshot sees a transaction
-- this server has not seen end (a snapshot from a replica further ahead, or made up: read
-- as of it, the answer could change later); and how far back versions can be read, per
-- source that purged some (the transaction below which they are gone, the time before
-- which they were) or keeps none.
SELECT pg_snapshot_xmax($S::text::pg_snapshot) > pg_snapshot_xmax(pg_current_snapshot())
       OR EXISTS (SELECT 1 FROM pg_snapshot_xip(pg_current_snapshot()) x
                  WHERE pg_visible_in_snapshot(x, $S::text::pg_snapshot)) AS ahead,
       (SELECT json_agg(json_build_object('source', source, 'keep_days', keep_days,
                                          'purged_xid', purged_xid::text,
                                          'purged_before', purged_before))
        FROM data_history_settings
        WHERE purged_xid IS NOT NULL OR keep_days = 0) AS horizon

-- name: data_page
-- A page of GET /data as of a snapshot ($3): the current rows it sees, and the replaced
-- versions it saw (written by a transaction it sees, replaced by one it does not), in id
-- order. The versions replaced after the snapshot are a short range of to_xid (from its
-- xmin on). Sources that keep no versions are left out. The filters given are conditions
-- as in api.sql data_filters, numbered from $4. Each row ends with moment_check's columns;
-- an empty page is one row of them alone (id NULL).
-- params: $1 after id, $2 limit, $3 snapshot, then one per filter given
WITH chk AS ({check})
SELECT v.*, chk.ahead, chk.horizon
FROM chk LEFT JOIN LATERAL (
    SELECT * FROM (
        (SELECT id, kind, source, source_id, title, description, category,
                amount::text AS amount, url, tags, event_time, created_at, updated_at
         FROM normalized_data
         WHERE id > $1 AND pg_visible_in_snapshot(changed_xid, $3::text::pg_snapshot){filters}
           AND source NOT IN (SELECT source FROM data_history_settings WHERE keep_days = 0)
         ORDER BY id LIMIT $2)
        UNION ALL
        (SELECT id, kind, source, source_id, title, description, category,
                amount::text AS amount, url, tags, event_time, created_at, updated_at
         FROM data_history
         WHERE id > $1 AND to_xid >= pg_snapshot_xmin($3::text::pg_snapshot)
           AND pg_visible_in_snapshot(from_xid, $3::text::pg_snapshot)
           AND NOT pg_visible_in_snapshot(to_xid, $3::text::pg_snapshot){filters}
         ORDER BY id LIMIT $2)
    ) u
    ORDER BY id LIMIT $2
) v ON true

-- name: data_one
-- One row as of a snapshot, with its lineage; then moment_check's columns (id NULL: not
-- there then).
-- params: $1 id, $2 snapshot
WITH chk AS ({check})
SELECT v.*, chk.ahead, chk.horizon
FROM chk LEFT JOIN LATERAL (
    SELECT id, kind, source, source_id, title, description, category,
           amount::text AS amount, url, tags, event_time, created_at, updated_at, raw_table,
           raw_id, run_id
    FROM normalized_data
    WHERE id = $1 AND pg_visible_in_snapshot(changed_xid, $2::text::pg_snapshot)
    UNION ALL
    SELECT id, kind, source, source_id, title, description, category,
           amount::text AS amount, url, tags, event_time, created_at, updated_at, raw_table,
           raw_id, run_id
    FROM data_history
    WHERE id = $1 AND pg_visible_in_snapshot(from_xid, $2::text::pg_snapshot)
      AND NOT pg_visible_in_snapshot(to_xid, $2::text::pg_snapshot)
) v ON true

-- name: history
-- A row's versions, newest first: the current one (to_xid NULL) and the replaced ones,
-- before the version replaced by $2 (keyset; NULL: from the newest). The first 13 columns
-- are GET /data's. valid_to is the stamp of the replacing transaction. valid_from is the
-- stamp of the writing one, looked up only where the next older version on the page did not
-- end at that transaction (the oldest, or the first after a gap): elsewhere it is that
-- version's valid_to, which the caller takes (a thousand fewer lookups and timestamps to
-- decode for a page of 1,000). ended_by: 'update' when a newer version begins where this
-- one ends, else 'delete' (a deleted row, perhaps restored later by a rollback).
-- params: $1 id, $2 before to_xid (text, or NULL), $3 limit
SELECT v.*, e.at AS valid_to,
       CASE WHEN lead(v.to_xid) OVER newest IS DISTINCT FROM v.from_xid
            THEN (SELECT at FROM data_commits WHERE xid = v.from_xid) END AS valid_from,
       CASE WHEN v.to_xid IS NULL THEN NULL
            WHEN coalesce(lag(v.from_xid) OVER newest,
                          (SELECT h.from_xid FROM data_history h
                           WHERE h.id = $1 AND h.from_xid = v.to_xid),
                          (SELECT d.changed_xid FROM normalized_data d
                           WHERE d.id = $1 AND d.changed_xid = v.to_xid)) = v.to_xid
            THEN 'update' ELSE 'delete' END AS ended_by
FROM (
    (SELECT id, kind, source, source_id, title, description, category, amount::text AS amount,
            url, tags, event_time, created_at, updated_at, raw_table, raw_id, run_id,
            changed_xid AS from_xid, NULL::xid8 AS to_xid
     FROM normalized_data WHERE id = $1 AND $2::text IS NULL)
    UNION ALL
    (SELECT id, kind, source, source_id, title, description, category, amount::text AS amount,
            url, tags, event_time, created_at, updated_at, raw_table, raw_id, run_id,
            from_xid, to_xid
     FROM data_history
     WHERE id = $1 AND ($2::text IS NULL OR to_xid < $2::text::xid8)
     ORDER BY to_xid DESC LIMIT $3)
    ORDER BY to_xid DESC NULLS FIRST
    LIMIT $3
) v
LEFT JOIN data_commits e ON e.xid = v.to_xid
WINDOW newest AS (ORDER BY v.to_xid DESC NULLS FIRST)
ORDER BY v.to_xid DESC NULLS FIRST

-- name: purge
-- A batch of a source's versions replaced before $2, purged; the purge horizon moves past
-- the newest of them. Returns how many were deleted.
-- params: $1 source, $2 cutoff, $3 batch size
WITH doomed AS (
    SELECT id, to_xid FROM data_history
    WHERE source = $1 AND ended_at < $2
    ORDER BY ended_at LIMIT $3
), gone AS (
    DELETE FROM data_history h USING doomed d
    WHERE h.id = d.id AND h.to_xid = d.to_xid
    RETURNING h.to_xid
), moved AS (
    UPDATE data_history_settings s
    SET purged_xid = greatest(s.purged_xid,
                              (SELECT (max(to_xid)::text::bigint + 1)::text::xid8 FROM gone)),
        purged_before = greatest(s.purged_before, $2)
    WHERE s.source = $1 AND EXISTS (SELECT 1 FROM gone)
)
SELECT count(*) FROM gone

-- name: purge_checkpoints
-- The checkpoint versions of a source replaced before $2 (a rollback cannot go back
-- further than its data versions anyway).
-- params: $1 source, $2 cutoff
DELETE FROM etl_checkpoint_history WHERE source = $1 AND ended_at < $2

-- name: rollback_run
-- The run a rollback goes back to, and the snapshot of its finish.
-- params: $1 run id
SELECT source, status, finished_snapshot::text AS snapshot FROM etl_runs WHERE id = $1

-- name: kept_since
-- Whether the source keeps versions (keep_days 0: none), and whether some the snapshot
-- needs were purged.
-- params: $1 source, $2 snapshot
SELECT keep_days, coalesce(purged_xid > pg_snapshot_xmin($2::text::pg_snapshot), false) AS purged
FROM data_history_settings WHERE source = $1

-- name: rollback_target
-- A rollback's target: the source's rows as the snapshot $2 saw them (current rows it sees,
-- versions it saw), in a temporary table for the transaction.
-- params: $1 source, $2 snapshot
CREATE TEMP TABLE rollback_target ON COMMIT DROP AS
SELECT id, kind, source, source_id, title, description, category, amount, url, tags,
       event_time, created_at, raw_table, raw_id, run_id, source_version
FROM normalized_data
WHERE source = $1 AND pg_visible_in_snapshot(changed_xid, $2::text::pg_snapshot)
UNION ALL
SELECT id, kind, source, source_id, title, description, category, amount, url, tags,
       event_time, created_at, raw_table, raw_id, run_id, source_version
FROM data_history
WHERE source = $1 AND pg_visible_in_snapshot(from_xid, $2::text::pg_snapshot)
  AND NOT pg_visible_in_snapshot(to_xid, $2::text::pg_snapshot)

-- name: rollback_counts
-- What a rollback changes: rows to delete (not in the target), to update (in both, with a
-- different content or lineage) and to insert again (deleted since).
-- params: $1 source
SELECT
    (SELECT count(*) FROM normalized_data n WHERE n.source = $1
       AND NOT EXISTS (SELECT 1 FROM rollback_target t WHERE t.id = n.id)) AS deleted,
    (SELECT count(*) FROM normalized_data n JOIN rollback_target t ON t.id = n.id
     WHERE n.source = $1
       AND (n.title, n.description, n.category, n.amount, n.url, n.tags, n.event_time,
            n.raw_table, n.raw_id, n.run_id, n.source_version)
           IS DISTINCT FROM
           (t.title, t.description, t.category, t.amount, t.url, t.tags, t.event_time,
            t.raw_table, t.raw_id, t.run_id, t.source_version)) AS updated,
    (SELECT count(*) FROM rollback_target t
     WHERE NOT EXISTS (SELECT 1 FROM normalized_data n WHERE n.id = t.id)) AS inserted

-- name: rollback_delete
-- params: $1 source
DELETE FROM normalized_data n
WHERE n.source = $1 AND NOT EXISTS (SELECT 1 FROM rollback_target t WHERE t.id = n.id)

-- name: rollback_update
-- params: $1 source
UPDATE normalized_data n SET
    title = t.title, description = t.description, category = t.category, amount = t.amount,
    url = t.url, tags = t.tags, event_time = t.event_time, raw_table = t.raw_table,
    raw_id = t.raw_id, run_id = t.run_id, source_version = t.source_version,
    updated_at = now(), changed_xid = pg_current_xact_id()
FROM rollback_target t
WHERE n.id = t.id AND n.source = $1
  AND (n.title, n.description, n.category, n.amount, n.url, n.tags, n.event_time,
       n.raw_table, n.raw_id, n.run_id, n.source_version)
      IS DISTINCT FROM
      (t.title, t.description, t.category, t.amount, t.url, t.tags, t.event_time,
       t.raw_table, t.raw_id, t.run_id, t.source_version)

-- name: rollback_insert
-- Rows deleted since come back with their ids (their history goes on), as inserts of this
-- transaction (created_at = updated_at: the feed says "insert").
-- params: none
INSERT INTO normalized_data (id, kind, source, source_id, title, description, category,
                             amount, url, tags, event_time, raw_table, raw_id, run_id,
                             source_version)
OVERRIDING SYSTEM VALUE
SELECT t.id, t.kind, t.source, t.source_id, t.title, t.description, t.category, t.amount,
       t.url, t.tags, t.event_time, t.raw_table, t.raw_id, t.run_id, t.source_version
FROM rollback_target t
WHERE NOT EXISTS (SELECT 1 FROM normalized_data n WHERE n.id = t.id)

-- name: rollback_checkpoints
-- The source's checkpoints put back as the snapshot $2 saw them: streams it did not know
-- are forgotten, the others take the state they had.
-- params: $1 source, $2 snapshot
WITH target AS (
    SELECT stream, state, run_id FROM etl_checkpoints
    WHERE source = $1 AND pg_visible_in_snapshot(changed_xid, $2::text::pg_snapshot)
    UNION ALL
    SELECT stream, state, run_id FROM etl_checkpoint_history
    WHERE source = $1 AND pg_visible_in_snapshot(from_xid, $2::text::pg_snapshot)
      AND NOT pg_visible_in_snapshot(to_xid, $2::text::pg_snapshot)
), forgotten AS (
    DELETE FROM etl_checkpoints c
    WHERE c.source = $1 AND NOT EXISTS (SELECT 1 FROM target t WHERE t.stream = c.stream)
    RETURNING 1
), restored AS (
    INSERT INTO etl_checkpoints AS c (source, stream, state, run_id)
    SELECT $1, stream, state, run_id FROM target
    ON CONFLICT (source, stream) DO UPDATE
        SET state = EXCLUDED.state, run_id = EXCLUDED.run_id, updated_at = now(),
            changed_xid = pg_current_xact_id()
        WHERE c.state IS DISTINCT FROM EXCLUDED.state
    RETURNING 1
)
SELECT (SELECT count(*) FROM forgotten) + (SELECT count(*) FROM restored)
