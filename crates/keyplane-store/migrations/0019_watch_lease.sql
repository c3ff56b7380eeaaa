-- WatchEvents places counted per dealer over every replica (issue 13): one row per
-- open stream, renewed by the replica holding it; an expired row is a dead
-- replica's and no longer counts. Dealer-scoped, never site-scoped.
CREATE TABLE watch_lease (
    id         uuid PRIMARY KEY,
    dealer_id  uuid NOT NULL REFERENCES dealer (id) ON DELETE CASCADE,
    replica    uuid NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX watch_lease_dealer ON watch_lease (dealer_id, expires_at);
CREATE INDEX watch_lease_replica ON watch_lease (replica);
