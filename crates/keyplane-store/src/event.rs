//! Device events: stored once per (device, sequence number), read by cursor.

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
    /// Sequence number in the device's log.
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
    /// Cursor (global, increasing).
    pub id: i64,
    /// Site id.
    pub site: Uuid,
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
    "e.id, e.site_id, e.device_id, e.kind, e.partition, e.user_number, e.user_id,
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
        id: row.get(0),
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
        };
        crate::credential::credential_delete_in_txn(tx, &actor, site, user, credential).await?;
    }
    Ok(())
}

impl Store {
    /// Stores an event from the site's agent; a re-sent one (same device and
    /// sequence number) is not stored again. Returns whether it was new.
    pub async fn event_record(&self, site: Uuid, event: &NewEvent) -> Result<bool, StoreError> {
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
            let n = tx
                .execute(
                    "INSERT INTO device_event (site_id, device_id, source_seq, kind, partition, user_number,
                        user_id, silent_alarm, occur_time)
                     SELECT $1, $2, $3, $4, $5, $6,
                        (SELECT c.user_id FROM slot_assignment sa JOIN credential c
                           ON c.site_id = sa.site_id AND c.id = sa.credential_id
                         WHERE sa.site_id = $1 AND sa.device_id = $2 AND sa.slot = $6),
                        $7, $8
                     ON CONFLICT (site_id, device_id, source_seq) WHERE source_seq > 0 DO NOTHING",
                    &[
                        &site,
                        &event.device,
                        &event.seq,
                        &event.kind.as_str(),
                        &event.partition.map(i16::from),
                        &user_number,
                        &(event.kind == EventKind::Duress),
                        &event.occur_time,
                    ],
                )
                .await?;
            if n > 0 && event.kind == EventKind::AccessGranted {
                credential_use_in_txn(&tx, site, event.device, user_number).await?;
            }
            Ok(n > 0)
        })
    }

    /// Events after cursor `after`, oldest first: of one site of `dealer`, or of all
    /// its sites when `site` is None.
    pub async fn event_list(
        &self,
        dealer: Uuid,
        site: Option<Uuid>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>, StoreError> {
        in_txn!(self, "event_list", |tx| {
            if let Some(site) = site {
                site_get_in_txn(&tx, dealer, site).await?;
            }
            let rows = tx
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM device_event e JOIN site s ON s.id = e.site_id
                         {EVENT_DEVICE_JOIN}
                         WHERE s.dealer_id = $1 AND ($2::uuid IS NULL OR e.site_id = $2) AND e.id > $3
                         ORDER BY e.id LIMIT $4"
                    ),
                    &[&dealer, &site, &after, &limit],
                )
                .await?;
            Ok(rows.iter().filter_map(event_from_row).collect())
        })
    }
}
