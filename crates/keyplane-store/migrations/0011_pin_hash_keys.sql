-- PIN hashes carry their key id (issue 13). A site's hashes are all under one key, named
-- here, so UNIQUE (site_id, device_id, pin_hash) compares like with like at every
-- commit, during a key rotation too: `keyplaned rotate-keys` rebuilds one site's hashes
-- in one transaction that holds the site row FOR UPDATE and changes this column with
-- them. NULL: not rotated yet, the hashes are the untagged ones of before this migration,
-- under pin_key_in_use.key_id. Tagged hashes are the key id's four bytes, then the HMAC.
ALTER TABLE site ADD COLUMN pin_hash_key text;

-- The hash key a new site starts with (NULL until the first rotation).
ALTER TABLE pin_key_in_use ADD COLUMN hash_key text;

CREATE FUNCTION site_pin_hash_key_default() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.pin_hash_key IS NULL THEN
        NEW.pin_hash_key := (SELECT hash_key FROM pin_key_in_use);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER site_pin_hash_key_default BEFORE INSERT ON site
    FOR EACH ROW EXECUTE FUNCTION site_pin_hash_key_default();

-- Refuses a hash under another key than its site's: a replica with a stale idea of the
-- site's key (the rotation ran elsewhere) learns the key from the error (SQLSTATE
-- KP001, the key id as DETAIL, empty for untagged, the site as HINT) and the caller retries. KEY SHARE
-- waits for a rotation holding the site FOR UPDATE, then reads what it committed.
CREATE FUNCTION pin_hash_key_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    k text;
BEGIN
    IF NEW.pin_hash IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT pin_hash_key INTO k FROM site WHERE id = NEW.site_id FOR KEY SHARE;
    IF (k IS NULL AND length(NEW.pin_hash) = 36)
       OR (k IS NOT NULL AND (length(NEW.pin_hash) <> 36
           OR substring(NEW.pin_hash FROM 1 FOR 4) <> decode(substring(k FROM 2), 'hex'))) THEN
        RAISE EXCEPTION 'PIN hash not under its site''s hash key'
            USING ERRCODE = 'KP001', DETAIL = coalesce(k, ''), HINT = NEW.site_id::text;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER credential_pin_hash_key BEFORE INSERT OR UPDATE OF pin_hash ON credential
    FOR EACH ROW EXECUTE FUNCTION pin_hash_key_check();
CREATE TRIGGER slot_assignment_pin_hash_key BEFORE INSERT OR UPDATE OF pin_hash ON slot_assignment
    FOR EACH ROW EXECUTE FUNCTION pin_hash_key_check();
CREATE TRIGGER observed_slot_pin_hash_key BEFORE INSERT OR UPDATE OF pin_hash ON observed_slot
    FOR EACH ROW EXECUTE FUNCTION pin_hash_key_check();
