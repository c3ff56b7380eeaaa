-- The ops surface (issue 17): the site row, which already records which stream holds
-- the site's agent (agent_session) and keeps it alive across replicas
-- (agent_last_seen), also records where that stream is, so any replica can list it;
-- and carries the operators' two remedies to whichever replica holds the stream,
-- through the change_time the wake-up poller of every replica reads.
--
-- Nullable columns and a constant default: no table rewrite, no long lock.
ALTER TABLE site
    ADD COLUMN agent_peer text,
    ADD COLUMN agent_replica text,
    ADD COLUMN agent_id uuid,
    ADD COLUMN agent_connect_time timestamptz,
    -- The session an operator closed (CloseAgentConnection): its stream ends with
    -- UNAVAILABLE, not the ABORTED of a takeover.
    ADD COLUMN agent_closed_session uuid,
    -- Advanced by ResyncSite: a stream that sees it move sends a full snapshot.
    ADD COLUMN resync_seq bigint NOT NULL DEFAULT 0;

CREATE TRIGGER site_resync_change_time BEFORE UPDATE OF resync_seq ON site
    FOR EACH ROW WHEN (NEW.resync_seq IS DISTINCT FROM OLD.resync_seq)
    EXECUTE FUNCTION site_change_time();
