//! Reading the audit log (written by every mutation, append-only by trigger): site
//! records in `audit_log`, keyed (site, position), and dealer-level records (dealer
//! tokens, the retention policy) in `dealer_audit_log`, keyed (dealer, position);
//! migration 0023.

use crate::site::site_get_in_txn;
use crate::{Cached, Store, StoreError, in_txn};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One audit record.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// Position in its site's log (in the dealer's, for dealer-level records).
    pub position: i64,
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

impl AuditRecord {
    /// Where a page ending with this record ends.
    pub fn cursor(&self) -> AuditCursor {
        AuditCursor {
            time: self.create_time,
            site: self.site,
            position: self.position,
        }
    }
}

/// A place in a dealer's audit log, as [`Store::audit_list`] orders it: one site's
/// records by position; all of a dealer's, site and dealer-level records merged, by
/// time, then site (dealer-level records first), then position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditCursor {
    /// The record's time.
    pub time: DateTime<Utc>,
    /// Its site (None: a dealer-level record).
    pub site: Option<Uuid>,
    /// Its position in its site's (dealer's) log.
    pub position: i64,
}

impl AuditCursor {
    /// The cursor as text (`{microseconds}/{site or -}/{position}`), for page tokens.
    pub fn to_key(&self) -> String {
        let site = self.site.map_or_else(|| "-".to_owned(), |s| s.to_string());
        format!("{}/{site}/{}", self.time.timestamp_micros(), self.position)
    }

    /// Parses [`AuditCursor::to_key`]'s text.
    pub fn parse(key: &str) -> Option<AuditCursor> {
        let mut parts = key.splitn(3, '/');
        let time = DateTime::from_timestamp_micros(parts.next()?.parse().ok()?)?;
        let site = match parts.next()? {
            "-" => None,
            s => Some(Uuid::try_parse(s).ok()?),
        };
        let position = parts.next()?.parse().ok()?;
        Some(AuditCursor {
            time,
            site,
            position,
        })
    }
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

/// The columns of a record, after its site.
const RECORD_COLUMNS: &str = "position, actor, action, resource, peer, detail::text, create_time,
    acting_user, request_id, before::text, after::text";

/// The filters both tables share (dealer `$1`, actor `$2`, resource `$3`, start `$4`,
/// end `$5`).
const FILTERS: &str = "dealer_id = $1
    AND ($2::text IS NULL OR actor = $2)
    AND ($3::text IS NULL OR resource = $3 OR starts_with(resource, $3 || '/'))
    AND ($4::timestamptz IS NULL OR create_time >= $4)
    AND ($5::timestamptz IS NULL OR create_time < $5)";

/// The nil UUID, which sorts dealer-level records before site records of the same time.
const NIL: &str = "'00000000-0000-0000-0000-000000000000'::uuid";

impl Store {
    /// The dealer's audit records after `after`, oldest first, at most `limit`: one
    /// site's by position (a single-shard read), or all of the dealer's, site and
    /// dealer-level records merged by time (see [`AuditCursor`]).
    pub async fn audit_list(
        &self,
        dealer: Uuid,
        filter: &AuditFilter,
        after: Option<AuditCursor>,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        in_txn!(self, "audit_list", |tx| {
            let rows = if let Some(site) = filter.site {
                site_get_in_txn(&tx, dealer, site).await?;
                let after = after.map(|c| c.position);
                tx.query(
                    &format!(
                        "SELECT site_id, {RECORD_COLUMNS} FROM audit_log
                         WHERE {FILTERS} AND site_id = $6 AND ($7::int8 IS NULL OR position > $7)
                         ORDER BY position LIMIT $8"
                    ),
                    &[
                        &dealer,
                        &filter.actor,
                        &filter.resource_under,
                        &filter.start,
                        &filter.end,
                        &site,
                        &after,
                        &limit,
                    ],
                )
                .await?
            } else {
                let (time, site, position) = match after {
                    Some(c) => (
                        Some(c.time),
                        Some(c.site.unwrap_or(Uuid::nil())),
                        Some(c.position),
                    ),
                    None => (None, None, None),
                };
                tx.query(
                    &format!(
                        "SELECT * FROM (
                            SELECT site_id, {RECORD_COLUMNS} FROM audit_log
                             WHERE {FILTERS} AND ($6::timestamptz IS NULL
                                   OR (create_time, site_id, position) > ($6, $7::uuid, $8::int8))
                            UNION ALL
                            SELECT NULL::uuid, {RECORD_COLUMNS} FROM dealer_audit_log
                             WHERE {FILTERS} AND ($6::timestamptz IS NULL
                                   OR (create_time, {NIL}, position) > ($6, $7::uuid, $8::int8))
                         ) r
                         ORDER BY create_time, coalesce(site_id, {NIL}), position LIMIT $9"
                    ),
                    &[
                        &dealer,
                        &filter.actor,
                        &filter.resource_under,
                        &filter.start,
                        &filter.end,
                        &time,
                        &site,
                        &position,
                        &limit,
                    ],
                )
                .await?
            };
            Ok(rows
                .iter()
                .map(|r| AuditRecord {
                    site: r.get(0),
                    position: r.get(1),
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
