-- Notifications that a process did not finish delivering (stopped at its grace, killed) are
-- sent again by a later process: one whose delivery is not over (outcomes NULL) is due for a
-- new sender once due_at has passed. A sender holds a row until the longest its delivery can
-- take; one that stops at its grace gives its rows back at once.
ALTER TABLE etl_notifications ADD COLUMN due_at timestamptz;
CREATE INDEX etl_notifications_undelivered ON etl_notifications (due_at)
    WHERE outcomes IS NULL;
