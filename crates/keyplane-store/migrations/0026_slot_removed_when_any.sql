-- The removal trigger is a statement trigger, so it ran its insert into
-- slot_state_last on every DELETE of slot_assignment, also when the statement
-- deleted nothing: every credential write's slot statement holds a DELETE (of the
-- slots its plan frees, none on a create). It now returns at once when no row was
-- removed; what it records when rows were removed is unchanged.
CREATE OR REPLACE FUNCTION slot_assignment_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM removed_rows) THEN
        RETURN NULL;
    END IF;
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
