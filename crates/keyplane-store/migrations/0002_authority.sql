-- Authority levels (seed 002): a user's level per partition, open/close reporting,
-- and the partition each code was created in.

CREATE TABLE user_authority (
    site_id   uuid NOT NULL,
    user_id   uuid NOT NULL,
    partition smallint NOT NULL,
    -- 0 installer, 1 master, 2 manager, 3-5 operator A/B/C, 6 duress.
    level     smallint NOT NULL CHECK (level BETWEEN 0 AND 6),
    PRIMARY KEY (site_id, user_id, partition),
    FOREIGN KEY (site_id, user_id) REFERENCES site_user (site_id, id) ON DELETE CASCADE,
    FOREIGN KEY (site_id, partition) REFERENCES partition (site_id, number)
);

ALTER TABLE site_user ADD COLUMN open_close_reporting boolean NOT NULL DEFAULT false;
ALTER TABLE credential ADD COLUMN created_partition smallint;
