-- Schema drift (transform/drift.py): the columns (CSV) or top-level keys (JSON kinds) each
-- stream of a source has shown, with their type. A source's known shape is the union over
-- its streams; a change its policy did not accept is not recorded (it is in the run's notes).
CREATE TABLE etl_schema_columns (
    source       text        NOT NULL,
    stream       text        NOT NULL,
    name         text        NOT NULL,
    type         text        NOT NULL,
    first_run_id bigint      NOT NULL,
    last_run_id  bigint      NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, stream, name)
);
