-- Issue 11, second round (docs/STATUS.md).

-- What each device is known to hold of the credential in a slot, recorded by the
-- status evaluation whenever the device has acked the slot's last change, so a change
-- on its way can say what it changes: the code (keyed PIN hash and write generation,
-- never a PIN), the schedules (from, to), or other settings. `held_known` false: not
-- recorded yet (then the code is taken to change); `held_pin_hash` NULL: the device
-- holds nothing of it.
ALTER TABLE slot_state_last ADD COLUMN held_known boolean NOT NULL DEFAULT false;
ALTER TABLE slot_state_last ADD COLUMN held_pin_hash bytea;
ALTER TABLE slot_state_last ADD COLUMN held_generation bigint;
ALTER TABLE slot_state_last ADD COLUMN held_schedules jsonb;

-- A removal is shown REMOVING whether or not the assignment was evaluated before: the
-- removed assignment is kept in slot_state_last (as REMOVING, its last evaluation
-- when it had one) until the device confirms. A newer removal in the same slot
-- replaces an older one: the slot is cleared for it now.
CREATE FUNCTION slot_assignment_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO slot_state_last (site_id, device_id, slot, credential_id, user_id, status, issues)
    SELECT o.site_id, o.device_id, o.slot, o.credential_id, c.user_id, 'REMOVING', '{}'::text[]
    FROM removed_rows o
    JOIN credential c ON c.site_id = o.site_id AND c.id = o.credential_id
    WHERE EXISTS (SELECT 1 FROM device d WHERE d.site_id = o.site_id AND d.id = o.device_id)
    ON CONFLICT (site_id, device_id, slot) DO UPDATE SET
        credential_id = EXCLUDED.credential_id, user_id = EXCLUDED.user_id,
        status = EXCLUDED.status, withheld = NULL, withheld_at = NULL,
        issues = EXCLUDED.issues, held_known = false, held_pin_hash = NULL,
        held_generation = NULL, held_schedules = NULL
    WHERE slot_state_last.credential_id IS DISTINCT FROM EXCLUDED.credential_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER slot_assignment_removed AFTER DELETE ON slot_assignment
    REFERENCING OLD TABLE AS removed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION slot_assignment_removed();

-- The first evaluation of a site that held assignments before the status sweep
-- existed is a baseline: it records what holds without raising an event for it (a
-- code set long ago is not news). Sites created from now on have nothing to baseline;
-- sites already evaluated have their baseline.
ALTER TABLE site ADD COLUMN status_baseline boolean NOT NULL DEFAULT true;
ALTER TABLE site ALTER COLUMN status_baseline SET DEFAULT false;
UPDATE site SET status_baseline = false WHERE status_evaluated_at IS NOT NULL;

-- Users keyplane keeps for itself (the backup code pool's holder): not people, so not
-- listed, read, changed or deleted through the user API.
ALTER TABLE site_user ADD COLUMN system boolean NOT NULL DEFAULT false;
UPDATE site_user u SET system = true FROM site s
    WHERE s.id = u.site_id AND s.backup_pool ->> 'user' = u.id::text;
