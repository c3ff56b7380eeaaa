-- What a site's agent said about itself in its last Hello (issue 14): its version and
-- protocol, its time-zone database, its clock and the skew keyplaned measured
-- against its own. `clock_skew_since` is set while the skew is beyond keyplaned's
-- threshold (GetSyncStatus `clock_skew`); its changes are events.
CREATE TABLE agent_hello (
    site_id          uuid PRIMARY KEY REFERENCES site (id) ON DELETE CASCADE,
    agent_version    text NOT NULL,
    protocol_version integer NOT NULL,
    tzdb_version     text NOT NULL,
    agent_time       timestamptz,
    receive_time     timestamptz NOT NULL,
    clock_skew_ms    bigint,
    -- The threshold the skew was classified against (keyplaned's configuration then).
    clock_skew_threshold_ms bigint NOT NULL,
    clock_skew_since timestamptz
);
