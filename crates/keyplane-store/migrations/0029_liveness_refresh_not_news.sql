-- A replica refreshes `agent_last_seen` of every site whose agent stream it holds, in
-- one statement every 30 s. That refresh moved the site's status sequence, so every
-- held site became due for the status sweep every 30 s: with 10,000 idle agents,
-- 330 sites a second against a sweep of 16, and a site with a real change (a new
-- revision, a lockdown) queued behind thousands whose status could not change.
-- A refresh changes nothing a status is decided from while the agent stays
-- connected. When the refresh had lapsed (the agent counted as disconnected), only
-- slots in flight showed it, and those keep their site pending, evaluated on every
-- sweep, so the next sweep after the refresh clears it. A new stream (agent_session)
-- still moves the sequence, as opening and closing one (agent_connected) does.
DROP TRIGGER site_status_seq ON site;
CREATE TRIGGER site_status_seq BEFORE UPDATE OF revision, agent_connected, agent_session, lockdown ON site
    FOR EACH ROW WHEN (NEW.revision IS DISTINCT FROM OLD.revision
        OR NEW.agent_connected IS DISTINCT FROM OLD.agent_connected
        OR NEW.agent_session IS DISTINCT FROM OLD.agent_session
        OR NEW.lockdown IS DISTINCT FROM OLD.lockdown)
    EXECUTE FUNCTION site_status_seq();
