-- Indexes that make every filter of GET /data an index scan. The equality filters get
-- (column, id): their pages are a range of that index, already in id order. The range
-- filters get their column: a recent updated_since or a narrow event_time window reads a
-- few index entries and sorts them, instead of walking the primary key.
CREATE INDEX normalized_data_source_idx ON normalized_data (source, id);
CREATE INDEX normalized_data_kind_idx ON normalized_data (kind, id);
CREATE INDEX normalized_data_event_time_idx ON normalized_data (event_time);
CREATE INDEX normalized_data_updated_at_idx ON normalized_data (updated_at);
