-- Issue 17 (the Citus path): an event is named and keyed by its site and its
-- position in the site's log (`site_seq`, migration 0016). The global `id` and its
-- sequence go: with them, every table keyed by site carries no global sequence, so
-- sites can be spread over a distributed PostgreSQL with the site as distribution
-- key. (WatchEvents' `after_cursor`, the only reader of ids across sites, is retired.)
ALTER TABLE device_event DROP CONSTRAINT device_event_pkey;
ALTER TABLE device_event
    ADD CONSTRAINT device_event_pkey PRIMARY KEY USING INDEX device_event_by_site_seq;
DROP INDEX device_event_by_id;
ALTER TABLE device_event DROP COLUMN id;
