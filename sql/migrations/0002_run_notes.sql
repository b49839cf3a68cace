-- What a run has to report beyond its counters: per feed of an RSS source, its outcome
-- ({"feeds": {"<url>": {"status", "entries", "problem"}}}).
ALTER TABLE etl_runs ADD COLUMN notes jsonb NOT NULL DEFAULT '{}';
