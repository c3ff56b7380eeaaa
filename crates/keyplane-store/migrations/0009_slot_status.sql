-- Issue 11: what the status of every slot assignment is decided from (docs/STATUS.md).

-- When each slot's desired value changed: delays are measured from the commit.
ALTER TABLE site_change ADD COLUMN change_time timestamptz NOT NULL DEFAULT now();

-- The agent's report on its last write to each slot: the latest one only, since the
-- status is decided from what holds now.
CREATE TABLE slot_write_report (
    site_id       uuid NOT NULL,
    device_id     uuid NOT NULL,
    slot          integer NOT NULL,
    revision      bigint NOT NULL,
    clear         boolean NOT NULL,
    -- done | refused_duplicate | refused_no_space | refused | unconfirmed | deferred_armed
    outcome       text NOT NULL,
    -- The device's words for a refusal; the agent keeps PINs out of it.
    device_reason text NOT NULL DEFAULT '',
    partition     smallint,
    report_time   timestamptz NOT NULL,
    PRIMARY KEY (site_id, device_id, slot),
    FOREIGN KEY (site_id, device_id) REFERENCES device (site_id, id) ON DELETE CASCADE
);

-- Whether the agent reaches each device, and when it last did.
ALTER TABLE device ADD COLUMN reachable boolean NOT NULL DEFAULT true;
ALTER TABLE device ADD COLUMN last_contact_time timestamptz;

-- What each device reported about itself in the agent's inventory (constraints laid
-- over its model profile's); NULL: nothing reported.
ALTER TABLE device ADD COLUMN reported_constraints jsonb;
