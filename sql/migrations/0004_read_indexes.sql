-- Indexes for the filters of GET /data, within the CSV load's budget (+10 %: four B-trees
-- cost +30 %, bench/RESULTS.md). A source's page is a range of (source, id), already in id
-- order. kind has no index of its own (three values; a rare kind's page walks the primary
-- key until it finds its rows: filter by source for an index-backed page). updated_at and
-- event_time get BRIN indexes: nearly free to maintain, and they find a recent window when
-- the column follows the order rows were written in (updated_at always does); otherwise
-- the planner walks the primary key.
CREATE INDEX normalized_data_source_idx ON normalized_data (source, id);
-- autosummarize: autovacuum summarizes each range as it fills; an unsummarized range (the
-- newest rows, where a recent window is) is a candidate for every query.
CREATE INDEX normalized_data_updated_at_brin ON normalized_data USING brin (updated_at)
    WITH (pages_per_range = 16, autosummarize = on);
CREATE INDEX normalized_data_event_time_brin ON normalized_data USING brin (event_time)
    WITH (pages_per_range = 16, autosummarize = on);
