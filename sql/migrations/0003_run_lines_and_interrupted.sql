-- Physical lines a CSV run read (header, blank and rejected lines included), so that every
-- line of a file can be accounted for; and 'interrupted', the status of a run whose process
-- stopped (or lost the database for good) before it finished.
ALTER TABLE etl_runs ADD COLUMN lines_read bigint NOT NULL DEFAULT 0;
ALTER TABLE etl_runs DROP CONSTRAINT etl_runs_status_check;
ALTER TABLE etl_runs ADD CONSTRAINT etl_runs_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted'));
