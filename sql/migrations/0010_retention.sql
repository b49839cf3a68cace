-- Retention (runtime/retention.py): a purge finds the raw rows ingested before a cutoff,
-- and the normalized rows that still point at a range of raw ids (lineage it must keep),
-- through BRIN indexes: nearly free for a load (rows arrive in id and time order).
CREATE INDEX normalized_data_raw_id_brin ON normalized_data USING brin (raw_id)
    WITH (pages_per_range = 16, autosummarize = on);
CREATE INDEX raw_csv_data_ingested_at_brin ON raw_csv_data USING brin (ingested_at)
    WITH (autosummarize = on);
CREATE INDEX raw_api_data_ingested_at_brin ON raw_api_data USING brin (ingested_at)
    WITH (autosummarize = on);
CREATE INDEX raw_rss_data_ingested_at_brin ON raw_rss_data USING brin (ingested_at)
    WITH (autosummarize = on);
CREATE INDEX raw_jsonl_data_ingested_at_brin ON raw_jsonl_data USING brin (ingested_at)
    WITH (autosummarize = on);
CREATE INDEX raw_sql_data_ingested_at_brin ON raw_sql_data USING brin (ingested_at)
    WITH (autosummarize = on);
CREATE INDEX raw_stream_data_ingested_at_brin ON raw_stream_data USING brin (ingested_at)
    WITH (autosummarize = on);
