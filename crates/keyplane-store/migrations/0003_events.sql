-- Events reported by agents, stored once per (device, sequence number).
CREATE TABLE device_event (
    id           bigserial NOT NULL,
    site_id      uuid NOT NULL REFERENCES site (id) ON DELETE CASCADE,
    device_id    uuid NOT NULL,
    source_seq   bigint NOT NULL,
    kind         text NOT NULL,
    partition    smallint,
    user_number  integer,
    user_id      uuid,
    silent_alarm boolean NOT NULL DEFAULT false,
    occur_time   timestamptz NOT NULL,
    create_time  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, id),
    UNIQUE (site_id, device_id, source_seq)
);
CREATE INDEX device_event_by_id ON device_event (id);
