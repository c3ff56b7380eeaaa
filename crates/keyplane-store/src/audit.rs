//! Reading the audit log (written by every mutation, append-only by trigger).

use crate::site::site_get_in_txn;
use crate::{Store, StoreError, in_txn};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One audit record.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// Position in the log.
    pub id: i64,
    /// The site, for site records.
    pub site: Option<Uuid>,
    /// Who made the change.
    pub actor: String,
    /// What kind of change.
    pub action: String,
    /// The resource changed.
    pub resource: String,
    /// The peer address, when known.
    pub peer: Option<String>,
    /// Details as JSON text (never a PIN).
    pub detail: String,
    /// The site user acted as (`sites/{site}/users/{user}`), if any.
    pub acting_user: Option<String>,
    /// The call's request id, when recorded.
    pub request_id: Option<String>,
    /// The resource before the change, as JSON text (never a PIN), when recorded.
    pub before: Option<String>,
    /// The resource after the change, as JSON text (never a PIN), when recorded.
    pub after: Option<String>,
    /// When.
    pub create_time: DateTime<Utc>,
}

/// Which records [`Store::audit_list`] returns.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this site's records (after checking the site is the dealer's).
    pub site: Option<Uuid>,
    /// Only this actor's.
    pub actor: Option<String>,
    /// Only records whose resource is this name or lies under it.
    pub resource_under: Option<String>,
    /// Made at or after.
    pub start: Option<DateTime<Utc>>,
    /// Made before.
    pub end: Option<DateTime<Utc>>,
}

impl Store {
    /// The dealer's audit records after `after` (an id), oldest first, at most `limit`.
    pub async fn audit_list(
        &self,
        dealer: Uuid,
        filter: &AuditFilter,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        in_txn!(self, "audit_list", |tx| {
            if let Some(site) = filter.site {
                site_get_in_txn(&tx, dealer, site).await?;
            }
            let rows = tx
                .query(
                    "SELECT id, site_id, actor, action, resource, peer, detail::text, create_time,
                            acting_user, request_id, before::text, after::text
                     FROM audit_log
                     WHERE dealer_id = $1 AND ($2::uuid IS NULL OR site_id = $2)
                       AND ($3::text IS NULL OR actor = $3)
                       AND ($4::text IS NULL OR resource = $4 OR starts_with(resource, $4 || '/'))
                       AND ($5::timestamptz IS NULL OR create_time >= $5)
                       AND ($6::timestamptz IS NULL OR create_time < $6)
                       AND id > $7
                     ORDER BY id LIMIT $8",
                    &[
                        &dealer,
                        &filter.site,
                        &filter.actor,
                        &filter.resource_under,
                        &filter.start,
                        &filter.end,
                        &after,
                        &limit,
                    ],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| AuditRecord {
                    id: r.get(0),
                    site: r.get(1),
                    actor: r.get(2),
                    action: r.get(3),
                    resource: r.get(4),
                    peer: r.get(5),
                    detail: r.get(6),
                    create_time: r.get(7),
                    acting_user: r.get(8),
                    request_id: r.get(9),
                    before: r.get(10),
                    after: r.get(11),
                })
                .collect())
        })
    }
}
