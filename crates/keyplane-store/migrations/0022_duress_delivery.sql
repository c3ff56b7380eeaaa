-- Issue 17: when an event was first sent to a WatchEvents stream (any replica), so
-- a duress event nobody was told of is seen (keyplane_duress_undelivered, and the
-- alert rule in deploy/prometheus/keyplane-alerts.yml). Set for duress events only.
ALTER TABLE device_event ADD COLUMN delivered_time timestamptz;
-- Duress events stored before this migration were delivered, or are past helping.
UPDATE device_event SET delivered_time = create_time WHERE kind = 'duress';
CREATE INDEX device_event_duress_undelivered ON device_event (create_time)
    WHERE kind = 'duress' AND delivered_time IS NULL;
