//! The operators' view of agents and change logs (OpsService, issue 17).
//!
//! The registry of connections is the site row: the replica that holds a site's
//! stream records it there when the stream opens (`agent_session_open_at`), refreshes
//! `agent_last_seen` while it lasts (`agents_seen`), and clears it when it ends; so
//! every replica lists every connection, and one whose replica died stops being
//! listed once unheard of for 90 s. The two remedies are writes to the same row that
//! the wake-up poller of every replica reads (through `change_time`): a resync
//! advances `resync_seq`, a close ends the session and advances `session_epoch`.

use crate::site::{AuditParams, not_found_site};
use crate::{Actor, Cached, PageRequest, Store, StoreError, in_txn};
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// An agent is listed as connected only if heard from within this many seconds (as
/// GetSyncStatus counts it).
const AGENT_LIVENESS_SECS: f64 = 90.0;

/// Where a new agent stream is, as recorded for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentPlace {
    /// The agent's address as the holding replica sees it.
    pub peer: Option<String>,
    /// The replica holding the stream.
    pub replica: String,
    /// The enrolled agent (None: authenticated with an agent token).
    pub agent: Option<Uuid>,
}

/// What opening a session returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOpened {
    /// The site's new session epoch.
    pub epoch: i64,
    /// The site's resync sequence now: only a later one asks this stream to resync.
    pub resync: i64,
}

/// A site's connected agent, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConnection {
    /// The site.
    pub site: Uuid,
    /// The enrolled agent; None for an agent token.
    pub agent: Option<Uuid>,
    /// From its last Hello (empty / 0 if none was recorded).
    pub agent_version: String,
    /// The protocol it is served with.
    pub protocol_version: i32,
    /// Its address as its replica sees it.
    pub peer: Option<String>,
    /// The replica holding its stream.
    pub replica: Option<String>,
    /// When its stream opened.
    pub connect_time: Option<SystemTime>,
    /// When it was last heard of.
    pub last_seen: Option<SystemTime>,
}

/// A device's pending changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePending {
    /// The device.
    pub device: Uuid,
    /// The revision its agent last acknowledged.
    pub applied_revision: i64,
    /// Slots changed after it.
    pub pending_changes: i64,
    /// When the oldest of them was made.
    pub oldest_pending: Option<SystemTime>,
}

/// A site's change log against its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteOpsStatus {
    /// The head of the change log.
    pub revision: i64,
    /// The database's clock when read (ages are measured against it).
    pub now: SystemTime,
    /// Whether an agent is connected (heard of within 90 s).
    pub agent_connected: bool,
    /// Every device of the site, ordered by id.
    pub devices: Vec<DevicePending>,
}

impl SiteOpsStatus {
    /// Pending changes over every device.
    pub fn pending_changes(&self) -> i64 {
        self.devices.iter().map(|d| d.pending_changes).sum()
    }

    /// When the oldest pending change was made.
    pub fn oldest_pending(&self) -> Option<SystemTime> {
        self.devices.iter().filter_map(|d| d.oldest_pending).min()
    }

    /// How long the oldest pending change has waited (None when none is pending).
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        self.oldest_pending()
            .map(|t| self.now.duration_since(t).unwrap_or_default())
    }
}

/// What a resync request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncRequested {
    /// The site's revision then.
    pub revision: i64,
    /// The new resync sequence (for this replica's own streams).
    pub resync: i64,
    /// Whether an agent was connected.
    pub agent_connected: bool,
}

impl Store {
    /// Marks `session` as the open stream of `site`'s agent, recording where it is
    /// for operators; the site's session epoch advances, so a session it replaces
    /// (on any replica) re-checks and ends.
    pub async fn agent_session_open_at(
        &self,
        site: Uuid,
        session: Uuid,
        place: &AgentPlace,
    ) -> Result<SessionOpened, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "UPDATE site SET agent_connected = true, agent_session = $2, agent_last_seen = now(),
                    session_epoch = session_epoch + 1, agent_peer = $3, agent_replica = $4,
                    agent_id = $5, agent_connect_time = now(), agent_closed_session = NULL
                 WHERE id = $1 RETURNING session_epoch, resync_seq",
                &[&site, &session, &place.peer, &place.replica, &place.agent],
            )
            .await?
            .ok_or_else(|| not_found_site(site))?;
        Ok(SessionOpened {
            epoch: row.get(0),
            resync: row.get(1),
        })
    }

    /// The connected agents of `dealer`'s sites (of `site` alone, when given: another
    /// dealer's site is not found), ordered by site, one page.
    pub async fn agent_connections(
        &self,
        dealer: Uuid,
        site: Option<Uuid>,
        page: PageRequest,
    ) -> Result<Vec<AgentConnection>, StoreError> {
        let conn = self.conn().await?;
        let tx = crate::Transaction::begin(&conn, crate::READ_SNAPSHOT);
        if let Some(site) = site {
            tx.query_opt(
                "SELECT 1 FROM site WHERE id = $1 AND dealer_id = $2",
                &[&site, &dealer],
            )
            .await?
            .ok_or_else(|| not_found_site(site))?;
        }
        // site_by_dealer (dealer_id, id) walks the dealer's sites in page order.
        let rows = tx
            .query(
                "SELECT s.id, s.agent_id, h.agent_version, h.protocol_version, s.agent_peer,
                        s.agent_replica, s.agent_connect_time, l.seen
                   FROM site s
                   LEFT JOIN agent_hello h ON h.site_id = s.id
                   CROSS JOIN LATERAL (SELECT GREATEST(s.agent_last_seen,
                        (SELECT max(last_seen_time) FROM device d WHERE d.site_id = s.id)) AS seen) l
                  WHERE s.dealer_id = $1 AND ($2::uuid IS NULL OR s.id = $2)
                    AND ($3::uuid IS NULL OR s.id > $3)
                    AND s.agent_connected AND s.agent_session IS NOT NULL
                    AND extract(epoch FROM now() - l.seen)::float8 < $4
                  ORDER BY s.id
                  LIMIT $5",
                &[&dealer, &site, &page.after, &AGENT_LIVENESS_SECS, &page.limit],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| AgentConnection {
                site: r.get(0),
                agent: r.get(1),
                agent_version: r.get::<_, Option<String>>(2).unwrap_or_default(),
                protocol_version: r.get::<_, Option<i32>>(3).unwrap_or(0),
                peer: r.get(4),
                replica: r.get(5),
                connect_time: r.get(6),
                last_seen: r.get(7),
            })
            .collect())
    }

    /// Asks the stream of `site`'s agent, on whichever replica holds it, to send a
    /// full snapshot. Audited.
    pub async fn site_resync(
        &self,
        actor: &Actor,
        site: Uuid,
    ) -> Result<ResyncRequested, StoreError> {
        in_txn!(self, "site_resync", |tx| {
            let row = tx
                .query_opt(
                    "UPDATE site SET resync_seq = resync_seq + 1
                      WHERE id = $1 AND dealer_id = $2
                     RETURNING revision, resync_seq, agent_connected AND agent_session IS NOT NULL
                        AND coalesce(extract(epoch FROM now() - agent_last_seen)::float8 < $3, false)",
                    &[&site, &actor.dealer, &AGENT_LIVENESS_SECS],
                )
                .await?
                .ok_or_else(|| not_found_site(site))?;
            let done = ResyncRequested {
                revision: row.get(0),
                resync: row.get(1),
                agent_connected: row.get(2),
            };
            AuditParams::new(
                actor,
                Some(site),
                "site.resync",
                &format!("sites/{site}"),
                serde_json::json!({ "revision": done.revision, "agent_connected": done.agent_connected }),
            )
            .before(serde_json::json!({ "resync_seq": done.resync - 1 }))
            .after(serde_json::json!({ "resync_seq": done.resync }))
            .write(&tx)
            .await?;
            Ok(done)
        })
    }

    /// Ends the session of `site`'s connected agent, on whichever replica holds it;
    /// returns the site's new session epoch. Not found when no agent is connected.
    /// Audited.
    pub async fn agent_connection_close(
        &self,
        actor: &Actor,
        site: Uuid,
    ) -> Result<i64, StoreError> {
        in_txn!(self, "agent_connection_close", |tx| {
            let row = tx
                .query_opt(
                    "UPDATE site SET agent_closed_session = agent_session, agent_session = NULL,
                        agent_connected = false, agent_last_seen = now(),
                        session_epoch = session_epoch + 1
                      WHERE id = $1 AND dealer_id = $2 AND agent_session IS NOT NULL AND agent_connected
                     RETURNING session_epoch, agent_peer, agent_replica",
                    &[&site, &actor.dealer],
                )
                .await?;
            let Some(row) = row else {
                let exists = tx
                    .query_opt(
                        "SELECT 1 FROM site WHERE id = $1 AND dealer_id = $2",
                        &[&site, &actor.dealer],
                    )
                    .await?
                    .is_some();
                return Err(if exists {
                    StoreError::NotFound(format!(
                        "agent connection sites/{site}/agentConnection (no agent is connected)"
                    ))
                } else {
                    not_found_site(site)
                });
            };
            let (peer, replica): (Option<String>, Option<String>) = (row.get(1), row.get(2));
            AuditParams::new(
                actor,
                Some(site),
                "agent_connection.close",
                &format!("sites/{site}/agentConnection"),
                serde_json::json!({ "peer": peer, "replica": replica }),
            )
            .before(serde_json::json!({ "connected": true, "peer": peer, "replica": replica }))
            .after(serde_json::json!({ "connected": false }))
            .write(&tx)
            .await?;
            Ok(row.get(0))
        })
    }

    /// `site`'s revision and, per device, the changes its agent has not acknowledged.
    pub async fn site_ops_status(
        &self,
        dealer: Uuid,
        site: Uuid,
    ) -> Result<SiteOpsStatus, StoreError> {
        let conn = self.conn().await?;
        let tx = crate::Transaction::begin(&conn, crate::READ_SNAPSHOT);
        let head = tx
            .query_opt(
                "SELECT s.revision, now(), s.agent_connected
                        AND coalesce(extract(epoch FROM now() - l.seen)::float8 < $3, false)
                   FROM site s, LATERAL (SELECT GREATEST(s.agent_last_seen,
                        (SELECT max(last_seen_time) FROM device d WHERE d.site_id = s.id)) AS seen) l
                  WHERE s.id = $1 AND s.dealer_id = $2",
                &[&site, &dealer, &AGENT_LIVENESS_SECS],
            )
            .await?
            .ok_or_else(|| not_found_site(site))?;
        // site_change_by_device (site_id, device_id, revision): each device's changes
        // after its ack, without reading the rest of the log.
        let devices = tx
            .query(
                "SELECT d.id, d.applied_revision, p.n, p.oldest
                   FROM device d, LATERAL (SELECT count(DISTINCT ch.slot) AS n,
                        min(ch.change_time) AS oldest FROM site_change ch
                     WHERE ch.site_id = d.site_id AND ch.device_id = d.id
                       AND ch.revision > d.applied_revision) p
                  WHERE d.site_id = $1
                  ORDER BY d.id",
                &[&site],
            )
            .await?
            .iter()
            .map(|r| DevicePending {
                device: r.get(0),
                applied_revision: r.get(1),
                pending_changes: r.get(2),
                oldest_pending: r.get(3),
            })
            .collect();
        tx.commit().await?;
        Ok(SiteOpsStatus {
            revision: head.get(0),
            now: head.get(1),
            agent_connected: head.get(2),
            devices,
        })
    }
}
