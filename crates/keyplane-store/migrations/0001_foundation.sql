-- Foundation: dealers, sites, devices, users, credentials, slot assignments and the
-- per-site change log. Every site-scoped table carries site_id in its primary key so
-- the schema can be distributed by site (Citus) without changes.

CREATE TABLE dealer (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    display_name text NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now()
);

-- Bearer tokens are stored as SHA-256 hashes; the token itself is shown once.
CREATE TABLE dealer_token (
    token_hash  bytea PRIMARY KEY,
    dealer_id   uuid NOT NULL REFERENCES dealer (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE site (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    dealer_id         uuid NOT NULL REFERENCES dealer (id),
    display_name      text NOT NULL,
    time_zone         text NOT NULL,
    local_code_policy text NOT NULL DEFAULT 'preserve'
        CHECK (local_code_policy IN ('preserve', 'authoritative')),
    -- Head of the change log; advanced under the site row lock, so it is gap-free.
    revision          bigint NOT NULL DEFAULT 0,
    version           bigint NOT NULL DEFAULT 1,
    agent_connected   boolean NOT NULL DEFAULT false,
    agent_last_seen   timestamptz,
    create_time       timestamptz NOT NULL DEFAULT now(),
    update_time       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX site_by_dealer ON site (dealer_id, id);

CREATE TABLE agent_token (
    token_hash  bytea PRIMARY KEY,
    site_id     uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_token_by_site ON agent_token (site_id);

CREATE TABLE partition (
    site_id      uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    number       smallint NOT NULL CHECK (number BETWEEN 1 AND 8),
    display_name text NOT NULL,
    version      bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (site_id, number)
);

CREATE TABLE device (
    site_id          uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    id               uuid NOT NULL DEFAULT gen_random_uuid(),
    display_name     text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('panel', 'lock', 'door')),
    model            text NOT NULL,
    partition        smallint,
    perimeter        boolean NOT NULL DEFAULT false,
    version          bigint NOT NULL DEFAULT 1,
    -- Site revision up to which the agent reported this device applied.
    applied_revision bigint NOT NULL DEFAULT 0,
    last_seen_time   timestamptz,
    create_time      timestamptz NOT NULL DEFAULT now(),
    update_time      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, id),
    FOREIGN KEY (site_id, partition) REFERENCES partition (site_id, number)
);

CREATE TABLE site_user (
    site_id      uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    display_name text NOT NULL,
    version      bigint NOT NULL DEFAULT 1,
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, id)
);

-- The PIN is sealed (ChaCha20-Poly1305, key id kept for rotation); pin_hash is a keyed
-- HMAC so uniqueness is checked without decrypting.
CREATE TABLE credential (
    site_id        uuid NOT NULL,
    id             uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id        uuid NOT NULL,
    display_name   text NOT NULL,
    pin_sealed     bytea NOT NULL,
    pin_key_id     text NOT NULL,
    pin_hash       bytea NOT NULL,
    version        bigint NOT NULL DEFAULT 1,
    create_time    timestamptz NOT NULL DEFAULT now(),
    update_time    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, id),
    FOREIGN KEY (site_id, user_id) REFERENCES site_user (site_id, id) ON DELETE CASCADE
);
CREATE INDEX credential_by_user ON credential (site_id, user_id, id);

CREATE TABLE credential_partition (
    site_id       uuid NOT NULL,
    credential_id uuid NOT NULL,
    partition     smallint NOT NULL,
    PRIMARY KEY (site_id, credential_id, partition),
    FOREIGN KEY (site_id, credential_id) REFERENCES credential (site_id, id) ON DELETE CASCADE,
    FOREIGN KEY (site_id, partition) REFERENCES partition (site_id, number)
);

CREATE TABLE credential_device (
    site_id       uuid NOT NULL,
    credential_id uuid NOT NULL,
    device_id     uuid NOT NULL,
    PRIMARY KEY (site_id, credential_id, device_id),
    FOREIGN KEY (site_id, credential_id) REFERENCES credential (site_id, id) ON DELETE CASCADE,
    FOREIGN KEY (site_id, device_id) REFERENCES device (site_id, id)
);

-- Where each credential sits on each device. The keys make a double-assigned slot and a
-- duplicate code on one device impossible, whatever the application does.
CREATE TABLE slot_assignment (
    site_id       uuid NOT NULL,
    device_id     uuid NOT NULL,
    slot          integer NOT NULL,
    credential_id uuid NOT NULL,
    pin_hash      bytea NOT NULL,
    PRIMARY KEY (site_id, device_id, slot),
    UNIQUE (site_id, device_id, pin_hash),
    UNIQUE (site_id, credential_id, device_id),
    FOREIGN KEY (site_id, device_id) REFERENCES device (site_id, id),
    FOREIGN KEY (site_id, credential_id) REFERENCES credential (site_id, id)
);

-- One row per (revision, device, slot) whose desired value changed; written in the same
-- transaction as the change. Agents replay it from their last applied revision.
CREATE TABLE site_change (
    site_id   uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    revision  bigint NOT NULL,
    device_id uuid NOT NULL,
    slot      integer NOT NULL,
    PRIMARY KEY (site_id, revision, device_id, slot)
);
-- Sync status reads per device: the latest change and the changes after an ack.
CREATE INDEX site_change_by_device ON site_change (site_id, device_id, revision);

CREATE TABLE idempotency_key (
    dealer_id     uuid NOT NULL REFERENCES dealer (id) ON DELETE CASCADE,
    request_id    text NOT NULL,
    method        text NOT NULL,
    fingerprint   bytea NOT NULL,
    resource_name text NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dealer_id, request_id)
);

-- Append-only: who did what, when, from where.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    dealer_id   uuid,
    site_id     uuid,
    actor       text NOT NULL,
    action      text NOT NULL,
    resource    text NOT NULL,
    peer        text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_by_site ON audit_log (site_id, id);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
