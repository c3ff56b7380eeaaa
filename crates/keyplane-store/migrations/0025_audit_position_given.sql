-- A write that already updates its site row (a credential's create, update or
-- delete advances the revision) advances the site's audit sequence in the same
-- UPDATE and gives its audit record that position; the trigger then leaves it.
-- Before, the trigger updated the site row a second time in every such write.
-- Any other insert is numbered by the trigger as before. A given position is
-- still checked by the primary key (site_id, position): a position taken twice
-- fails the write.
CREATE OR REPLACE FUNCTION audit_log_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.position IS NOT NULL THEN
        RETURN NEW;
    END IF;
    UPDATE site SET audit_seq = audit_seq + 1 WHERE id = NEW.site_id
        RETURNING audit_seq INTO NEW.position;
    IF NEW.position IS NULL THEN
        RAISE EXCEPTION 'audit record of site %, which does not exist', NEW.site_id;
    END IF;
    RETURN NEW;
END
$$;
