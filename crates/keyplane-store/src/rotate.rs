//! PIN key rotation: re-seals every PIN under the current key and rebuilds every PIN
//! hash, one site per transaction, while the service runs.
//!
//! Uniqueness (`UNIQUE (site_id, device_id, pin_hash)`) holds throughout because a
//! site's hashes change all at once: the transaction holds the site row FOR UPDATE
//! (writers lock it FOR NO KEY UPDATE, and the hash-key trigger of migration 0011 takes
//! FOR KEY SHARE), rewrites the site's `pin_hash_key` and every hash of the site, and
//! commits. Before and after that commit every hash of the site is under one key, so the
//! database compares like with like; a writer that hashed under the old key is refused
//! by the trigger and retries under the new one.

use crate::{Cached, StoreError, in_txn};
use uuid::Uuid;

/// What a rotation changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RotationReport {
    /// Sites whose PINs were re-sealed and hashes rebuilt.
    pub sites: u64,
    /// Credentials re-sealed.
    pub credentials: u64,
    /// Observed codes re-sealed.
    pub observed: u64,
}

impl crate::Store {
    /// Moves every sealed PIN and PIN hash to the current key, `batch` sites at a time
    /// (each site in its own short transaction), until no row uses another key; then
    /// records the current key as the database's, after which older keys may be
    /// removed from the key file. Safe to interrupt and run again.
    pub async fn rotate_pin_keys(&self, batch: usize) -> Result<RotationReport, StoreError> {
        let current = self.key().id().to_owned();
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        // Sites created from now on start under the current key.
        self.conn()
            .await?
            .execute("UPDATE pin_key_in_use SET hash_key = $1", &[&current])
            .await?;
        let mut report = RotationReport::default();
        loop {
            let sites: Vec<Uuid> = self
                .conn()
                .await?
                .query(
                    "SELECT s.id FROM site s
                     WHERE s.pin_hash_key IS DISTINCT FROM $1
                        OR EXISTS (SELECT 1 FROM credential c WHERE c.site_id = s.id AND c.pin_key_id <> $1)
                        OR EXISTS (SELECT 1 FROM observed_slot o WHERE o.site_id = s.id
                                    AND (o.pin_key_id <> $1 OR (o.pin_sealed IS NOT NULL AND NOT o.pin_bound_slot)))
                     ORDER BY s.id LIMIT $2",
                    &[&current, &batch],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if sites.is_empty() {
                break;
            }
            for site in sites {
                let (credentials, observed) = self.rotate_site(site).await?;
                report.sites += 1;
                report.credentials += credentials;
                report.observed += observed;
            }
            tracing::info!(sites = report.sites, "PIN key rotation progress");
        }
        self.conn()
            .await?
            .execute(
                "UPDATE pin_key_in_use SET key_id = $1, since = now()",
                &[&current],
            )
            .await?;
        Ok(report)
    }

    async fn rotate_site(&self, site: Uuid) -> Result<(u64, u64), StoreError> {
        let key = self.key().clone();
        let current = key.id().to_owned();
        let counts = in_txn!(self, "rotate_site", |tx| {
            tx.execute("SELECT 1 FROM site WHERE id = $1 FOR UPDATE", &[&site])
                .await?;
            tx.execute(
                "UPDATE site SET pin_hash_key = $2 WHERE id = $1",
                &[&site, &current],
            )
            .await?;
            let rows = tx
                .query(
                    "SELECT id, pin_sealed, pin_key_id FROM credential WHERE site_id = $1",
                    &[&site],
                )
                .await?;
            let (mut ids, mut sealed, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
            for r in &rows {
                let id: Uuid = r.get(0);
                let pin = key.open(site, id, r.get(2), r.get(1))?;
                ids.push(id);
                sealed.push(key.seal(site, id, &pin)?);
                hashes.push(key.pin_hash(site, &pin));
            }
            tx.execute(
                "UPDATE credential c SET pin_sealed = u.sealed, pin_key_id = $2, pin_hash = u.hash
                 FROM unnest($3::uuid[], $4::bytea[], $5::bytea[]) AS u(id, sealed, hash)
                 WHERE c.site_id = $1 AND c.id = u.id",
                &[&site, &current, &ids, &sealed, &hashes],
            )
            .await?;
            tx.execute(
                "UPDATE slot_assignment sa SET pin_hash = c.pin_hash FROM credential c
                 WHERE sa.site_id = $1 AND c.site_id = $1 AND c.id = sa.credential_id
                   AND sa.pin_hash IS DISTINCT FROM c.pin_hash",
                &[&site],
            )
            .await?;
            let rows = tx
                .query(
                    "SELECT device_id, slot, pin_sealed, pin_key_id, pin_bound_slot FROM observed_slot
                     WHERE site_id = $1 AND pin_sealed IS NOT NULL",
                    &[&site],
                )
                .await?;
            let (mut devices, mut slots, mut o_sealed, mut o_hashes) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for r in &rows {
                let (device, slot): (Uuid, i32) = (r.get(0), r.get(1));
                let pin = crate::observed::open_observed(
                    &key,
                    site,
                    device,
                    slot,
                    r.get(4),
                    r.get(3),
                    r.get(2),
                )?;
                devices.push(device);
                slots.push(slot);
                // Bound to the whole place, slot included (migration 0012).
                o_sealed.push(key.seal_at(site, device, &slot.to_be_bytes(), &pin)?);
                o_hashes.push(key.pin_hash(site, &pin));
            }
            tx.execute(
                "UPDATE observed_slot o SET pin_sealed = u.sealed, pin_key_id = $2, pin_hash = u.hash, pin_bound_slot = true
                 FROM unnest($3::uuid[], $4::int[], $5::bytea[], $6::bytea[]) AS u(device, slot, sealed, hash)
                 WHERE o.site_id = $1 AND o.device_id = u.device AND o.slot = u.slot",
                &[&site, &current, &devices, &slots, &o_sealed, &o_hashes],
            )
            .await?;
            Ok((ids.len() as u64, devices.len() as u64))
        })?;
        self.hash_keys.set_site(site, Some(current));
        Ok(counts)
    }
}
