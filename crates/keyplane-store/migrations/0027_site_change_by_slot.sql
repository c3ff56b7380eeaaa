-- The status evaluation reads, for each slot, the latest and the earliest logged
-- change of that slot. With only (site, device, revision) to go by, it read every
-- logged change of the device and kept the slot's: a door whose slot 1 was reused
-- by 800 changes cost 7 ms per evaluation (601 heap pages), and the sweep evaluates
-- a site after every change. With this index each is one probe.
CREATE INDEX site_change_by_slot ON site_change (site_id, device_id, slot, revision);
