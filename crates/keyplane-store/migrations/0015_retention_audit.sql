-- Retention and audit fields (issue 13).
--
-- Each dealer keeps events and audit records for a period of its own (default: events
-- 400 days, audit records 7 years), in seconds; keyplaned deletes older rows in small
-- batches (Store::retention_sweep).
ALTER TABLE dealer ADD COLUMN event_retention_seconds bigint NOT NULL DEFAULT 34560000
    CHECK (event_retention_seconds >= 86400);
ALTER TABLE dealer ADD COLUMN audit_retention_seconds bigint NOT NULL DEFAULT 220903200
    CHECK (audit_retention_seconds >= 86400);

CREATE INDEX device_event_by_create_time ON device_event (site_id, create_time);
CREATE INDEX audit_log_by_dealer_time ON audit_log (dealer_id, create_time);

-- Who acted as whom, which request, and the resource before and after (never a PIN).
ALTER TABLE audit_log ADD COLUMN acting_user text;
ALTER TABLE audit_log ADD COLUMN request_id text;
ALTER TABLE audit_log ADD COLUMN before jsonb;
ALTER TABLE audit_log ADD COLUMN after jsonb;

-- The audit log stays append-only for every writer but two, each enabled for one
-- transaction by a setting keyplaned makes there (SET LOCAL): retention deletes rows
-- past the dealer's period, and erasure of a person replaces the personal fields of
-- the before/after values of records about them. Nothing else may change a record.
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('keyplane.audit_retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND current_setting('keyplane.audit_erasure', true) = 'on'
       AND NEW.id = OLD.id
       AND NEW.dealer_id IS NOT DISTINCT FROM OLD.dealer_id
       AND NEW.site_id IS NOT DISTINCT FROM OLD.site_id
       AND NEW.actor = OLD.actor AND NEW.action = OLD.action
       AND NEW.resource = OLD.resource
       AND NEW.peer IS NOT DISTINCT FROM OLD.peer
       AND NEW.detail = OLD.detail
       AND NEW.acting_user IS NOT DISTINCT FROM OLD.acting_user
       AND NEW.request_id IS NOT DISTINCT FROM OLD.request_id
       AND NEW.create_time = OLD.create_time THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;
