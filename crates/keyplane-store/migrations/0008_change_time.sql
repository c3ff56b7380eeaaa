-- When each site's revision last advanced (set at the update, so close to the commit),
-- so a replica finds the sites other replicas changed with one indexed query, however
-- many agents it holds. Scoped by site like everything else: no global sequence.
ALTER TABLE site ADD COLUMN change_time timestamptz NOT NULL DEFAULT now();
CREATE INDEX site_by_change_time ON site (change_time);

CREATE FUNCTION site_change_time() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_time := clock_timestamp();
    RETURN NEW;
END
$$;

CREATE TRIGGER site_change_time BEFORE UPDATE OF revision ON site
    FOR EACH ROW WHEN (NEW.revision IS DISTINCT FROM OLD.revision)
    EXECUTE FUNCTION site_change_time();
