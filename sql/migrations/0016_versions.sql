-- Data versioning (runtime/versions.py, api/data.py): every version of every normalized row
-- kept with the transactions that wrote and replaced it, reads as of any moment, a feed of
-- every version, and a source rolled back to its state after a run.
--
-- A version is valid from the transaction that wrote it (the row's changed_xid) to the one
-- that replaced or deleted it. A moment is a snapshot (pg_snapshot): a version is what a
-- reader at that snapshot saw if the first is visible in it and the second is not. The
-- triggers below keep the replaced versions; the current ones are normalized_data itself.

-- Every transaction that writes normalized_data, stamped with the clock after its last
-- write, and a snapshot taken just after that, whose xmax is above every xid assigned by
-- then (NULL outside READ COMMITTED, where a statement cannot take a new one). "As of a
-- time" is resolved through these stamps into a snapshot (sql/queries/versions.sql,
-- time_reference): a transaction stamped before a time got its xid before the stamp, so
-- its xid is below the xmax of any snapshot stamped after it.
CREATE TABLE data_commits (
    xid      xid8        PRIMARY KEY,
    at       timestamptz NOT NULL,
    snap     pg_snapshot,
    snap_at  timestamptz
);
CREATE INDEX data_commits_at_idx ON data_commits (at);

-- The replaced versions of normalized rows: the row's columns as they were, and the
-- transactions that wrote (from_xid) and replaced or deleted (to_xid) it; ended_at is the
-- clock when it was replaced (what purging by history_days goes by).
CREATE TABLE data_history (
    id              bigint      NOT NULL,
    kind            text        NOT NULL,
    source          text        NOT NULL,
    source_id       text        NOT NULL,
    title           text,
    description     text,
    category        text,
    amount          numeric,
    url             text,
    tags            text[],
    event_time      timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    raw_table       text        NOT NULL,
    raw_id          bigint      NOT NULL,
    run_id          bigint      NOT NULL,
    source_version  bigint,
    from_xid        xid8        NOT NULL,
    to_xid          xid8        NOT NULL,
    ended_at        timestamptz NOT NULL,
    -- A row's versions, newest first (GET /data/{id}/history).
    PRIMARY KEY (id, to_xid)
);
-- The feed of every version reads them in the order they were written.
CREATE INDEX data_history_from_idx ON data_history (from_xid, id);
-- A read as of a moment needs the versions replaced after it: a short range at the end.
CREATE INDEX data_history_to_idx ON data_history (to_xid);
-- Purging a source's versions older than its history_days.
CREATE INDEX data_history_source_idx ON data_history (source, ended_at);

-- Per source: how long its versions are kept (NULL: for ever; 0: versioning off, no
-- version is kept), and where purging has got to: versions replaced by a transaction
-- below purged_xid are gone, so a moment before it cannot be read (410).
CREATE TABLE data_history_settings (
    source         text PRIMARY KEY,
    keep_days      double precision,
    purged_xid     xid8,
    purged_before  timestamptz
);

-- A snapshot of now whose xmax is above every xid assigned by now, as text. A snapshot's own
-- xmax is only the latest completed xid + 1: transactions running with a later xid are not
-- in it, so pg_locks gives every running one (32-bit xids, widened against the xmax).
CREATE FUNCTION data_complete_snapshot() RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    seen pg_snapshot;
    base bigint;
    running bigint[];
BEGIN
    SELECT pg_current_snapshot() INTO seen;
    base := pg_snapshot_xmax(seen)::text::bigint;
    SELECT array_agg(DISTINCT x ORDER BY x) INTO running FROM (
        SELECT base + (l.transactionid::text::bigint - base % 4294967296 + 6442450944)
                      % 4294967296 - 2147483648 AS x
        FROM pg_locks l
        WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted
        UNION ALL
        SELECT x::text::bigint FROM pg_snapshot_xip(seen) x
    ) r
    WHERE x >= pg_snapshot_xmin(seen)::text::bigint;
    RETURN pg_snapshot_xmin(seen) || ':' ||
           greatest(base, coalesce(running[array_upper(running, 1)] + 1, 0)) || ':' ||
           coalesce(array_to_string(running, ','), '');
END
$$;

CREATE FUNCTION data_commit_stamp() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := clock_timestamp();
    snap text;
    snap_at timestamptz;
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        -- A query of its own: a snapshot newer than "at".
        SELECT data_complete_snapshot(), clock_timestamp() INTO snap, snap_at;
    END IF;
    INSERT INTO data_commits AS c (xid, at, snap, snap_at)
    VALUES (pg_current_xact_id(), at, snap::pg_snapshot, snap_at)
    ON CONFLICT (xid) DO UPDATE SET at = EXCLUDED.at, snap = EXCLUDED.snap,
                                    snap_at = EXCLUDED.snap_at;
END
$$;

-- An update that does not say which transaction wrote the row (an operator's UPDATE, or
-- mark_gone's) is this one's: the feed, reads as of a moment and the version kept below
-- all go by changed_xid. The upsert sets it itself, and this does not fire.
CREATE FUNCTION normalized_data_touched() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_xid := pg_current_xact_id();
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER normalized_data_touched BEFORE UPDATE ON normalized_data
    FOR EACH ROW WHEN (NEW.changed_xid = OLD.changed_xid)
    EXECUTE FUNCTION normalized_data_touched();

-- The versions an update or a delete replaced, kept once per statement. A version this
-- transaction wrote itself was never seen by anyone else, and is not kept.
CREATE FUNCTION data_history_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO data_history (id, kind, source, source_id, title, description, category,
                              amount, url, tags, event_time, created_at, updated_at,
                              raw_table, raw_id, run_id, source_version, from_xid, to_xid,
                              ended_at)
    SELECT o.id, o.kind, o.source, o.source_id, o.title, o.description, o.category,
           o.amount, o.url, o.tags, o.event_time, o.created_at, o.updated_at, o.raw_table,
           o.raw_id, o.run_id, o.source_version, o.changed_xid, pg_current_xact_id(),
           clock_timestamp()
    FROM replaced o
    WHERE o.changed_xid <> pg_current_xact_id()
      AND NOT EXISTS (SELECT 1 FROM data_history_settings s
                      WHERE s.source = o.source AND s.keep_days = 0);
    PERFORM data_commit_stamp();
    RETURN NULL;
END
$$;
CREATE TRIGGER normalized_data_updated AFTER UPDATE ON normalized_data
    REFERENCING OLD TABLE AS replaced FOR EACH STATEMENT
    EXECUTE FUNCTION data_history_keep();
CREATE TRIGGER normalized_data_deleted_versions AFTER DELETE ON normalized_data
    REFERENCING OLD TABLE AS replaced FOR EACH STATEMENT
    EXECUTE FUNCTION data_history_keep();

CREATE FUNCTION data_commit_stamped() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM data_commit_stamp();
    RETURN NULL;
END
$$;
CREATE TRIGGER normalized_data_inserted AFTER INSERT ON normalized_data
    FOR EACH STATEMENT EXECUTE FUNCTION data_commit_stamped();

-- Checkpoints are versioned too: a rollback puts back the ones a run left.
ALTER TABLE etl_checkpoints ADD COLUMN changed_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE etl_checkpoints ALTER COLUMN changed_xid SET DEFAULT pg_current_xact_id();
CREATE TABLE etl_checkpoint_history (
    source      text        NOT NULL,
    stream      text        NOT NULL,
    state       jsonb       NOT NULL,
    run_id      bigint      NOT NULL,
    updated_at  timestamptz NOT NULL,
    from_xid    xid8        NOT NULL,
    to_xid      xid8        NOT NULL,
    ended_at    timestamptz NOT NULL
);
CREATE INDEX etl_checkpoint_history_idx ON etl_checkpoint_history (source, to_xid);

CREATE FUNCTION etl_checkpoint_history_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO etl_checkpoint_history (source, stream, state, run_id, updated_at,
                                        from_xid, to_xid, ended_at)
    SELECT o.source, o.stream, o.state, o.run_id, o.updated_at, o.changed_xid,
           pg_current_xact_id(), clock_timestamp()
    FROM replaced o
    WHERE o.changed_xid <> pg_current_xact_id();
    RETURN NULL;
END
$$;
CREATE TRIGGER etl_checkpoints_updated AFTER UPDATE ON etl_checkpoints
    REFERENCING OLD TABLE AS replaced FOR EACH STATEMENT
    EXECUTE FUNCTION etl_checkpoint_history_keep();
CREATE TRIGGER etl_checkpoints_deleted AFTER DELETE ON etl_checkpoints
    REFERENCING OLD TABLE AS replaced FOR EACH STATEMENT
    EXECUTE FUNCTION etl_checkpoint_history_keep();

-- A run's end as a moment: the snapshot its finish was written at, which sees every batch
-- it committed (a rollback to the run restores that state).
ALTER TABLE etl_runs ADD COLUMN finished_snapshot pg_snapshot;
ALTER TABLE etl_runs DROP CONSTRAINT etl_runs_trigger_check;
ALTER TABLE etl_runs ADD CONSTRAINT etl_runs_trigger_check
    CHECK (trigger IN ('manual', 'schedule', 'startup', 'replay', 'stream', 'retry',
                       'backfill', 'rollback'));
