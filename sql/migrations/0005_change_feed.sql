-- The change feed (GET /data/changes): commit-safe positions for every write of
-- normalized_data.
--
-- Each row carries the id of the transaction that last wrote it (changed_xid: set by the
-- column default on insert and by the upsert on update); a delete leaves a tombstone with
-- the deleting transaction's id. The feed serves both in (xid, id) order, but only below the
-- xmin of its own snapshot: every transaction below it has ended, so nothing can appear
-- there later, however the writers' commits interleaved. That is the whole ordering
-- argument; see routes.py (list_changes) and README "Change feed".
--
-- Rows that exist before this migration get xid 0: a consumer starting from the beginning
-- sees them first.
ALTER TABLE normalized_data ADD COLUMN changed_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE normalized_data ALTER COLUMN changed_xid SET DEFAULT pg_current_xact_id();
-- A consumer at the head of the feed reads a short range at the end of this index.
CREATE INDEX normalized_data_changes_idx ON normalized_data (changed_xid, id);

CREATE TABLE data_tombstones (
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    id          bigint      NOT NULL,
    kind        text        NOT NULL,
    source      text        NOT NULL,
    source_id   text        NOT NULL,
    deleted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (xid, id)
);
CREATE INDEX data_tombstones_deleted_at_idx ON data_tombstones (deleted_at);

-- One counter per source and kind, raised by every transaction that changes rows of theirs
-- (the upsert in sql/queries/normalize.sql, and the delete trigger below). GET /data's ETag
-- carries their sum: a conditional request is answered without reading the page. One row
-- per source: writers of different sources never wait for each other's counter, and one
-- source has one writer at a time. The table also says which sources have rows of a kind:
-- a page filtered by kind is the merge of those sources' (source, id) ranges (api.sql,
-- data_by_kind).
CREATE TABLE data_versions (
    source   text   NOT NULL,
    kind     text   NOT NULL,
    version  bigint NOT NULL,
    PRIMARY KEY (source, kind)
);
INSERT INTO data_versions (source, kind, version)
SELECT DISTINCT source, kind, 1 FROM normalized_data;

-- Every DELETE (a replay's, or an operator's by hand) leaves tombstones and raises the
-- counters: a statement-level trigger, one call per statement, not per row. Inserts and
-- updates raise them in the upsert: triggers there copy every row written into a transition
-- table, and loads took 1.12x as long as before this migration, against 0.96-1.05x now
-- (bench/RESULTS.md). TRUNCATE does neither.
CREATE FUNCTION normalized_data_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO data_tombstones (id, kind, source, source_id)
    SELECT id, kind, source, source_id FROM gone;
    INSERT INTO data_versions AS v (source, kind, version)
    SELECT DISTINCT source, kind, 1 FROM gone
    ON CONFLICT (source, kind) DO UPDATE SET version = v.version + 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER normalized_data_deleted AFTER DELETE ON normalized_data
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
    EXECUTE FUNCTION normalized_data_deleted();

-- No query filters or sorts by created_at: its index only cost every load (bench/RESULTS.md).
DROP INDEX normalized_data_created_at_idx;

-- Tombstones are kept for [server] change_feed_retention_days. The last one pruned is
-- remembered: a position before it may have missed deletes, and the feed answers 410.
CREATE TABLE data_feed_state (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    pruned_xid  xid8    NOT NULL,
    pruned_id   bigint  NOT NULL
);
