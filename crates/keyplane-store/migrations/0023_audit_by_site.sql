-- Issue 17 (the Citus path): the audit log follows the rules of tables distributed by
-- site. Site records are keyed (site_id, position); dealer-level records (dealer
-- tokens, the retention policy, the dealer's creation) have no site and move to
-- `dealer_audit_log`, keyed (dealer_id, position).
--
-- `site.audit_seq` (`dealer.audit_seq`) is the head of each log. Every record takes
-- the next number from it in a BEFORE INSERT trigger whose UPDATE holds the site's
-- (dealer's) row lock until the transaction ends, as device_event's site_seq
-- (migration 0016): within a site, positions become visible in order, and no global
-- sequence is left. A site record can only be written while its site exists.
ALTER TABLE site ADD COLUMN audit_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE dealer ADD COLUMN audit_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE dealer_audit_log (
    dealer_id   uuid NOT NULL,
    position    bigint NOT NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    resource    text NOT NULL,
    peer        text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
    create_time timestamptz NOT NULL DEFAULT now(),
    acting_user text,
    request_id  text,
    before      jsonb,
    after       jsonb,
    PRIMARY KEY (dealer_id, position)
);
CREATE INDEX dealer_audit_log_by_time ON dealer_audit_log (dealer_id, create_time);

-- Existing records keep their order: positions follow their ids.
ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update;
INSERT INTO dealer_audit_log (dealer_id, position, actor, action, resource, peer, detail,
                              create_time, acting_user, request_id, before, after)
SELECT dealer_id, row_number() OVER (PARTITION BY dealer_id ORDER BY id), actor, action,
       resource, peer, detail, create_time, acting_user, request_id, before, after
  FROM audit_log WHERE site_id IS NULL AND dealer_id IS NOT NULL;
UPDATE dealer d SET audit_seq = m.n
  FROM (SELECT dealer_id, max(position) AS n FROM dealer_audit_log GROUP BY dealer_id) m
 WHERE m.dealer_id = d.id;
DELETE FROM audit_log WHERE site_id IS NULL;

ALTER TABLE audit_log ADD COLUMN position bigint;
UPDATE audit_log a SET position = n.rn
  FROM (SELECT id, row_number() OVER (PARTITION BY site_id ORDER BY id) AS rn FROM audit_log) n
 WHERE n.id = a.id;
UPDATE site s SET audit_seq = m.n
  FROM (SELECT site_id, max(position) AS n FROM audit_log GROUP BY site_id) m
 WHERE m.site_id = s.id;
ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update;

ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey;
DROP INDEX audit_log_by_site;
ALTER TABLE audit_log DROP COLUMN id;
ALTER TABLE audit_log ALTER COLUMN site_id SET NOT NULL,
                      ALTER COLUMN dealer_id SET NOT NULL,
                      ALTER COLUMN position SET NOT NULL;
ALTER TABLE audit_log ADD PRIMARY KEY (site_id, position);

CREATE FUNCTION audit_log_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE site SET audit_seq = audit_seq + 1 WHERE id = NEW.site_id
        RETURNING audit_seq INTO NEW.position;
    IF NEW.position IS NULL THEN
        RAISE EXCEPTION 'audit record of site %, which does not exist', NEW.site_id;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_position BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_position();

CREATE FUNCTION dealer_audit_log_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE dealer SET audit_seq = audit_seq + 1 WHERE id = NEW.dealer_id
        RETURNING audit_seq INTO NEW.position;
    IF NEW.position IS NULL THEN
        RAISE EXCEPTION 'audit record of dealer %, which does not exist', NEW.dealer_id;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER dealer_audit_log_position BEFORE INSERT ON dealer_audit_log
    FOR EACH ROW EXECUTE FUNCTION dealer_audit_log_position();

-- Append-only as before (migration 0015), the position in place of the id.
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('keyplane.audit_retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_log'
       AND current_setting('keyplane.audit_erasure', true) = 'on'
       AND NEW.site_id = OLD.site_id AND NEW.position = OLD.position
       AND NEW.dealer_id = OLD.dealer_id
       AND NEW.actor = OLD.actor AND NEW.action = OLD.action
       AND NEW.resource = OLD.resource
       AND NEW.peer IS NOT DISTINCT FROM OLD.peer
       AND NEW.detail = OLD.detail
       AND NEW.acting_user IS NOT DISTINCT FROM OLD.acting_user
       AND NEW.request_id IS NOT DISTINCT FROM OLD.request_id
       AND NEW.create_time = OLD.create_time THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER dealer_audit_log_no_update BEFORE UPDATE OR DELETE ON dealer_audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
