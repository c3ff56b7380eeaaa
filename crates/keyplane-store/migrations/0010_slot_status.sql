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

-- Slot status transitions become events (docs/STATUS.md): the issue and credential
-- they are about.
ALTER TABLE device_event ADD COLUMN issue text;
ALTER TABLE device_event ADD COLUMN credential_id uuid;

-- The last evaluation of each slot assignment, so the next one's differences become
-- events. It outlives its assignment (credential deleted, device out of scope) until
-- the device confirms the removal: what shows the code REMOVING meanwhile.
CREATE TABLE slot_state_last (
    site_id       uuid NOT NULL,
    device_id     uuid NOT NULL,
    slot          integer NOT NULL,
    credential_id uuid NOT NULL,
    user_id       uuid NOT NULL,
    status        text NOT NULL,
    withheld      text,
    withheld_at   timestamptz,
    issues        text[] NOT NULL,
    PRIMARY KEY (site_id, device_id, slot),
    FOREIGN KEY (site_id, device_id) REFERENCES device (site_id, id) ON DELETE CASCADE
);

-- Which sites need their slot assignments evaluated again: `status_seq` advances with
-- anything the status is decided from; a site is due while it is ahead of the last
-- evaluation, and pending (evaluated on every sweep) while something changes by the
-- clock alone (a delay, an offline device, a schedule). Per-kind threshold overrides.
ALTER TABLE site ADD COLUMN status_seq bigint NOT NULL DEFAULT 1;
ALTER TABLE site ADD COLUMN status_evaluated_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE site ADD COLUMN status_pending boolean NOT NULL DEFAULT false;
ALTER TABLE site ADD COLUMN status_evaluated_at timestamptz;
ALTER TABLE site ADD COLUMN status_thresholds jsonb;
CREATE INDEX site_status_due ON site (status_evaluated_at)
    WHERE status_seq > status_evaluated_seq OR status_pending;

CREATE FUNCTION site_status_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.status_seq := OLD.status_seq + 1;
    RETURN NEW;
END
$$;

-- A new revision, an ack (agent_last_seen), the agent's stream, a lockdown: the
-- same row update advances the sequence.
CREATE TRIGGER site_status_seq BEFORE UPDATE OF revision, agent_last_seen, agent_connected, lockdown ON site
    FOR EACH ROW WHEN (NEW.revision IS DISTINCT FROM OLD.revision
        OR NEW.agent_last_seen IS DISTINCT FROM OLD.agent_last_seen
        OR NEW.agent_connected IS DISTINCT FROM OLD.agent_connected
        OR NEW.lockdown IS DISTINCT FROM OLD.lockdown)
    EXECUTE FUNCTION site_status_seq();

CREATE FUNCTION observed_status_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE site SET status_seq = status_seq + 1
    WHERE id IN (SELECT DISTINCT site_id FROM changed_rows);
    RETURN NULL;
END
$$;

-- What the agent read back (drift, conflicts): once per statement, however many rows.
CREATE TRIGGER observed_status_seq_insert AFTER INSERT ON observed_slot
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION observed_status_seq();
CREATE TRIGGER observed_status_seq_update AFTER UPDATE ON observed_slot
    REFERENCING NEW TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION observed_status_seq();
CREATE TRIGGER observed_status_seq_delete AFTER DELETE ON observed_slot
    REFERENCING OLD TABLE AS changed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION observed_status_seq();

-- Backup codes (locks and doors only), opt-in per site: the pool's user (whose
-- credentials are the unassigned codes), its devices and its size.
ALTER TABLE site ADD COLUMN backup_pool jsonb;
