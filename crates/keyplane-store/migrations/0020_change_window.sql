-- Issue 15: the change log keeps a bounded window per site.
--
-- `change_floor` is the highest revision whose changes may have been pruned from
-- `site_change`: the log holds every change after it. An agent whose last applied
-- revision is below it cannot be caught up from the log and gets a snapshot.
ALTER TABLE site ADD COLUMN change_floor bigint NOT NULL DEFAULT 0;
-- The age limit finds each site's oldest changes by time.
CREATE INDEX site_change_by_time ON site_change (change_time);
