-- Issue 15: events get a commit-ordered cursor per site, and agents' events are
-- de-duplicated within a device log epoch.
--
-- `site.event_seq` is the head of the site's event log. Every event row takes the
-- next number from it in a BEFORE INSERT trigger, and that UPDATE holds the site row
-- lock until the inserting transaction ends: a transaction that takes number n+1
-- waits until the one holding n has committed (or rolled back, which also undoes the
-- increment). So within a site, numbers become visible in order, and a reader that
-- has seen n never later finds a new event at or below n. Scoped by site, like the
-- change log: no global sequence, so sites can be spread over a distributed
-- PostgreSQL with the site as distribution key.
ALTER TABLE site ADD COLUMN event_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE device_event ADD COLUMN site_seq bigint;

UPDATE device_event e SET site_seq = n.rn
  FROM (SELECT site_id, id, row_number() OVER (PARTITION BY site_id ORDER BY id) AS rn
          FROM device_event) n
 WHERE n.site_id = e.site_id AND n.id = e.id;
UPDATE site s SET event_seq = m.seq
  FROM (SELECT site_id, max(site_seq) AS seq FROM device_event GROUP BY site_id) m
 WHERE m.site_id = s.id;

ALTER TABLE device_event ALTER COLUMN site_seq SET NOT NULL;
CREATE UNIQUE INDEX device_event_by_site_seq ON device_event (site_id, site_seq);

CREATE FUNCTION device_event_site_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE site SET event_seq = event_seq + 1 WHERE id = NEW.site_id
        RETURNING event_seq INTO NEW.site_seq;
    RETURN NEW;
END
$$;

CREATE TRIGGER device_event_site_seq BEFORE INSERT ON device_event
    FOR EACH ROW EXECUTE FUNCTION device_event_site_seq();

-- A device's log restarts at sequence 1 when the panel is replaced or reset or its
-- log wraps: the agent then reports a new epoch, and (epoch, seq) identifies an event.
ALTER TABLE device_event ADD COLUMN source_epoch bigint NOT NULL DEFAULT 0;
DROP INDEX device_event_once;
CREATE UNIQUE INDEX device_event_once ON device_event (site_id, device_id, source_epoch, source_seq)
    WHERE source_seq > 0;
