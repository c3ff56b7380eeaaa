-- The agent certificate authority's key every replica must use, recorded by the first
-- replica that starts with one (like pin_key_in_use).
CREATE TABLE ca_key_in_use (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key_id     text NOT NULL,
    since      timestamptz NOT NULL DEFAULT now()
);

-- One-time enrollment codes, stored hashed, each bound to one site.
CREATE TABLE enrollment_code (
    code_hash   bytea PRIMARY KEY,
    site_id     uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    expire_time timestamptz NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX enrollment_code_by_site ON enrollment_code (site_id);

-- Enrolled agents. A connection is recognized by the SHA-256 of the client
-- certificate it presents; the row alone maps it to its site.
CREATE TABLE agent (
    id          uuid PRIMARY KEY,
    site_id     uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    cert_sha256 bytea NOT NULL UNIQUE,
    not_after   timestamptz NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    revoke_time timestamptz
);
CREATE INDEX agent_by_site ON agent (site_id);

-- Advanced whenever a live agent session of the site may have to end (revocation,
-- re-enrollment, a new token, another session taking over). Like a revision change
-- it sets change_time, so the poller of every replica sees it.
ALTER TABLE site ADD COLUMN session_epoch bigint NOT NULL DEFAULT 0;

CREATE TRIGGER site_session_epoch_change_time BEFORE UPDATE OF session_epoch ON site
    FOR EACH ROW WHEN (NEW.session_epoch IS DISTINCT FROM OLD.session_epoch)
    EXECUTE FUNCTION site_change_time();

-- Deleted sites, briefly, so every replica's poller closes their streams.
CREATE TABLE site_gone (
    site_id   uuid PRIMARY KEY,
    gone_time timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX site_gone_by_time ON site_gone (gone_time);

CREATE FUNCTION site_gone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM site_gone WHERE gone_time < now() - interval '1 hour';
    INSERT INTO site_gone (site_id) VALUES (OLD.id) ON CONFLICT DO NOTHING;
    RETURN OLD;
END
$$;

CREATE TRIGGER site_gone AFTER DELETE ON site
    FOR EACH ROW EXECUTE FUNCTION site_gone();

-- Dealer tokens: an id to revoke by, a scope, an optional expiry.
ALTER TABLE dealer_token
    ADD COLUMN id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    ADD COLUMN scope text NOT NULL DEFAULT 'admin' CHECK (scope IN ('admin', 'ops', 'read_only')),
    ADD COLUMN expire_time timestamptz,
    ADD COLUMN display_name text NOT NULL DEFAULT '';
