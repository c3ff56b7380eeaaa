-- Observed codes are sealed bound to their whole place (site, device and slot) as
-- associated data, so a sealed value moved to another slot of the same device no
-- longer opens (issue 13). Rows sealed before this migration are bound to (site,
-- device) only; they are re-sealed by the agent's next report of the device (every
-- report rewrites the device's rows) or by `keyplaned rotate-keys`, which re-seals
-- them under the current key. Once true, a row opens only with its slot: setting
-- it back to false does not help, the slot is in the authenticated data.
ALTER TABLE observed_slot ADD COLUMN pin_bound_slot boolean NOT NULL DEFAULT false;
