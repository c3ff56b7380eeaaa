//! Device events: stored once per (device, log epoch, sequence number), read in
//! each site's commit order (`site_seq`, see migration 0016).

use crate::Cached;
use crate::site::site_get_in_txn;
use crate::{Store, StoreError, in_txn};
use keyplane_core::DeviceKind;
use std::time::SystemTime;
use uuid::Uuid;

/// What happened (stored as text: [`EventKind::as_str`]); defined in keyplane-core.
pub use keyplane_core::EventKind;

/// An event as reported by an agent.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Device id.
    pub device: Uuid,
    /// The device log's epoch: changes whenever its sequence numbers restart.
    pub epoch: i64,
    /// Sequence number in the device's log (from 1).
    pub seq: i64,
    /// What happened.
    pub kind: EventKind,
    /// Partition.
    pub partition: Option<u8>,
    /// User number.
    pub user_number: Option<u16>,
    /// When it happened.
    pub occur_time: SystemTime,
}

/// A stored event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Site id.
    pub site: Uuid,
    /// Position in the site's event log, increasing in commit order (gaps allowed):
    /// with the site, the event's name.
    pub site_seq: i64,
    /// Device id (None for events raised through the API, like lockdown).
    pub device: Option<Uuid>,
    /// What happened.
    pub kind: EventKind,
    /// Partition.
    pub partition: Option<u8>,
    /// User number.
    pub user_number: Option<u16>,
    /// Kind of the device, so its user number is shown the way that kind shows
    /// slots (None when the device is gone and the event does not tell).
    pub device_kind: Option<DeviceKind>,
    /// Who raised it through the API, for lockdown and release.
    pub actor: Option<String>,
    /// The user holding that user number, when keyplane manages it.
    pub user: Option<Uuid>,
    /// Duress.
    pub silent_alarm: bool,
    /// When it happened.
    pub occur_time: SystemTime,
    /// When it was stored.
    pub create_time: SystemTime,
    /// Slot-status events: the issue raised or cleared (`IssueCode::as_str`).
    pub issue: Option<String>,
    /// Slot-status events: the credential whose assignment changed.
    pub credential: Option<Uuid>,
}

const EVENT_COLUMNS: &str =
    "e.site_seq, e.site_id, e.device_id, e.kind, e.partition, e.user_number, e.user_id,
    e.silent_alarm, e.occur_time, e.create_time, e.actor, d.kind, e.issue, e.credential_id";

/// Joins each event's device (events outlive deleted devices, hence LEFT).
const EVENT_DEVICE_JOIN: &str =
    "LEFT JOIN device d ON d.site_id = e.site_id AND d.id = e.device_id";

fn event_from_row(row: &tokio_postgres::Row) -> Option<Event> {
    let kind = EventKind::parse(row.get(3))?;
    let device_kind = row
        .get::<_, Option<&str>>(11)
        .and_then(DeviceKind::parse)
        .or_else(|| kind.panel_only().then_some(DeviceKind::Panel));
    Some(Event {
        site_seq: row.get(0),
        site: row.get(1),
        device: row.get(2),
        kind,
        device_kind,
        partition: row
            .get::<_, Option<i16>>(4)
            .and_then(|p| u8::try_from(p).ok()),
        user_number: row
            .get::<_, Option<i32>>(5)
            .and_then(|n| u16::try_from(n).ok()),
        user: row.get(6),
        silent_alarm: row.get(7),
        occur_time: row.get(8),
        create_time: row.get(9),
        actor: row.get(10),
        issue: row.get(12),
        credential: row.get(13),
    })
}

/// Counts a use of the credential in `slot` of `device`; a limited-use credential
/// that reaches its limit is removed (its slots are cleared on every device).
async fn credential_use_in_txn(
    tx: &crate::Transaction<'_>,
    site: Uuid,
    device: Uuid,
    slot: Option<i32>,
) -> Result<(), StoreError> {
    let Some(slot) = slot else { return Ok(()) };
    // Removal changes desired slots: take the site lock first, as every such write does.
    let dealer: Uuid = tx
        .query_one(
            "SELECT dealer_id FROM site WHERE id = $1 FOR NO KEY UPDATE",
            &[&site],
        )
        .await?
        .get(0);
    let row = tx
        .query_opt(
            "UPDATE credential c SET uses = uses + 1 FROM slot_assignment sa
             WHERE sa.site_id = $1 AND sa.device_id = $2 AND sa.slot = $3
               AND c.site_id = sa.site_id AND c.id = sa.credential_id
             RETURNING c.id, c.user_id, c.uses, c.max_uses",
            &[&site, &device, &slot],
        )
        .await?;
    let Some(row) = row else { return Ok(()) };
    let (credential, user, uses, max_uses): (Uuid, Uuid, i32, Option<i32>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if max_uses.is_some_and(|max| uses >= max) {
        let actor = crate::Actor {
            dealer,
            principal: "keyplane: use limit reached".into(),
            peer: None,
            acting_user: None,
            acting_partition: None,
            acting_as: None,
            request_id: None,
        };
        crate::credential::credential_delete_in_txn(tx, &actor, site, user, credential).await?;
    }
    Ok(())
}

impl Store {
    /// Stores an event from the site's agent; a re-sent one (same device, epoch and
    /// sequence number) is not stored again, and only a newly stored access-granted
    /// event counts a use of a limited-use code. Returns whether it was new.
    pub async fn event_record(&self, site: Uuid, event: &NewEvent) -> Result<bool, StoreError> {
        if event.seq < 1 || event.epoch < 0 {
            return Err(StoreError::InvalidArgument(
                "event.seq must be at least 1 (and event.epoch not negative): a device event is identified by (device, epoch, seq)".into(),
            ));
        }
        in_txn!(self, "event_record", |tx| {
            let known = tx
                .query_opt(
                    "SELECT 1 FROM device WHERE site_id = $1 AND id = $2",
                    &[&site, &event.device],
                )
                .await?
                .is_some();
            if !known {
                return Err(StoreError::NotFound(format!(
                    "device sites/{site}/devices/{}",
                    event.device
                )));
            }
            let user_number = event.user_number.map(i32::from);
            // The insert's trigger takes the site row lock (the event's place in the
            // site's log) before anything else here does.
            let n = tx
                .execute(
                    "INSERT INTO device_event (site_id, device_id, source_epoch, source_seq, kind,
                        partition, user_number, user_id, silent_alarm, occur_time)
                     SELECT $1, $2, $9, $3, $4, $5, $6,
                        (SELECT c.user_id FROM slot_assignment sa JOIN credential c
                           ON c.site_id = sa.site_id AND c.id = sa.credential_id
                         WHERE sa.site_id = $1 AND sa.device_id = $2 AND sa.slot = $6),
                        $7, $8
                     WHERE NOT EXISTS (SELECT 1 FROM device_event
                        WHERE site_id = $1 AND device_id = $2 AND source_epoch = $9
                          AND source_seq = $3 AND source_seq > 0)
                     ON CONFLICT (site_id, device_id, source_epoch, source_seq) WHERE source_seq > 0
                     DO NOTHING",
                    &[
                        &site,
                        &event.device,
                        &event.seq,
                        &event.kind.as_str(),
                        &event.partition.map(i16::from),
                        &user_number,
                        &(event.kind == EventKind::Duress),
                        &event.occur_time,
                        &event.epoch,
                    ],
                )
                .await?;
            if n > 0 && event.kind == EventKind::AccessGranted {
                credential_use_in_txn(&tx, site, event.device, user_number).await?;
            }
            Ok(n > 0)
        })
    }

    /// Events of one site of `dealer` after position `after` (`site_seq`), in the
    /// site's commit order.
    pub async fn event_list(
        &self,
        dealer: Uuid,
        site: Uuid,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>, StoreError> {
        in_txn!(self, "event_list", |tx| {
            site_get_in_txn(&tx, dealer, site).await?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM device_event e
                         {EVENT_DEVICE_JOIN}
                         WHERE e.site_id = $1 AND e.site_seq > $2
                         ORDER BY e.site_seq LIMIT $3"
                    ),
                    &[&site, &after, &limit],
                )
                .await?;
            Ok(rows.iter().filter_map(event_from_row).collect())
        })
    }

    /// The head of the event log of each site of `dealer` (or of `site` alone) that
    /// has events: where a watch that starts now begins. NotFound for a site that is
    /// not the dealer's.
    pub async fn event_heads(
        &self,
        dealer: Uuid,
        site: Option<Uuid>,
    ) -> Result<Vec<(Uuid, i64)>, StoreError> {
        in_txn!(self, "event_heads", |tx| {
            if let Some(site) = site {
                site_get_in_txn(&tx, dealer, site).await?;
            }
            let rows = tx
                .query(
                    "SELECT id, event_seq FROM site
                     WHERE dealer_id = $1 AND ($2::uuid IS NULL OR id = $2) AND event_seq > 0",
                    &[&dealer, &site],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Events of the sites of `dealer` (or of `site` alone) after the given positions
    /// (`site_seq` per site; a site not listed is read from its start), at most
    /// `per_site` of each site, each site's in its commit order. Only sites whose
    /// log head moved past their position are read.
    pub async fn event_read(
        &self,
        dealer: Uuid,
        site: Option<Uuid>,
        positions: &[(Uuid, i64)],
        per_site: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let (sites, seqs): (Vec<Uuid>, Vec<i64>) = positions.iter().copied().unzip();
        let conn = self.conn().await?;
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM site s
             LEFT JOIN unnest($2::uuid[], $3::int8[]) AS p(site_id, seq) ON p.site_id = s.id
             CROSS JOIN LATERAL (
                SELECT * FROM device_event e0
                WHERE e0.site_id = s.id AND e0.site_seq > coalesce(p.seq, 0)
                ORDER BY e0.site_seq LIMIT $5) e
             {EVENT_DEVICE_JOIN}
             WHERE s.dealer_id = $1 AND ($4::uuid IS NULL OR s.id = $4)
               AND s.event_seq > coalesce(p.seq, 0)
             ORDER BY e.site_id, e.site_seq"
        );
        let rows = conn
            .query(&sql, &[&dealer, &sites, &seqs, &site, &per_site])
            .await?;
        Ok(rows.iter().filter_map(event_from_row).collect())
    }
}
