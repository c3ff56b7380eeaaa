//! Backup codes (issue 11): a pool of codes set in advance on chosen locks and doors,
//! held by the site's pool user and kept unassigned; a dealer pulls one for a person
//! (offline sites included: the code is already on the devices). Panels never: a
//! panel code is a user number with an authority level.

use crate::site::{AuditParams, SITE_FIELD_AUDIT_SQL};
use crate::{Actor, Cached, Credential, Device, Store, StoreError, batch_in_txn, in_txn, params};
use keyplane_core::pin::Pin;
use uuid::Uuid;

/// A site's backup code pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPool {
    /// The user holding the unassigned codes.
    pub user: Uuid,
    /// Locks and doors the codes are set on.
    pub devices: Vec<Uuid>,
    /// Codes kept ready.
    pub size: i32,
}

fn pool_from_json(v: Option<serde_json::Value>) -> Option<BackupPool> {
    let v = v?;
    Some(BackupPool {
        user: v.get("user")?.as_str()?.parse().ok()?,
        devices: v
            .get("devices")?
            .as_array()?
            .iter()
            .filter_map(|d| d.as_str()?.parse().ok())
            .collect(),
        size: i32::try_from(v.get("size")?.as_i64()?).ok()?,
    })
}

fn pool_to_json(p: &BackupPool) -> serde_json::Value {
    serde_json::json!({
        "user": p.user.to_string(),
        "devices": p.devices.iter().map(Uuid::to_string).collect::<Vec<_>>(),
        "size": p.size,
    })
}

/// A site's pool and how many codes it holds (site `$1` of dealer `$2`).
const POOL_SQL: &str = "SELECT s.backup_pool,
        (SELECT count(*) FROM credential c WHERE c.site_id = s.id
           AND c.user_id::text = s.backup_pool ->> 'user')
     FROM site s WHERE s.id = $1 AND s.dealer_id = $2";

/// A pool and how many codes it holds, from a row of [`POOL_SQL`].
fn pool_from_row(row: &tokio_postgres::Row) -> Option<(BackupPool, i64)> {
    pool_from_json(row.get(0)).map(|p| (p, row.get(1)))
}

impl Store {
    /// The site's pool and how many codes it holds now (None: not configured).
    pub async fn backup_pool_get(
        &self,
        dealer: Uuid,
        site: Uuid,
    ) -> Result<Option<(BackupPool, i64)>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(POOL_SQL, &[&site, &dealer])
            .await?
            .ok_or_else(|| crate::site::not_found_site(site))?;
        Ok(pool_from_row(&row))
    }

    /// What configuring or refilling a pool reads, in one round trip: the site's pool
    /// with how many codes it holds (None: not configured) and every device of the
    /// site, by id.
    pub async fn backup_pool_facts(
        &self,
        dealer: Uuid,
        site: Uuid,
    ) -> Result<(Option<(BackupPool, i64)>, Vec<Device>), StoreError> {
        let devices_sql = format!(
            "SELECT {} FROM device WHERE site_id = $1
               AND EXISTS (SELECT 1 FROM site s WHERE s.id = $1 AND s.dealer_id = $2)
             ORDER BY id",
            crate::device::DEVICE_COLUMNS
        );
        let conn = self.conn().await?;
        // Both sent before either answer comes back (tokio-postgres pipelines
        // concurrent statements on a connection).
        let p = params![&site, &dealer];
        let (pool, devices) =
            tokio::try_join!(conn.query_opt(POOL_SQL, &p), conn.query(&devices_sql, &p))?;
        let pool = pool.ok_or_else(|| crate::site::not_found_site(site))?;
        let devices = devices
            .iter()
            .map(crate::device::device_from_row)
            .collect::<Result<_, _>>()?;
        Ok((pool_from_row(&pool), devices))
    }

    /// Sets the site's pool (audited).
    pub async fn backup_pool_set(
        &self,
        actor: &Actor,
        site: Uuid,
        pool: &BackupPool,
    ) -> Result<(), StoreError> {
        let json = pool_to_json(pool);
        in_txn!(self, "backup_pool_set", |tx| {
            crate::site::site_get_in_txn(&tx, actor.dealer, site).await?;
            let audit = AuditParams::new(
                actor,
                Some(site),
                "site.backup_pool",
                &format!("sites/{site}"),
                json.clone(),
            );
            let after = Some(serde_json::json!({ "backup_pool": json }));
            batch_in_txn(
                &tx,
                &[
                    audit.step_in(SITE_FIELD_AUDIT_SQL, params![&"backup_pool", &after]),
                    (
                        "UPDATE site SET backup_pool = $2 WHERE id = $1",
                        params![&site, &json],
                    ),
                ],
            )
            .await?;
            Ok(())
        })
    }

    /// Gives one of the pool's codes to `user` at once (audited): the credential
    /// changes hands, its slots stay, and the agent hears of the new owner (whose
    /// access rules may change the code's schedule). Returns it with its PIN, shown
    /// this once.
    pub async fn backup_pull(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
        display_name: &str,
    ) -> Result<(Credential, Pin), StoreError> {
        let pick_sql = format!(
            "SELECT {}, c.pin_sealed, c.pin_key_id FROM credential c
             WHERE c.site_id = $1 AND c.user_id = (
                SELECT (s.backup_pool ->> 'user')::uuid FROM site s WHERE s.id = $1 AND s.dealer_id = $2
             )
             ORDER BY c.create_time, c.id LIMIT 1",
            crate::credential::CREDENTIAL_FIELDS
        );
        let get_sql = crate::credential::credential_get_sql();
        in_txn!(self, "backup_pull", |tx| {
            // Load in one round trip, the site lock first (as every write changing
            // desired slots takes it), so the pool and its oldest code are read under it.
            let loaded = batch_in_txn(
                &tx,
                &[
                    (
                        "SELECT backup_pool FROM site WHERE id = $1 AND dealer_id = $2 FOR NO KEY UPDATE",
                        params![&site, &actor.dealer],
                    ),
                    (
                        "SELECT 1 FROM site_user WHERE site_id = $1 AND id = $2",
                        params![&site, &user],
                    ),
                    (pick_sql.as_str(), params![&site, &actor.dealer]),
                ],
            )
            .await?;
            let [site_row, user_row, picked] = loaded.as_slice() else {
                return Err(StoreError::Internal(
                    "backup_pull: the load returned an unexpected number of results".into(),
                ));
            };
            let row = site_row
                .first()
                .ok_or_else(|| crate::site::not_found_site(site))?;
            let pool = pool_from_json(row.get(0)).ok_or_else(|| {
                StoreError::FailedPrecondition(format!(
                    "site sites/{site} keeps no backup codes: configure them first"
                ))
            })?;
            if user_row.is_empty() || user == pool.user {
                return Err(StoreError::NotFound(format!(
                    "user sites/{site}/users/{user}"
                )));
            }
            let picked = picked.first().ok_or_else(|| {
                StoreError::ResourceExhausted(format!(
                    "site sites/{site} has no backup code left; the pool refills once its devices are reachable"
                ))
            })?;
            let was = crate::credential::credential_from_row(picked);
            let credential = was.id;
            let sealed: Vec<u8> = picked.get(18);
            let key_id: String = picked.get(19);
            let held_by = |user: Uuid, display_name: &str| {
                let mut v = crate::credential::credential_audit_json(
                    display_name,
                    &was.scope,
                    was.valid_from,
                    was.valid_until,
                    was.max_uses,
                );
                v["user"] = format!("sites/{site}/users/{user}").into();
                v
            };
            let pin = self.key().open(site, credential, &key_id, &sealed)?;
            let audit = AuditParams::new(
                actor,
                Some(site),
                "backup_code.pull",
                &format!("sites/{site}/users/{user}/credentials/{credential}"),
                serde_json::json!({}),
            )
            .before(held_by(pool.user, &was.display_name))
            .after(held_by(user, display_name));
            // Written and read back in one round trip.
            let written = batch_in_txn(
                &tx,
                &[
                    (
                        "UPDATE credential SET user_id = $3, display_name = $4,
                            version = version + 1, update_time = now()
                         WHERE site_id = $1 AND id = $2",
                        params![&site, &credential, &user, &display_name],
                    ),
                    // Its slots are sent again: the new owner's rules may schedule them.
                    (
                        "WITH head AS (UPDATE site SET revision = revision + 1 WHERE id = $1 RETURNING revision)
                         INSERT INTO site_change (site_id, revision, device_id, slot)
                         SELECT $1, head.revision, sa.device_id, sa.slot FROM head, slot_assignment sa
                         WHERE sa.site_id = $1 AND sa.credential_id = $2
                         ON CONFLICT DO NOTHING",
                        params![&site, &credential],
                    ),
                    audit.step(),
                    (get_sql.as_str(), params![&site, &user, &credential]),
                ],
            )
            .await?;
            let c = written
                .last()
                .and_then(|rows| rows.first())
                .map(crate::credential::credential_from_row)
                .ok_or_else(|| {
                    StoreError::NotFound(format!(
                        "credential sites/{site}/users/{user}/credentials/{credential}"
                    ))
                })?;
            Ok((c, pin.clone()))
        })
    }
}
