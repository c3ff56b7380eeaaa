-- Personal access plans (seed 001): one per user, never deleted, only cleared.
CREATE TABLE personal_access_plan (
    site_id     uuid NOT NULL,
    user_id     uuid NOT NULL,
    configured  boolean NOT NULL DEFAULT false,
    -- keyplane_core::schedule::Schedule as JSON; NULL: always.
    schedule    jsonb,
    version     bigint NOT NULL DEFAULT 1,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, user_id),
    FOREIGN KEY (site_id, user_id) REFERENCES site_user (site_id, id) ON DELETE CASCADE
);

CREATE TABLE personal_access_point (
    site_id   uuid NOT NULL,
    user_id   uuid NOT NULL,
    device_id uuid NOT NULL,
    PRIMARY KEY (site_id, user_id, device_id),
    FOREIGN KEY (site_id, user_id) REFERENCES personal_access_plan (site_id, user_id) ON DELETE CASCADE,
    FOREIGN KEY (site_id, device_id) REFERENCES device (site_id, id)
);

INSERT INTO personal_access_plan (site_id, user_id) SELECT site_id, id FROM site_user;
