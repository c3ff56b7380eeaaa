//! Retention of events and audit records (per dealer), and erasure of a person.

use crate::site::AuditParams;
use crate::{Actor, Cached, Store, StoreError, batch_in_txn, in_txn, params};
use std::time::Duration;
use uuid::Uuid;

/// The shortest retention period accepted (a typo must not empty the log).
pub const RETENTION_MIN: Duration = Duration::from_secs(86_400);
/// The longest retention period accepted (100 years).
pub const RETENTION_MAX: Duration = Duration::from_secs(100 * 366 * 86_400);
/// Events are kept this long unless the dealer says otherwise.
pub const EVENT_RETENTION_DEFAULT: Duration = Duration::from_secs(400 * 86_400);
/// Audit records are kept this long unless the dealer says otherwise (7 years).
pub const AUDIT_RETENTION_DEFAULT: Duration = Duration::from_secs(220_903_200);

/// How long a dealer keeps events and audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events older than this (by the time keyplaned stored them) are deleted.
    pub events: Duration,
    /// Audit records older than this are deleted.
    pub audit: Duration,
}

/// What one [`Store::retention_sweep`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Events deleted.
    pub events: u64,
    /// Audit records deleted.
    pub audit: u64,
}

/// What [`Store::user_erase`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Erased {
    /// Credentials deleted.
    pub credentials: u64,
    /// Events from which the person was removed.
    pub events: u64,
    /// Audit records whose before/after values lost the person's personal fields.
    pub audit_records: u64,
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn duration(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

impl Store {
    /// The dealer's retention periods.
    pub async fn retention_get(&self, dealer: Uuid) -> Result<Retention, StoreError> {
        in_txn!(self, "retention_get", |tx| {
            let row = tx
                .query_opt(
                    "SELECT event_retention_seconds, audit_retention_seconds FROM dealer WHERE id = $1",
                    &[&dealer],
                )
                .await?
                .ok_or_else(|| StoreError::NotFound("retentionPolicy".into()))?;
            Ok(Retention {
                events: duration(row.get(0)),
                audit: duration(row.get(1)),
            })
        })
    }

    /// Sets the dealer's retention periods (None: unchanged); audited with the
    /// periods before and after.
    pub async fn retention_update(
        &self,
        actor: &Actor,
        events: Option<Duration>,
        audit: Option<Duration>,
    ) -> Result<Retention, StoreError> {
        for (field, d) in [("event_retention", events), ("audit_retention", audit)] {
            if let Some(d) = d
                && !(RETENTION_MIN..=RETENTION_MAX).contains(&d)
            {
                return Err(StoreError::InvalidArgument(format!(
                    "retention_policy.{field} must be from 1 day (86400s) to 100 years; got {}s",
                    d.as_secs()
                )));
            }
        }
        in_txn!(self, "retention_update", |tx| {
            // Loaded (the dealer row locked) in one round trip, written with its
            // audit row in one more.
            let before = tx
                .query_opt(
                    "SELECT event_retention_seconds, audit_retention_seconds FROM dealer WHERE id = $1 FOR UPDATE",
                    &[&actor.dealer],
                )
                .await?
                .ok_or_else(|| StoreError::NotFound("retentionPolicy".into()))?;
            let (was_events, was_audit): (i64, i64) = (before.get(0), before.get(1));
            let now_events = events.map_or(was_events, seconds);
            let now_audit = audit.map_or(was_audit, seconds);
            let audit_row = AuditParams::new(
                actor,
                None,
                "retention.update",
                "retentionPolicy",
                serde_json::json!({}),
            )
            .before(serde_json::json!({
                "event_retention_seconds": was_events,
                "audit_retention_seconds": was_audit,
            }))
            .after(serde_json::json!({
                "event_retention_seconds": now_events,
                "audit_retention_seconds": now_audit,
            }));
            batch_in_txn(
                &tx,
                &[
                    (
                        "UPDATE dealer SET event_retention_seconds = $2, audit_retention_seconds = $3 WHERE id = $1",
                        params![&actor.dealer, &now_events, &now_audit],
                    ),
                    audit_row.step(),
                ],
            )
            .await?;
            Ok(Retention {
                events: duration(now_events),
                audit: duration(now_audit),
            })
        })
    }

    /// Deletes at most `batch` events and `batch` audit records of each log (site and
    /// dealer-level) past their dealer's retention period (oldest first), in one short
    /// transaction. Call it until it returns fewer than `batch` of each.
    pub async fn retention_sweep(&self, batch: i64) -> Result<Swept, StoreError> {
        in_txn!(self, "retention_sweep", |tx| {
            let events = tx
                .execute(
                    "DELETE FROM device_event e USING (
                        SELECT x.site_id, x.site_seq FROM device_event x
                          JOIN site s ON s.id = x.site_id
                          JOIN dealer d ON d.id = s.dealer_id
                         WHERE x.create_time < now() - make_interval(secs => d.event_retention_seconds::double precision)
                         ORDER BY x.create_time
                         LIMIT $1
                     ) old
                     WHERE e.site_id = old.site_id AND e.site_seq = old.site_seq",
                    &[&batch],
                )
                .await?;
            // The one delete the append-only trigger lets through (migration 0015).
            tx.batch_execute("SET LOCAL keyplane.audit_retention = 'on'")
                .await?;
            let site_records = tx
                .execute(
                    "DELETE FROM audit_log a USING (
                        SELECT x.site_id, x.position FROM audit_log x
                          JOIN dealer d ON d.id = x.dealer_id
                         WHERE x.create_time < now() - make_interval(secs => d.audit_retention_seconds::double precision)
                         ORDER BY x.create_time
                         LIMIT $1
                     ) old
                     WHERE a.site_id = old.site_id AND a.position = old.position",
                    &[&batch],
                )
                .await?;
            let dealer_records = tx
                .execute(
                    "DELETE FROM dealer_audit_log a USING (
                        SELECT x.dealer_id, x.position FROM dealer_audit_log x
                          JOIN dealer d ON d.id = x.dealer_id
                         WHERE x.create_time < now() - make_interval(secs => d.audit_retention_seconds::double precision)
                         ORDER BY x.create_time
                         LIMIT $1
                     ) old
                     WHERE a.dealer_id = old.dealer_id AND a.position = old.position",
                    &[&batch],
                )
                .await?;
            let audit = site_records + dealer_records;
            Ok(Swept { events, audit })
        })
    }

    /// Erases a person from a site: deletes the user and every credential they hold
    /// (their slots are cleared on the devices, as DeleteUser), removes them from the
    /// site's events (user and credential references) and replaces the personal
    /// fields (`display_name`) in the before/after values of audit records about
    /// them. Audited as `user.erase` with counts only.
    pub async fn user_erase(
        &self,
        actor: &Actor,
        site: Uuid,
        user: Uuid,
    ) -> Result<Erased, StoreError> {
        in_txn!(self, "user_erase", |tx| {
            let credentials =
                crate::user::user_delete_in_txn(&tx, actor, site, user, None, "user.delete")
                    .await?;
            let name = format!("sites/{site}/users/{user}");
            // Redacted in one round trip, after the deletion so that its own audit
            // rows lose the names too. The erasure flag is on for the audit update only.
            let redacted = batch_in_txn(
                &tx,
                &[
                    (
                        "WITH e AS (
                            UPDATE device_event SET user_id = NULL, credential_id = NULL
                             WHERE site_id = $1 AND (user_id = $2 OR credential_id = ANY($3::uuid[]))
                            RETURNING 1
                         ) SELECT count(*) FROM e",
                        params![&site, &user, &credentials],
                    ),
                    (
                        "SELECT set_config('keyplane.audit_erasure', 'on', true)",
                        params![],
                    ),
                    (
                        "WITH a AS (
                            UPDATE audit_log SET
                                before = CASE WHEN before ? 'display_name'
                                              THEN jsonb_set(before, '{display_name}', '\"(erased)\"') ELSE before END,
                                after = CASE WHEN after ? 'display_name'
                                             THEN jsonb_set(after, '{display_name}', '\"(erased)\"') ELSE after END
                              WHERE dealer_id = $1 AND site_id = $2
                                AND (resource = $3 OR starts_with(resource, $3 || '/'))
                                AND (before ? 'display_name' OR after ? 'display_name')
                            RETURNING 1
                         ) SELECT count(*) FROM a",
                        params![&actor.dealer, &site, &name],
                    ),
                    (
                        "SELECT set_config('keyplane.audit_erasure', 'off', true)",
                        params![],
                    ),
                ],
            )
            .await?;
            let count = |step: usize| -> Result<u64, StoreError> {
                let n: i64 = redacted
                    .get(step)
                    .and_then(|rows| rows.first())
                    .ok_or_else(|| {
                        StoreError::Internal(format!("user_erase: no count from step {step}"))
                    })?
                    .get(0);
                Ok(u64::try_from(n).unwrap_or(0))
            };
            let erased = Erased {
                credentials: credentials.len() as u64,
                events: count(0)?,
                audit_records: count(2)?,
            };
            crate::site::audit_full(
                &tx,
                actor,
                Some(site),
                "user.erase",
                &name,
                serde_json::json!({
                    "credentials_deleted": erased.credentials,
                    "events_redacted": erased.events,
                    "audit_records_redacted": erased.audit_records,
                }),
                None,
                None,
            )
            .await?;
            Ok(erased)
        })
    }
}
