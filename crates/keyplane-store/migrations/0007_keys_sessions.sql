-- The PIN key every replica must use, recorded by the first replica that starts, so
-- a replica given another key is refused even before any PIN is sealed.
CREATE TABLE pin_key_in_use (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key_id     text NOT NULL,
    since      timestamptz NOT NULL DEFAULT now()
);

-- The agent stream that last opened for a site: only that stream marks the site
-- disconnected when it ends (a replaced or duplicate stream does not).
ALTER TABLE site ADD COLUMN agent_session uuid;

-- A panel spans partitions (its codes name them); it has none of its own.
UPDATE device SET partition = NULL WHERE kind = 'panel';
