-- Issue 17: the W3C trace context of the transaction that wrote a change, so the
-- agent's apply of it joins the trace of the call that made it. Set per transaction
-- (`set_config('keyplane.traceparent', ..., true)`, only while traces are exported)
-- and taken as the column default, so no writer of the change log passes it along.
-- NULL: written without tracing, or before this migration.
ALTER TABLE site_change ADD COLUMN traceparent text;
-- A separate statement: a volatile default in ADD COLUMN would rewrite the table.
ALTER TABLE site_change ALTER COLUMN traceparent
    SET DEFAULT NULLIF(current_setting('keyplane.traceparent', true), '');
