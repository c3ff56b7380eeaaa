//! Sites, and the helpers every site-scoped write uses: the site lock, the revision
//! counter, the audit log and idempotency keys.

use crate::{
    Actor, LocalCodePolicy, NewSite, PageRequest, RequestKey, Site, SitePatch, Store, StoreError,
    in_txn,
};
use crate::{Cached, Transaction};
use tokio_postgres::Row;
use uuid::Uuid;

pub(crate) const SITE_COLUMNS: &str =
    "id, display_name, time_zone, local_code_policy, revision, version, create_time, update_time";

pub(crate) fn site_from_row(row: &Row) -> Site {
    Site {
        id: row.get(0),
        display_name: row.get(1),
        time_zone: row.get(2),
        local_code_policy: LocalCodePolicy::parse(row.get(3)),
        revision: row.get(4),
        version: row.get(5),
        create_time: row.get(6),
        update_time: row.get(7),
    }
}

pub(crate) fn not_found_site(site: Uuid) -> StoreError {
    StoreError::NotFound(format!("site sites/{site}"))
}

/// Reads a site of `dealer`; another dealer's site is not found.
pub(crate) async fn site_get_in_txn(
    tx: &Transaction<'_>,
    dealer: Uuid,
    site: Uuid,
) -> Result<Site, StoreError> {
    site_select_in_txn(tx, dealer, site, "").await
}

/// Locks a site of `dealer` for a write that may change desired slots.
pub(crate) async fn site_lock_in_txn(
    tx: &Transaction<'_>,
    dealer: Uuid,
    site: Uuid,
) -> Result<Site, StoreError> {
    site_select_in_txn(tx, dealer, site, "FOR NO KEY UPDATE").await
}

async fn site_select_in_txn(
    tx: &Transaction<'_>,
    dealer: Uuid,
    site: Uuid,
    lock: &str,
) -> Result<Site, StoreError> {
    let row = tx
        .query_opt(
            &format!("SELECT {SITE_COLUMNS} FROM site WHERE id = $1 AND dealer_id = $2 {lock}"),
            &[&site, &dealer],
        )
        .await?
        .ok_or_else(|| not_found_site(site))?;
    Ok(site_from_row(&row))
}

/// A `(device_id, slot)` row as a changed slot; slots are 1..=1000 by the profiles.
pub(crate) fn device_slot(row: &tokio_postgres::Row) -> (Uuid, u16) {
    (row.get(0), u16::try_from(row.get::<_, i32>(1)).unwrap_or(0))
}

/// Records a change of every slot user `$2` holds on devices of kinds `$3` (their
/// levels or access rules changed, so what those devices hold must be sent again), as
/// one statement; site `$1`.
pub(crate) fn user_slots_changed_sql() -> String {
    changes_record_sql(
        "SELECT sa.device_id, sa.slot FROM slot_assignment sa
         JOIN credential c ON c.site_id = sa.site_id AND c.id = sa.credential_id
         JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
         WHERE sa.site_id = $1 AND c.user_id = $2 AND d.kind = ANY($3)",
    )
}

/// One statement that records the (device, slot) rows `changed` selects (site id in
/// `$1`) under a new revision, advancing the revision only when there are any.
pub(crate) fn changes_record_sql(changed: &str) -> String {
    format!(
        "WITH changed AS ({changed}),
         head AS (
            UPDATE site SET revision = revision + 1
             WHERE id = $1 AND EXISTS (SELECT 1 FROM changed) RETURNING revision
         )
         INSERT INTO site_change (site_id, revision, device_id, slot)
         SELECT DISTINCT $1, head.revision, changed.device_id, changed.slot FROM head, changed
         ON CONFLICT DO NOTHING"
    )
}

/// Advances the site revision (the site row must be locked) and records the changed
/// slots under it, in one statement. Returns the new revision.
pub(crate) async fn site_change_record_in_txn(
    tx: &Transaction<'_>,
    site: Uuid,
    changed: &[(Uuid, u16)],
) -> Result<i64, StoreError> {
    let devices: Vec<Uuid> = changed.iter().map(|(d, _)| *d).collect();
    let slots: Vec<i32> = changed.iter().map(|(_, s)| i32::from(*s)).collect();
    let row = tx
        .query_one(
            "WITH head AS (
                UPDATE site SET revision = revision + 1 WHERE id = $1 RETURNING revision
             ), logged AS (
                INSERT INTO site_change (site_id, revision, device_id, slot)
                SELECT $1, head.revision, c.d, c.s FROM head, unnest($2::uuid[], $3::int[]) AS c(d, s)
                ON CONFLICT DO NOTHING
             )
             SELECT revision FROM head",
            &[&site, &devices, &slots],
        )
        .await?;
    Ok(row.get(0))
}

/// Appends to the audit log.
pub(crate) async fn audit_in_txn(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Option<Uuid>,
    action: &str,
    resource: &str,
    detail: serde_json::Value,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit_log (dealer_id, site_id, actor, action, resource, peer, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &actor.dealer,
            &site,
            &actor.principal,
            &action,
            &resource,
            &actor.peer,
            &detail,
        ],
    )
    .await?;
    Ok(())
}

/// Looks up an idempotency key: `Some(resource id)` when this request already ran.
/// A reused request id with another method or body is refused.
pub(crate) async fn request_replay_in_txn(
    tx: &Transaction<'_>,
    dealer: Uuid,
    key: Option<&RequestKey>,
) -> Result<Option<String>, StoreError> {
    let Some(key) = key else { return Ok(None) };
    // Serialize concurrent retries of one request id: the second waits for the first.
    tx.execute(REPLAY_LOCK_SQL, &[&dealer.to_string(), &key.request_id])
        .await?;
    let row = tx
        .query_opt(REPLAY_LOOKUP_SQL, &[&dealer, &key.request_id])
        .await?;
    replay_decide(key, row)
}

/// Waits for other requests with the same idempotency key (dealer, request id) to end.
pub(crate) const REPLAY_LOCK_SQL: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended($1::text || $2::text, 0))";
/// What an idempotency key already produced (dealer, request id).
pub(crate) const REPLAY_LOOKUP_SQL: &str =
    "SELECT method, fingerprint, resource_name FROM idempotency_key
     WHERE dealer_id = $1 AND request_id = $2";

/// `Some(resource name)` when the key's request already ran; refuses a reused request
/// id with another method or body.
pub(crate) fn replay_decide(
    key: &RequestKey,
    row: Option<Row>,
) -> Result<Option<String>, StoreError> {
    match row {
        None => Ok(None),
        Some(row) => {
            let method: String = row.get(0);
            let fingerprint: Vec<u8> = row.get(1);
            if method != key.method || fingerprint != key.fingerprint {
                return Err(StoreError::InvalidArgument(format!(
                    "request_id {:?} was already used for a different request; use a new request_id",
                    key.request_id
                )));
            }
            Ok(Some(row.get(2)))
        }
    }
}

pub(crate) async fn request_remember_in_txn(
    tx: &Transaction<'_>,
    dealer: Uuid,
    key: Option<&RequestKey>,
    resource: &str,
) -> Result<(), StoreError> {
    let Some(key) = key else { return Ok(()) };
    tx.execute(
        "INSERT INTO idempotency_key (dealer_id, request_id, method, fingerprint, resource_name)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &dealer,
            &key.request_id,
            &key.method,
            &key.fingerprint,
            &resource,
        ],
    )
    .await?;
    Ok(())
}

/// Refuses a write whose etag is stale. An empty etag means "any version".
pub(crate) fn etag_check(what: &str, etag: &str, version: i64) -> Result<(), StoreError> {
    if etag.is_empty() || etag == version.to_string() {
        Ok(())
    } else {
        Err(StoreError::Aborted(format!(
            "{what} changed since it was read (etag {etag:?}, now {version:?}); read it again and retry"
        )))
    }
}

/// Parses a resource id remembered for a replayed request.
pub(crate) fn replayed_id(resource: &str) -> Result<Uuid, StoreError> {
    resource
        .rsplit('/')
        .next()
        .and_then(|id| Uuid::try_parse(id).ok())
        .ok_or_else(|| StoreError::Internal(format!("bad remembered resource {resource}")))
}

impl Store {
    /// Creates a site.
    pub async fn site_create(
        &self,
        actor: &Actor,
        new: &NewSite,
        key: Option<&RequestKey>,
    ) -> Result<Site, StoreError> {
        in_txn!(self, "site_create", |tx| {
            if let Some(name) = request_replay_in_txn(&tx, actor.dealer, key).await? {
                return site_get_in_txn(&tx, actor.dealer, replayed_id(&name)?).await;
            }
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO site (dealer_id, display_name, time_zone, local_code_policy)
                         VALUES ($1, $2, $3, $4) RETURNING {SITE_COLUMNS}"
                    ),
                    &[
                        &actor.dealer,
                        &new.display_name,
                        &new.time_zone,
                        &new.local_code_policy.as_str(),
                    ],
                )
                .await?;
            let site = site_from_row(&row);
            let name = format!("sites/{}", site.id);
            request_remember_in_txn(&tx, actor.dealer, key, &name).await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site.id),
                "site.create",
                &name,
                serde_json::json!({}),
            )
            .await?;
            Ok(site)
        })
    }

    /// Reads a site.
    pub async fn site_get(&self, dealer: Uuid, site: Uuid) -> Result<Site, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                &format!("SELECT {SITE_COLUMNS} FROM site WHERE id = $1 AND dealer_id = $2"),
                &[&site, &dealer],
            )
            .await?
            .ok_or_else(|| not_found_site(site))?;
        Ok(site_from_row(&row))
    }

    /// Lists a dealer's sites by id.
    pub async fn site_list(
        &self,
        dealer: Uuid,
        page: PageRequest,
    ) -> Result<Vec<Site>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {SITE_COLUMNS} FROM site WHERE dealer_id = $1 AND ($2::uuid IS NULL OR id > $2)
                     ORDER BY id LIMIT $3"
                ),
                &[&dealer, &page.after, &page.limit],
            )
            .await?;
        Ok(rows.iter().map(site_from_row).collect())
    }

    /// Updates a site.
    pub async fn site_update(
        &self,
        actor: &Actor,
        site: Uuid,
        patch: &SitePatch,
        etag: &str,
    ) -> Result<Site, StoreError> {
        in_txn!(self, "site_update", |tx| {
            let current = site_lock_in_txn(&tx, actor.dealer, site).await?;
            etag_check(&format!("site sites/{site}"), etag, current.version)?;
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE site SET display_name = COALESCE($2, display_name),
                            time_zone = COALESCE($3, time_zone),
                            local_code_policy = COALESCE($4, local_code_policy),
                            version = version + 1, update_time = now()
                         WHERE id = $1 RETURNING {SITE_COLUMNS}"
                    ),
                    &[
                        &site,
                        &patch.display_name,
                        &patch.time_zone,
                        &patch.local_code_policy.map(|p| p.as_str()),
                    ],
                )
                .await?;
            let updated = site_from_row(&row);
            // The agent runs schedules in the site's time zone, and the policy decides
            // what happens to codes programmed at the devices: both must reach it now,
            // not with the next unrelated change.
            let mut changed = Vec::new();
            if current.local_code_policy != LocalCodePolicy::Authoritative
                && updated.local_code_policy == LocalCodePolicy::Authoritative
            {
                changed =
                    crate::observed::authoritative_enforce_in_txn(&tx, actor.dealer, site).await?;
            }
            let mut updated = updated;
            if updated.time_zone != current.time_zone || !changed.is_empty() {
                updated.revision = site_change_record_in_txn(&tx, site, &changed).await?;
            }
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "site.update",
                &format!("sites/{site}"),
                serde_json::json!({
                    "display_name": patch.display_name.is_some(),
                    "time_zone": patch.time_zone,
                    "local_code_policy": patch.local_code_policy.map(|p| p.as_str()),
                }),
            )
            .await?;
            Ok(updated)
        })
    }

    /// Deletes a site that has no devices left.
    pub async fn site_delete(
        &self,
        actor: &Actor,
        site: Uuid,
        etag: &str,
    ) -> Result<(), StoreError> {
        in_txn!(self, "site_delete", |tx| {
            let current = site_lock_in_txn(&tx, actor.dealer, site).await?;
            etag_check(&format!("site sites/{site}"), etag, current.version)?;
            let devices: i64 = tx
                .query_one("SELECT count(*) FROM device WHERE site_id = $1", &[&site])
                .await?
                .get(0);
            if devices > 0 {
                return Err(StoreError::FailedPrecondition(format!(
                    "site sites/{site} still has {devices} device(s); delete them first so no code is left orphaned on a device"
                )));
            }
            tx.execute("DELETE FROM site WHERE id = $1", &[&site])
                .await?;
            audit_in_txn(
                &tx,
                actor,
                Some(site),
                "site.delete",
                &format!("sites/{site}"),
                serde_json::json!({}),
            )
            .await?;
            Ok(())
        })
    }
}
