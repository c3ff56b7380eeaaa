-- Standard access plans (doors, shared by many users), site holidays, door lockdown,
-- temporary and limited-use codes, and events raised by people rather than devices.

CREATE TABLE access_plan (
    site_id      uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    display_name text NOT NULL,
    -- keyplane_core::schedule::Schedule as JSON; NULL: always.
    schedule     jsonb,
    version      bigint NOT NULL DEFAULT 1,
    update_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, id)
);

CREATE TABLE access_plan_device (
    site_id   uuid NOT NULL,
    plan_id   uuid NOT NULL,
    device_id uuid NOT NULL,
    PRIMARY KEY (site_id, plan_id, device_id),
    FOREIGN KEY (site_id, plan_id) REFERENCES access_plan (site_id, id) ON DELETE CASCADE,
    FOREIGN KEY (site_id, device_id) REFERENCES device (site_id, id)
);

CREATE TABLE access_plan_member (
    site_id uuid NOT NULL,
    plan_id uuid NOT NULL,
    user_id uuid NOT NULL,
    PRIMARY KEY (site_id, plan_id, user_id),
    FOREIGN KEY (site_id, plan_id) REFERENCES access_plan (site_id, id) ON DELETE CASCADE,
    FOREIGN KEY (site_id, user_id) REFERENCES site_user (site_id, id) ON DELETE CASCADE
);

-- A holiday pauses the chosen standard plans on a local date (all plans, personal
-- ones included, when none is chosen).
CREATE TABLE holiday (
    site_id      uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    day          date NOT NULL,
    display_name text NOT NULL,
    plan_ids     uuid[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (site_id, day)
);

ALTER TABLE site ADD COLUMN lockdown boolean NOT NULL DEFAULT false;

ALTER TABLE credential ADD COLUMN valid_from timestamptz;
ALTER TABLE credential ADD COLUMN valid_until timestamptz;
ALTER TABLE credential ADD COLUMN max_uses integer;
ALTER TABLE credential ADD COLUMN uses integer NOT NULL DEFAULT 0;

ALTER TABLE device_event ALTER COLUMN device_id DROP NOT NULL;
ALTER TABLE device_event ADD COLUMN actor text;
