-- A credential write sends its COMMIT in the same round trip as the write itself,
-- so the write must refuse itself when a planned slot was not given: the statement
-- then fails, the transaction is rolled back by that COMMIT, and nothing is kept.
-- Before, the service read the allocated slots back and rolled back on its own,
-- which cost the COMMIT a round trip of its own. The first device of `planned`
-- that is not in `given` is named in DETAIL (the service words the message).
CREATE FUNCTION keyplane_slots_given(planned uuid[], given uuid[]) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    SELECT p INTO missing FROM unnest(planned) AS p WHERE p <> ALL(given) LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'device % has no free slot', missing
            USING ERRCODE = 'KP002', DETAIL = missing::text;
    END IF;
    RETURN true;
END
$$;
