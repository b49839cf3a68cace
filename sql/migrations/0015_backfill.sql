-- Backfills (runtime/backfill.py): a range of a source read again as a run of its own,
-- beside the live run, without moving its cursor or slot; and the per-row source version
-- that keeps a backfill from overwriting a newer live change.

-- The source's version of the row's last change, where the kind has one (NULL: none):
-- pg_cdc the 64-bit id of the source transaction, mysql_cdc the binlog position after it
-- (file number << 32 | position), sql the cursor value of the row (an integer, or a
-- timestamp in microseconds since 1970). Written by the upsert from the raw row
-- (SourceKind.version_sql); a backfill's upsert compares it (SourceKind.seen_sql).
ALTER TABLE normalized_data ADD COLUMN source_version bigint;
-- A deleted row keeps its version in its tombstone: a backfill whose read did not see the
-- delete must not bring the row back.
ALTER TABLE data_tombstones ADD COLUMN source_version bigint;
CREATE INDEX data_tombstones_source_key_idx ON data_tombstones (source, source_id)
    WHERE source_version IS NOT NULL;

CREATE OR REPLACE FUNCTION normalized_data_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO data_tombstones (id, kind, source, source_id, source_version)
    SELECT id, kind, source, source_id, source_version FROM gone;
    INSERT INTO data_versions AS v (source, kind, version)
    SELECT DISTINCT source, kind, 1 FROM gone
    ON CONFLICT (source, kind) DO UPDATE SET version = v.version + 1;
    RETURN NULL;
END
$$;

-- pg_cdc: the source transaction of a streamed change (0: a snapshot's row).
ALTER TABLE raw_pg_cdc_data ADD COLUMN xid bigint NOT NULL DEFAULT 0;
-- sql: the row's cursor value as a version (the smallest bigint: none, for a source
-- without a cursor, or a cursor that is neither an integer nor a time).
ALTER TABLE raw_sql_data ADD COLUMN version bigint NOT NULL DEFAULT -9223372036854775808;

ALTER TABLE etl_runs DROP CONSTRAINT etl_runs_trigger_check;
ALTER TABLE etl_runs ADD CONSTRAINT etl_runs_trigger_check
    CHECK (trigger IN ('manual', 'schedule', 'startup', 'replay', 'stream', 'retry',
                       'backfill'));

-- One row per backfill: the range asked for, where it is, and its runs (an interrupted
-- backfill goes on in a new run, from its checkpoints, which are kept under the
-- checkpoint key 'SOURCE#backfill:ID' and so never touch the live run's).
CREATE TABLE etl_backfills (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source        text        NOT NULL,
    kind          text        NOT NULL,
    -- What the range is of (a table for the change kinds; NULL: the kind's one range).
    stream        text,
    range_from    text,
    range_to      text,
    status        text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    cancel        boolean     NOT NULL DEFAULT false,
    run_id        bigint,
    runs          bigint[]    NOT NULL DEFAULT '{}',
    -- Where it is: the last position read, and a fraction done where the range says.
    progress      jsonb       NOT NULL DEFAULT '{}',
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX etl_backfills_open_idx ON etl_backfills (source) WHERE status IN ('pending', 'running');
