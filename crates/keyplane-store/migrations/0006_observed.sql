-- What agents observe in device slot tables: managed codes, drift, and codes
-- programmed at the device (LOCAL), which are kept and whose slots are reserved.
CREATE TABLE observed_slot (
    site_id      uuid NOT NULL,
    device_id    uuid NOT NULL,
    slot         integer NOT NULL,
    -- managed | drifted | missing | foreign | conflict | unverifiable
    state        text NOT NULL,
    pin_sealed   bytea,
    pin_key_id   text,
    pin_hash     bytea,
    removing     boolean NOT NULL DEFAULT false,
    observe_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, device_id, slot),
    FOREIGN KEY (site_id, device_id) REFERENCES device (site_id, id) ON DELETE CASCADE
);

ALTER TABLE slot_assignment ADD COLUMN write_generation bigint NOT NULL DEFAULT 0;

-- Events keyplane raises itself (drift, a local code cleared, lockdown) have no
-- device sequence number: only agents' events are deduplicated.
ALTER TABLE device_event DROP CONSTRAINT device_event_site_id_device_id_source_seq_key;
CREATE UNIQUE INDEX device_event_once ON device_event (site_id, device_id, source_seq) WHERE source_seq > 0;
