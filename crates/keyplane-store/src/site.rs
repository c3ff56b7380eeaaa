//! Sites, and the helpers every site-scoped write uses: the site lock, the revision
//! counter, the audit log and idempotency keys.

use crate::stored_json::{local_code_audit_json, thresholds_from_json};
use crate::{
    Actor, LocalCodePolicy, NewSite, PageRequest, RequestKey, Site, SitePatch, Step, Store,
    StoreError, batch_in_txn, in_txn, params,
};
use crate::{Cached, Transaction};
use keyplane_core::config::{ConfigError, Reported, site_delete_check, site_update_plan};
use tokio_postgres::Row;
use uuid::Uuid;

pub(crate) const SITE_COLUMNS: &str =
    "id, display_name, time_zone, local_code_policy, revision, version, create_time, update_time,
    status_thresholds";

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
        status_thresholds: thresholds_from_json(row.get(8)),
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

/// Appends to the audit log with the resource's values before and after the change.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn audit_full(
    tx: &Transaction<'_>,
    actor: &Actor,
    site: Option<Uuid>,
    action: &str,
    resource: &str,
    detail: serde_json::Value,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<(), StoreError> {
    tx.execute(
        audit_sql(site),
        &[
            &actor.dealer,
            &site,
            &actor.principal,
            &action,
            &resource,
            &actor.peer,
            &detail,
            &actor.acting_as,
            &actor.request_id,
            &before,
            &after,
        ],
    )
    .await?;
    Ok(())
}

/// A site as the audit log records it before or after a change.
pub(crate) fn site_audit_json(
    display_name: &str,
    time_zone: &str,
    local_code_policy: LocalCodePolicy,
) -> serde_json::Value {
    serde_json::json!({
        "display_name": display_name,
        "time_zone": time_zone,
        "local_code_policy": local_code_policy.as_str(),
    })
}

/// An audit row for a change of one column of site `$2` (named `$10`): its before
/// value (`{column: value}`) read by the statement, so run it before the write; its
/// after value `$11`. Only for columns that hold no secret.
pub(crate) const SITE_FIELD_AUDIT_SQL: &str = "INSERT INTO audit_log
        (dealer_id, site_id, actor, action, resource, peer, detail, acting_user, request_id, before, after)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9,
        (SELECT jsonb_build_object($10::text, to_jsonb(s) -> $10::text) FROM site s WHERE s.id = $2),
        $11";

/// A dealer-level audit row (no site): [`AUDIT_FULL_SQL`]'s parameters, `$2` None.
pub(crate) const DEALER_AUDIT_SQL: &str = "INSERT INTO dealer_audit_log
        (dealer_id, actor, action, resource, peer, detail, acting_user, request_id, before, after)
     SELECT $1, $3, $4, $5, $6, $7, $8, $9, $10, $11 WHERE $2::uuid IS NULL";

/// The statement that appends an audit row of `site` (None: a dealer-level row).
pub(crate) fn audit_sql(site: Option<Uuid>) -> &'static str {
    if site.is_some() {
        AUDIT_FULL_SQL
    } else {
        DEALER_AUDIT_SQL
    }
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

/// An audit row with the resource before and after the change (never a PIN, never a
/// secret): dealer, site, actor, action, resource, peer, detail, acting user and
/// request id (`$1`..`$9`), then `$10` before (None: it did not exist) and `$11`
/// after (None: it no longer exists).
pub(crate) const AUDIT_FULL_SQL: &str = "INSERT INTO audit_log
        (dealer_id, site_id, actor, action, resource, peer, detail, acting_user, request_id, before, after)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Remembers an idempotency key (dealer, request id, method, fingerprint, resource).
pub(crate) const REMEMBER_INSERT_SQL: &str =
    "INSERT INTO idempotency_key (dealer_id, request_id, method, fingerprint, resource_name)
     VALUES ($1, $2, $3, $4, $5)";

/// Writes a change-log entry: advances site `$1`'s revision when `$2` and records the
/// slots (`$3` devices, `$4` slots) under the new one. The site row is locked by the
/// load, so the new revision is the loaded one plus one.
pub(crate) const LOG_SQL: &str = "WITH head AS (
        UPDATE site SET revision = revision + 1 WHERE id = $1 AND $2 RETURNING revision
     )
     INSERT INTO site_change (site_id, revision, device_id, slot)
     SELECT $1, head.revision, c.d, c.s FROM head, unnest($3::uuid[], $4::int[]) AS c(d, s)
     ON CONFLICT DO NOTHING";

/// The parameters of [`LOG_SQL`] for a decided change-log entry (None: nothing to log).
pub(crate) struct LogParams {
    advance: bool,
    devices: Vec<Uuid>,
    slots: Vec<i32>,
}

impl LogParams {
    pub(crate) fn new(log: Option<&keyplane_core::config::ChangeLog>) -> LogParams {
        let slots = log.map(|l| l.slots.as_slice()).unwrap_or_default();
        LogParams {
            advance: log.is_some(),
            devices: slots.iter().map(|(d, _)| *d).collect(),
            slots: slots.iter().map(|(_, s)| i32::from(*s)).collect(),
        }
    }

    /// The step that writes the entry for `site`.
    pub(crate) fn step<'a>(&'a self, site: &'a Uuid) -> Step<'a> {
        (
            LOG_SQL,
            params![site, &self.advance, &self.devices, &self.slots],
        )
    }
}

/// The parameters of one audit row.
pub(crate) struct AuditParams {
    dealer: Uuid,
    site: Option<Uuid>,
    principal: String,
    action: String,
    resource: String,
    peer: Option<String>,
    detail: serde_json::Value,
    acting_as: Option<String>,
    request_id: Option<String>,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
}

impl AuditParams {
    pub(crate) fn new(
        actor: &Actor,
        site: Option<Uuid>,
        action: &str,
        resource: &str,
        detail: serde_json::Value,
    ) -> AuditParams {
        AuditParams {
            dealer: actor.dealer,
            site,
            principal: actor.principal.clone(),
            action: action.to_owned(),
            resource: resource.to_owned(),
            peer: actor.peer.clone(),
            detail,
            acting_as: actor.acting_as.clone(),
            request_id: actor.request_id.clone(),
            before: None,
            after: None,
        }
    }

    /// The resource before the change (not set: it did not exist).
    pub(crate) fn before(mut self, before: serde_json::Value) -> AuditParams {
        self.before = Some(before);
        self
    }

    /// The resource after the change (not set: it no longer exists).
    pub(crate) fn after(mut self, after: serde_json::Value) -> AuditParams {
        self.after = Some(after);
        self
    }

    /// The step that appends the row.
    pub(crate) fn step(&self) -> Step<'_> {
        (audit_sql(self.site), self.params())
    }

    /// A step running `sql`, a statement that writes this row from `$1`..`$9` (see
    /// [`AUDIT_FULL_SQL`]) and its own `extra` parameters (`$10`..), its before and
    /// after values taken from the rows the statement itself changes.
    pub(crate) fn step_in<'a>(
        &'a self,
        sql: &'a str,
        extra: Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>,
    ) -> Step<'a> {
        let mut p = self.params();
        p.truncate(9);
        p.extend(extra);
        (sql, p)
    }

    /// The row's parameters without its site (`$2` of [`AUDIT_FULL_SQL`]), for a
    /// statement that writes the row with the site among its own parameters.
    pub(crate) fn params_without_site(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        let mut p = self.params();
        p.remove(1);
        p
    }

    fn params(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        params![
            &self.dealer,
            &self.site,
            &self.principal,
            &self.action,
            &self.resource,
            &self.peer,
            &self.detail,
            &self.acting_as,
            &self.request_id,
            &self.before,
            &self.after,
        ]
    }

    /// Appends the row now (one statement of its own).
    pub(crate) async fn write(&self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        tx.execute(audit_sql(self.site), &self.params()).await?;
        Ok(())
    }
}

/// The parameters that remember an idempotency key for `resource`.
pub(crate) struct RememberParams<'a> {
    dealer: Uuid,
    key: &'a RequestKey,
    resource: String,
}

impl<'a> RememberParams<'a> {
    pub(crate) fn new(dealer: Uuid, key: Option<&'a RequestKey>, resource: &str) -> Option<Self> {
        key.map(|key| RememberParams {
            dealer,
            key,
            resource: resource.to_owned(),
        })
    }

    /// The step that inserts the key.
    pub(crate) fn step(&self) -> Step<'_> {
        (
            REMEMBER_INSERT_SQL,
            params![
                &self.dealer,
                &self.key.request_id,
                &self.key.method,
                &self.key.fingerprint,
                &self.resource,
            ],
        )
    }
}

/// What a site configuration write decides on: the site row (locked), what an
/// earlier run of the request created, and the rows of the caller's reads.
pub(crate) struct SiteLoaded {
    pub site: Site,
    pub replayed: Option<String>,
    pub extra: Vec<Vec<Row>>,
}

/// Locks the site row of `dealer` and runs the caller's reads `extra` after it, with
/// the idempotency key's lock and lookup, in one pipelined round trip: the reads run
/// under the lock, so what the write decides on cannot change before it commits.
pub(crate) async fn site_load_in_txn(
    tx: &Transaction<'_>,
    dealer: Uuid,
    site: Uuid,
    key: Option<&RequestKey>,
    extra: Vec<Step<'_>>,
) -> Result<SiteLoaded, StoreError> {
    let site_sql = format!(
        "SELECT {SITE_COLUMNS} FROM site WHERE id = $1 AND dealer_id = $2 FOR NO KEY UPDATE"
    );
    let dealer_text = dealer.to_string();
    let mut steps: Vec<Step<'_>> = vec![(site_sql.as_str(), params![&site, &dealer])];
    if let Some(k) = key {
        steps.push((REPLAY_LOCK_SQL, params![&dealer_text, &k.request_id]));
        steps.push((REPLAY_LOOKUP_SQL, params![&dealer, &k.request_id]));
    }
    let first_extra = steps.len();
    steps.extend(extra);
    let mut rows = batch_in_txn(tx, &steps).await?;
    let extra = rows.split_off(first_extra);
    let site_row = rows
        .first()
        .and_then(|r| r.first())
        .ok_or_else(|| not_found_site(site))?;
    let site = site_from_row(site_row);
    let replayed = match key {
        Some(k) => replay_decide(k, rows.pop().and_then(|mut r| r.pop()))?,
        None => None,
    };
    Ok(SiteLoaded {
        site,
        replayed,
        extra,
    })
}

/// The store's error for a refused configuration write on `site`.
pub(crate) fn config_error(site: Uuid, e: ConfigError) -> StoreError {
    match e {
        ConfigError::PanelPartition => StoreError::InvalidArgument(
            "device.partition: a panel spans partitions (each code names its own in scope.panel_partitions), so it takes no partition: leave partition unset".into(),
        ),
        ConfigError::NoPartition(p) => {
            StoreError::NotFound(format!("partition sites/{site}/partitions/{p}"))
        }
        ConfigError::SecondPanel => StoreError::AlreadyExists(format!(
            "site sites/{site} already has a panel; a site has one alarm panel"
        )),
        ConfigError::PartitionExists(p) => StoreError::AlreadyExists(format!(
            "partition sites/{site}/partitions/{p} already exists"
        )),
        ConfigError::PartitionInUse(p) => StoreError::FailedPrecondition(format!(
            "partition sites/{site}/partitions/{p} is used by devices or credentials; remove it from them first"
        )),
        ConfigError::SiteHasDevices(n) => StoreError::FailedPrecondition(format!(
            "site sites/{site} still has {n} device(s); delete them first so no code is left orphaned on a device"
        )),
        ConfigError::DeviceInUse {
            device,
            credentials,
            personal,
            plans,
        } => {
            let mut blockers = Vec::new();
            if credentials > 0 {
                blockers.push(format!(
                    "{credentials} credential(s) are scoped to it: delete them or change their scope (UpdateCredential)"
                ));
            }
            if !personal.is_empty() {
                let names: Vec<String> = personal
                    .iter()
                    .map(|u| format!("sites/{site}/users/{u}/personalAccessPlan"))
                    .collect();
                blockers.push(format!(
                    "it is an access point of personal access plan(s) {}: remove it from their access_points (UpdatePersonalAccessPlan)",
                    names.join(", ")
                ));
            }
            if !plans.is_empty() {
                let names: Vec<String> = plans
                    .iter()
                    .map(|p| format!("sites/{site}/accessPlans/{p}"))
                    .collect();
                blockers.push(format!(
                    "it is an access point of access plan(s) {}: remove it from their devices (UpdateAccessPlan) or delete those plans",
                    names.join(", ")
                ));
            }
            StoreError::FailedPrecondition(format!(
                "device sites/{site}/devices/{device} cannot be deleted yet: {}",
                blockers.join("; ")
            ))
        }
        ConfigError::NoPlan(p) => {
            StoreError::NotFound(format!("access plan sites/{site}/accessPlans/{p}"))
        }
        ConfigError::NoHoliday(day) => {
            StoreError::NotFound(format!("holiday sites/{site}/holidays/{day}"))
        }
    }
}

/// Observed slots the AUTHORITATIVE policy acts on (site `$1`): local codes not yet
/// being removed, and drifted or missing managed slots.
const REPORTED_SQL: &str =
    "SELECT device_id, slot, state IN ('foreign', 'conflict') FROM observed_slot
     WHERE site_id = $1
       AND ((state IN ('foreign', 'conflict') AND NOT removing) OR state IN ('drifted', 'missing'))
     ORDER BY device_id, slot";

/// Who acts when the AUTHORITATIVE policy clears or re-writes a slot.
pub(crate) fn policy_actor(dealer: Uuid) -> Actor {
    Actor {
        dealer,
        principal: "keyplane: AUTHORITATIVE site policy".into(),
        peer: None,
        acting_user: None,
        acting_partition: None,
        acting_as: None,
        request_id: None,
    }
}

impl Store {
    /// Creates a site: one round trip writes it, its idempotency key and its audit
    /// entry (one more, first, when the request carries a key).
    pub async fn site_create(
        &self,
        actor: &Actor,
        new: &NewSite,
        key: Option<&RequestKey>,
    ) -> Result<Site, StoreError> {
        in_txn!(self, "site_create", |tx| {
            if let Some(k) = key {
                let dealer_text = actor.dealer.to_string();
                let rows = batch_in_txn(
                    &tx,
                    &[
                        (REPLAY_LOCK_SQL, params![&dealer_text, &k.request_id]),
                        (REPLAY_LOOKUP_SQL, params![&actor.dealer, &k.request_id]),
                    ],
                )
                .await?;
                let lookup = rows.into_iter().nth(1).and_then(|mut r| r.pop());
                if let Some(name) = replay_decide(k, lookup)? {
                    return site_get_in_txn(&tx, actor.dealer, replayed_id(&name)?).await;
                }
            }
            let id = Uuid::new_v4();
            let name = format!("sites/{id}");
            let insert_sql = format!(
                "INSERT INTO site (id, dealer_id, display_name, time_zone, local_code_policy)
                 VALUES ($1, $2, $3, $4, $5) RETURNING {SITE_COLUMNS}"
            );
            let policy = new.local_code_policy.as_str();
            let remember = RememberParams::new(actor.dealer, key, &name);
            let audit =
                AuditParams::new(actor, Some(id), "site.create", &name, serde_json::json!({}))
                    .after(site_audit_json(
                        &new.display_name,
                        &new.time_zone,
                        new.local_code_policy,
                    ));
            let mut steps: Vec<Step<'_>> = vec![(
                insert_sql.as_str(),
                params![
                    &id,
                    &actor.dealer,
                    &new.display_name,
                    &new.time_zone,
                    &policy
                ],
            )];
            steps.extend(remember.as_ref().map(RememberParams::step));
            steps.push(audit.step());
            let rows = batch_in_txn(&tx, &steps).await?;
            let row = rows
                .first()
                .and_then(|r| r.first())
                .ok_or_else(|| StoreError::Internal("site not read back".into()))?;
            Ok(site_from_row(row))
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

    /// Updates a site: one round trip locks and loads it (and, when switching to
    /// AUTHORITATIVE, what agents reported), one writes the change.
    pub async fn site_update(
        &self,
        actor: &Actor,
        site: Uuid,
        patch: &SitePatch,
        etag: &str,
    ) -> Result<Site, StoreError> {
        let switching = patch.local_code_policy == Some(LocalCodePolicy::Authoritative);
        in_txn!(self, "site_update", |tx| {
            let extra: Vec<Step<'_>> = if switching {
                vec![(REPORTED_SQL, params![&site])]
            } else {
                Vec::new()
            };
            let l = site_load_in_txn(&tx, actor.dealer, site, None, extra).await?;
            let current = &l.site;
            etag_check(&format!("site sites/{site}"), etag, current.version)?;
            let reported: Vec<Reported> = l
                .extra
                .first()
                .map(|rows| {
                    rows.iter()
                        .map(|r| Reported {
                            slot: device_slot(r),
                            local: r.get(2),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let zone_changed = patch
                .time_zone
                .as_ref()
                .is_some_and(|z| *z != current.time_zone);
            let becomes_authoritative =
                switching && current.local_code_policy != LocalCodePolicy::Authoritative;
            let plan = site_update_plan(
                current.revision,
                zone_changed,
                becomes_authoritative,
                &reported,
            );
            let update_sql = format!(
                "UPDATE site SET display_name = COALESCE($2, display_name),
                    time_zone = COALESCE($3, time_zone),
                    local_code_policy = COALESCE($4, local_code_policy),
                    version = version + 1, update_time = now()
                 WHERE id = $1 RETURNING {SITE_COLUMNS}"
            );
            let policy = patch.local_code_policy.map(|p| p.as_str());
            let split = |slots: &[(Uuid, u16)]| -> (Vec<Uuid>, Vec<i32>) {
                slots.iter().map(|(d, s)| (*d, i32::from(*s))).unzip()
            };
            let (clear_devices, clear_slots) = split(&plan.clear);
            let (rewrite_devices, rewrite_slots) = split(&plan.rewrite);
            let system = policy_actor(actor.dealer);
            let cleared: Vec<AuditParams> = plan
                .clear
                .iter()
                .map(|(device, slot)| {
                    AuditParams::new(
                        &system,
                        Some(site),
                        "local_code.clear",
                        &format!("sites/{site}/devices/{device}/localCodes/{slot}"),
                        serde_json::json!({ "slot": slot }),
                    )
                    .before(local_code_audit_json(*device, *slot, false))
                    .after(local_code_audit_json(*device, *slot, true))
                })
                .collect();
            let log = LogParams::new(plan.log.as_ref());
            let audit = AuditParams::new(
                actor,
                Some(site),
                "site.update",
                &format!("sites/{site}"),
                serde_json::json!({
                    "display_name": patch.display_name.is_some(),
                    "time_zone": patch.time_zone,
                    "local_code_policy": policy,
                }),
            )
            .before(site_audit_json(
                &current.display_name,
                &current.time_zone,
                current.local_code_policy,
            ))
            .after(site_audit_json(
                patch.display_name.as_ref().unwrap_or(&current.display_name),
                patch.time_zone.as_ref().unwrap_or(&current.time_zone),
                patch.local_code_policy.unwrap_or(current.local_code_policy),
            ));
            let mut steps: Vec<Step<'_>> = vec![(
                update_sql.as_str(),
                params![&site, &patch.display_name, &patch.time_zone, &policy],
            )];
            if !plan.clear.is_empty() {
                steps.extend(cleared.iter().map(AuditParams::step));
                steps.push((
                    "INSERT INTO device_event (site_id, device_id, source_seq, kind, user_number, occur_time, actor)
                     SELECT $1, c.d, 0, 'local_code_cleared', c.s, now(), $4
                       FROM unnest($2::uuid[], $3::int[]) AS c(d, s)
                     ON CONFLICT DO NOTHING",
                    params![&site, &clear_devices, &clear_slots, &system.principal],
                ));
                steps.push((
                    "UPDATE observed_slot o SET removing = true
                     FROM unnest($2::uuid[], $3::int[]) AS c(d, s)
                     WHERE o.site_id = $1 AND o.device_id = c.d AND o.slot = c.s",
                    params![&site, &clear_devices, &clear_slots],
                ));
            }
            if !plan.rewrite.is_empty() {
                steps.push((
                    "UPDATE slot_assignment sa SET write_generation = write_generation + 1
                     FROM unnest($2::uuid[], $3::int[]) AS c(d, s)
                     WHERE sa.site_id = $1 AND sa.device_id = c.d AND sa.slot = c.s",
                    params![&site, &rewrite_devices, &rewrite_slots],
                ));
            }
            steps.push(log.step(&site));
            steps.push(audit.step());
            let rows = batch_in_txn(&tx, &steps).await?;
            let row = rows
                .first()
                .and_then(|r| r.first())
                .ok_or_else(|| not_found_site(site))?;
            let mut updated = site_from_row(row);
            if let Some(log) = &plan.log {
                updated.revision = log.revision;
            }
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
            let extra: Vec<Step<'_>> = vec![(
                "SELECT count(*) FROM device WHERE site_id = $1",
                params![&site],
            )];
            let l = site_load_in_txn(&tx, actor.dealer, site, None, extra).await?;
            etag_check(&format!("site sites/{site}"), etag, l.site.version)?;
            let devices: i64 = l.extra[0].first().map(|r| r.get(0)).unwrap_or(0);
            site_delete_check(devices).map_err(|e| config_error(site, e))?;
            let audit = AuditParams::new(
                actor,
                Some(site),
                "site.delete",
                &format!("sites/{site}"),
                serde_json::json!({}),
            )
            .before(site_audit_json(
                &l.site.display_name,
                &l.site.time_zone,
                l.site.local_code_policy,
            ));
            batch_in_txn(
                &tx,
                &[
                    // The record first: it takes its position from the site row.
                    audit.step(),
                    // Rows naming a partition go first: PostgreSQL checks their
                    // foreign keys to `partition` while the cascade from `site` is
                    // still under way, before the cascade from `site_user` or
                    // `credential` reaches them.
                    (
                        "DELETE FROM user_authority WHERE site_id = $1",
                        params![&site],
                    ),
                    (
                        "DELETE FROM credential_partition WHERE site_id = $1",
                        params![&site],
                    ),
                    ("DELETE FROM site WHERE id = $1", params![&site]),
                ],
            )
            .await?;
            Ok(())
        })
    }
}
