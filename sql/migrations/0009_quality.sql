-- Data quality (issue 11): rejects say which rule a value broke and have a status, so they
-- can be retried under the current rules or ignored; runs can be flagged as anomalous.
ALTER TABLE etl_rejects
    ADD COLUMN rule         text,          -- required, type, min, max, regex, unique, …
    ADD COLUMN field        text,          -- the normalized field
    ADD COLUMN source_field text,          -- the source's column or JSON path
    ADD COLUMN value        text,          -- the value that broke the rule
    ADD COLUMN status       text NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'resolved', 'ignored')),
    ADD COLUMN status_changed_at timestamptz,
    ADD COLUMN resolved_run_id   bigint;   -- the retry run that loaded it
CREATE INDEX etl_rejects_open_idx ON etl_rejects (source, id) WHERE status = 'open';

ALTER TABLE etl_runs ADD COLUMN anomaly jsonb;   -- {metric: {value, median, mad, score}}
ALTER TABLE etl_runs DROP CONSTRAINT etl_runs_trigger_check;
ALTER TABLE etl_runs ADD CONSTRAINT etl_runs_trigger_check
    CHECK (trigger IN ('manual', 'schedule', 'startup', 'replay', 'stream', 'retry'));

-- Notifications (runtime/notify.py): each event once, with how its delivery went.
CREATE TABLE etl_notifications (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event        text        NOT NULL,   -- run_failed, anomaly, drift, stale
    source       text        NOT NULL,
    run_id       bigint,
    once_key     text        NOT NULL UNIQUE,   -- the same event is sent once
    summary      text        NOT NULL,
    details      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    outcomes     text[]                  -- per webhook, once delivery is over
);
