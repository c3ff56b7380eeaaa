//! What agents read and report: desired slots since a revision, acks, sync status.

use crate::Cached;
use crate::in_txn;
use crate::site::{not_found_site, site_get_in_txn};
use crate::{AgentUpdate, DesiredCode, DesiredSlot, DeviceSync, SiteSync, Store, StoreError};
use keyplane_core::authority::Level;
use keyplane_core::{DeviceKind, DeviceModel};

use crate::Transaction;
use crate::rules::AccessRules;
use futures_util::TryStreamExt;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, RowStream, Statement};
use uuid::Uuid;

/// A site that changed since the last poll (see [`Store::sites_changed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteChange {
    /// The site.
    pub site: Uuid,
    /// Its revision (0 when gone).
    pub revision: i64,
    /// Its session epoch (0 when gone).
    pub session_epoch: i64,
    /// Its resync sequence (0 when gone): OpsService/ResyncSite advances it.
    pub resync: i64,
    /// Whether it was deleted.
    pub gone: bool,
}

/// An agent is shown as connected only if heard from within this many seconds.
const AGENT_LIVENESS_SECS: f64 = 90.0;

/// The (device, slot) pairs of site `$1` changed after revision `$2`.
///
/// The upper bound, the site's head, is there for the planner: a catch-up runs
/// under generic plans, which cannot know how far behind `$2` is and take a third
/// of the site's change log as changed (enough for a sequential scan of the log and
/// hash joins over the site's slots and credentials); with both bounds unknown they
/// take a narrow range, read by the log's key.
macro_rules! changed_slots {
    () => {
        "SELECT DISTINCT device_id, slot FROM site_change
          WHERE site_id = $1 AND revision > $2
            AND revision <= (SELECT revision FROM site WHERE id = $1)"
    };
}

/// The credentials holding a slot that changed after revision `$2` at site `$1`.
///
/// Written so that every plan, the generic ones a catch-up runs under included,
/// reads a few rows per changed slot however large the site: each changed slot is
/// probed by its key (a `LATERAL` with `LIMIT`, which the planner cannot turn into
/// a join over the site's slots), and the catch-up's other reads take the result
/// as an array (`= ANY(ARRAY(...))`: computed once, then an index condition).
/// Written as joins, their generic plans on a site of 1,000 codes with a long
/// change log read the site's slots and credentials on every catch-up (4,000
/// rows for one change; the slot read 0.60 ms where it now takes 0.11).
macro_rules! changed_credentials {
    () => {
        concat!(
            "SELECT sa.credential_id FROM (",
            changed_slots!(),
            ") ch, LATERAL (SELECT credential_id FROM slot_assignment
                         WHERE site_id = $1 AND device_id = ch.device_id AND slot = ch.slot LIMIT 1) sa"
        )
    };
}

/// No condition: every user of the site.
macro_rules! every_user {
    ($column:literal) => {
        ""
    };
}

/// The users of the credentials in [`changed_credentials`].
macro_rules! users_of_changed {
    ($column:literal) => {
        concat!(
            " AND ",
            $column,
            " = ANY(ARRAY(SELECT c.user_id FROM credential c WHERE c.site_id = $1 AND c.id = ANY(ARRAY(",
            changed_credentials!(),
            "))))"
        )
    };
}

/// The reads of an agent update after the site row, in the order they are sent: the
/// levels, the access rules (holidays take only the site) and the slots.
struct UpdateReads {
    levels: &'static str,
    rules: [&'static str; 4],
    slots: &'static str,
}

/// A snapshot's reads: the whole site (`$1`).
const SNAPSHOT_READS: UpdateReads = UpdateReads {
    // Each panel code's user's level in the partitions the code is scoped to.
    levels: "SELECT cp.credential_id, cp.partition, ua.level FROM credential_partition cp
             JOIN credential c ON c.site_id = cp.site_id AND c.id = cp.credential_id
             JOIN user_authority ua ON ua.site_id = cp.site_id AND ua.user_id = c.user_id
                                    AND ua.partition = cp.partition
             WHERE cp.site_id = $1 ORDER BY cp.partition",
    rules: crate::rules::rules_sql!(every_user),
    slots: "SELECT sa.device_id, sa.slot, sa.credential_id, c.user_id, c.pin_sealed, c.pin_key_id,
                u.open_close_reporting, d.kind, c.valid_from, c.valid_until,
                sa.write_generation, false
             FROM slot_assignment sa JOIN credential c ON c.site_id = sa.site_id AND c.id = sa.credential_id
             JOIN site_user u ON u.site_id = c.site_id AND u.id = c.user_id
             JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
             WHERE sa.site_id = $1
             UNION ALL
             SELECT o.device_id, o.slot, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true
             FROM observed_slot o WHERE o.site_id = $1 AND o.removing
             ORDER BY 1, 2",
};

/// A catch-up's reads: the slots of site `$1` changed after revision `$2`, with the
/// levels and access rules of only the codes about to be sent, so a catch-up after
/// one change reads a few rows however large the site.
const CHANGES_READS: UpdateReads = UpdateReads {
    levels: concat!(
        "SELECT cp.credential_id, cp.partition, ua.level FROM credential_partition cp,
             LATERAL (SELECT user_id FROM credential
                       WHERE site_id = $1 AND id = cp.credential_id LIMIT 1) c,
             LATERAL (SELECT level FROM user_authority
                       WHERE site_id = $1 AND user_id = c.user_id AND partition = cp.partition LIMIT 1) ua
          WHERE cp.site_id = $1 AND cp.credential_id = ANY(ARRAY(",
        changed_credentials!(),
        ")) ORDER BY cp.partition"
    ),
    rules: crate::rules::rules_sql!(users_of_changed),
    slots: concat!(
        "SELECT ch.device_id, ch.slot, sa.credential_id, c.user_id, c.pin_sealed, c.pin_key_id,
                u.open_close_reporting, d.kind, c.valid_from, c.valid_until,
                sa.write_generation, coalesce(o.removing, false)
             FROM (",
        changed_slots!(),
        ") ch
             LEFT JOIN LATERAL (SELECT * FROM slot_assignment
                                 WHERE site_id = $1 AND device_id = ch.device_id AND slot = ch.slot LIMIT 1) sa ON true
             LEFT JOIN LATERAL (SELECT * FROM credential WHERE site_id = $1 AND id = sa.credential_id LIMIT 1) c ON true
             LEFT JOIN LATERAL (SELECT * FROM site_user WHERE site_id = $1 AND id = c.user_id LIMIT 1) u ON true
             LEFT JOIN LATERAL (SELECT * FROM device WHERE site_id = $1 AND id = ch.device_id LIMIT 1) d ON true
             LEFT JOIN LATERAL (SELECT * FROM observed_slot
                                 WHERE site_id = $1 AND device_id = ch.device_id AND slot = ch.slot
                                   AND removing LIMIT 1) o ON true
             ORDER BY ch.device_id, ch.slot"
    ),
};

/// The reads of a catch-up after revision `$2` at site `$1` (the holidays take `$1`
/// only), after its first: for tests of the plans they run under.
#[doc(hidden)]
pub const CATCH_UP_READS: [&str; 6] = [
    CHANGES_READS.levels,
    CHANGES_READS.rules[0],
    CHANGES_READS.rules[1],
    CHANGES_READS.rules[2],
    CHANGES_READS.rules[3],
    CHANGES_READS.slots,
];

/// The first read of an agent update: the site row, its devices (ids and models in
/// id order), and the switch of the rest of the transaction to generic plans
/// ([`crate::generic_plans_column!`]), in one statement where they were three: a
/// catch-up follows every write an agent must hear of, and each statement costs
/// PostgreSQL about 25 µs beyond its work. The reads after this one are bound once
/// it ran, so under generic plans; this one is a primary-key read either way.
const SITE_AND_DEVICES_SQL: &str = concat!(
    "SELECT s.revision, s.time_zone, s.lockdown, s.change_floor, d.ids, d.models, ",
    crate::generic_plans_column!(),
    "
       FROM site s,
            LATERAL (SELECT coalesce(array_agg(id ORDER BY id), '{}') AS ids,
                            coalesce(array_agg(model ORDER BY id), '{}') AS models
                       FROM device WHERE site_id = s.id) d
      WHERE s.id = $1"
);

/// [`UpdateReads`] through the connection's statement cache.
struct UpdateStatements {
    levels: Statement,
    rules: Vec<Statement>,
    slots: Statement,
}

/// Each credential's (partition, level) pairs.
type Levels = HashMap<Uuid, Vec<(u8, Level)>>;

impl UpdateStatements {
    async fn prepare(tx: &Transaction<'_>, reads: &UpdateReads) -> Result<Self, StoreError> {
        let (levels, rules, slots) = tokio::try_join!(
            tx.prepare_cached(reads.levels),
            futures_util::future::try_join_all(
                reads.rules.iter().map(|sql| tx.prepare_cached(sql))
            ),
            tx.prepare_cached(reads.slots),
        )?;
        Ok(UpdateStatements {
            levels,
            rules,
            slots,
        })
    }

    /// Sends every read at once, in order (one round trip): the levels, the rules,
    /// and the slots as a stream still to be read.
    async fn read(
        &self,
        tx: &Transaction<'_>,
        by_site: &[&(dyn ToSql + Sync)],
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Levels, AccessRules, RowStream), StoreError> {
        let (levels, holidays, personal, points, standard, slots) = tokio::join!(
            biased;
            tokio_postgres::Client::query(tx, &self.levels, params),
            tokio_postgres::Client::query(tx, &self.rules[0], by_site),
            tokio_postgres::Client::query(tx, &self.rules[1], params),
            tokio_postgres::Client::query(tx, &self.rules[2], params),
            tokio_postgres::Client::query(tx, &self.rules[3], params),
            tokio_postgres::Client::query_raw(tx, &self.slots, params.iter().copied()),
        );
        let mut by_credential: Levels = HashMap::new();
        for r in levels? {
            let partition = u8::try_from(r.get::<_, i16>(1)).ok();
            let level = Level::from_number(i32::from(r.get::<_, i16>(2)));
            if let (Some(p), Some(l)) = (partition, level) {
                by_credential.entry(r.get(0)).or_default().push((p, l));
            }
        }
        let rules = crate::rules::rules_from_rows(&holidays?, &personal?, &points?, &standard?)?;
        Ok((by_credential, rules, slots?))
    }
}

impl Store {
    fn desired_from_row(
        &self,
        site: Uuid,
        row: &Row,
        levels: &HashMap<Uuid, Vec<(u8, Level)>>,
        rules: &AccessRules,
    ) -> Result<DesiredSlot, StoreError> {
        let device: Uuid = row.get(0);
        let slot = u16::try_from(row.get::<_, i32>(1))
            .map_err(|_| StoreError::Internal("slot out of range".into()))?;
        let credential: Option<Uuid> = row.get(2);
        let code = match credential {
            None => None,
            Some(credential) => {
                let sealed: Vec<u8> = row.get(4);
                let key_id: String = row.get(5);
                let kind = row.get::<_, Option<&str>>(7);
                let panel = kind == Some("panel");
                let user: Uuid = row.get(3);
                let schedules = rules.schedules_for(user, device, kind.and_then(DeviceKind::parse));
                Some(DesiredCode {
                    credential,
                    user,
                    schedules,
                    valid_from: row.get(8),
                    valid_until: row.get(9),
                    write_generation: row.get::<_, Option<i64>>(10).unwrap_or(0),
                    pin: self.key().open(site, credential, &key_id, &sealed)?,
                    authorities: if panel {
                        levels.get(&credential).cloned().unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                    open_close_reporting: panel && row.get::<_, Option<bool>>(6).unwrap_or(false),
                })
            }
        };
        Ok(DesiredSlot {
            device,
            slot,
            code,
            remove_local: row.get(11),
        })
    }

    /// The row as a desired slot. A row that cannot be read (a sealed PIN that does
    /// not open) is reported and left out (None), so one bad row never stops a site's
    /// sync; in a snapshot that clears the slot, which fails closed.
    fn desired_slot(
        &self,
        site: Uuid,
        row: &Row,
        levels: &HashMap<Uuid, Vec<(u8, Level)>>,
        rules: &AccessRules,
    ) -> Option<DesiredSlot> {
        match self.desired_from_row(site, row, levels, rules) {
            Ok(slot) => Some(slot),
            Err(e) => {
                let device: Uuid = row.get(0);
                let slot: i32 = row.get(1);
                tracing::error!(
                    %site, %device, slot, error = %e,
                    "a desired slot cannot be read and is not sent to the agent; the rest of the site is"
                );
                None
            }
        }
    }

    /// What the site's agent must apply after `from`: a snapshot when it has nothing
    /// (0), claims a revision the site never had, or is behind the change log's
    /// window (`site.change_floor`, see [`Store::change_log_prune`]); the changed
    /// slots otherwise. Read in one repeatable-read snapshot so slots and revision
    /// agree. The desired rows are streamed from PostgreSQL and turned into slots one
    /// at a time, so a large site is held once (as slots), never also as rows.
    ///
    /// Two round trips: BEGIN with the site row, its devices, the levels and access
    /// rules of the codes about to be sent and the slots themselves, pipelined
    /// through the statement cache (an agent that has a revision is read as a
    /// catch-up, since almost every one is; if the site row then says a snapshot is
    /// due, the snapshot's reads take one more); then COMMIT.
    pub async fn agent_update(&self, site: Uuid, from: i64) -> Result<AgentUpdate, StoreError> {
        let conn = self.conn().await?;
        let tx = crate::Transaction::begin(&conn, crate::READ_SNAPSHOT);
        let catch_up = from > 0;
        let reads = if catch_up {
            &CHANGES_READS
        } else {
            &SNAPSHOT_READS
        };
        let s_site = tx.prepare_cached(SITE_AND_DEVICES_SQL).await?;
        let statements = UpdateStatements::prepare(&tx, reads).await?;
        let by_site: [&(dyn ToSql + Sync); 1] = [&site];
        let since: [&(dyn ToSql + Sync); 2] = [&site, &from];
        let params: &[&(dyn ToSql + Sync)] = if catch_up { &since } else { &by_site };
        let (site_row, read) = tokio::join!(
            biased;
            tokio_postgres::Client::query_opt(&tx, &s_site, &by_site),
            statements.read(&tx, &by_site, params),
        );
        let site_row = site_row?.ok_or_else(|| not_found_site(site))?;
        let revision: i64 = site_row.get(0);
        let time_zone: String = site_row.get(1);
        let lockdown: bool = site_row.get(2);
        let floor: i64 = site_row.get(3);
        let device_ids: Vec<Uuid> = site_row.get(4);
        let models: Vec<&str> = site_row.get(5);
        let devices = device_ids
            .into_iter()
            .zip(models)
            .map(|(id, model)| {
                DeviceModel::find(model)
                    .map(|m| (id, m))
                    .ok_or_else(|| StoreError::Internal(format!("unknown model {model}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Changes after `from` are all in the log only when `from` is at or above the
        // floor (every change at or below it may have been pruned).
        let snapshot = from <= 0 || from > revision || from < floor;
        let read = if snapshot && catch_up {
            // The catch-up read as sent is of no use: dropped unread (tokio-postgres
            // discards the rest of its rows).
            drop(read);
            let statements = UpdateStatements::prepare(&tx, &SNAPSHOT_READS).await?;
            statements.read(&tx, &by_site, &by_site).await
        } else {
            read
        };
        let (levels, rules, stream) = read?;
        // Read to its end before anything else is sent on the connection.
        let mut stream = std::pin::pin!(stream);
        let mut slots = Vec::new();
        while let Some(row) = stream.try_next().await? {
            if let Some(slot) = self.desired_slot(site, &row, &levels, &rules) {
                slots.push(slot);
            }
        }
        // A snapshot carries the trace of the change that made its revision.
        let traceparent = if keyplane_telemetry::exporting() && (snapshot || from < revision) {
            let after = if snapshot { revision - 1 } else { from };
            tx.query_opt(
                "SELECT traceparent FROM site_change
                 WHERE site_id = $1 AND revision > $2 AND traceparent IS NOT NULL
                 ORDER BY revision DESC LIMIT 1",
                &[&site, &after],
            )
            .await?
            .map(|r| r.get(0))
        } else {
            None
        };
        let update = if snapshot {
            AgentUpdate::Snapshot {
                revision,
                devices,
                time_zone,
                lockdown,
                slots,
                traceparent,
            }
        } else {
            // Nothing committed since `from` when it is the revision: every change an
            // agent must hear of advances the revision, so the read found nothing.
            AgentUpdate::Changes {
                from,
                revision,
                devices,
                time_zone,
                lockdown,
                slots,
                traceparent,
            }
        };
        tx.commit().await?;
        Ok(update)
    }

    /// The current revisions of `sites` (no dealer scoping: agents and tests only).
    pub async fn site_revisions(&self, sites: &[Uuid]) -> Result<Vec<(Uuid, i64)>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id, revision FROM site WHERE id = ANY($1)",
                &[&sites],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Sites whose revision advanced after `since - slack` (None: after `now - slack`),
    /// with their revisions, and the database's `now` to pass as the next `since`. One
    /// indexed query, whatever the number of sites or agents: the wake-up poller's
    /// read. `slack` covers transactions that advanced a revision before `since` but
    /// committed after it; re-reading a site costs nothing, since wake-ups only say
    /// "look again". No dealer scoping: agents only.
    pub async fn sites_changed(
        &self,
        since: Option<SystemTime>,
        slack: Duration,
    ) -> Result<(Vec<SiteChange>, SystemTime), StoreError> {
        let conn = self.conn().await?;
        // Always one row at least (the clock), then one per changed or deleted site.
        let rows = conn
            .query(
                "SELECT n.now, s.id, s.revision, s.session_epoch, false, s.resync_seq FROM (SELECT now() AS now) n
                 LEFT JOIN site s ON s.change_time > COALESCE($1, n.now) - make_interval(secs => $2)
                 UNION ALL
                 SELECT now(), g.site_id, 0, 0, true, 0 FROM site_gone g
                  WHERE g.gone_time > COALESCE($1, now()) - make_interval(secs => $2)",
                &[&since, &slack.as_secs_f64()],
            )
            .await?;
        let now = rows
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::Internal("no clock row".into()))?;
        let changed = rows
            .iter()
            .filter_map(|r| {
                Some(SiteChange {
                    site: r.get::<_, Option<Uuid>>(1)?,
                    revision: r.get::<_, Option<i64>>(2)?,
                    session_epoch: r.get::<_, Option<i64>>(3)?,
                    gone: r.get(4),
                    resync: r.get::<_, Option<i64>>(5)?,
                })
            })
            .collect();
        Ok((changed, now))
    }

    /// Records that the agent applied everything up to `revision` on `device`.
    /// Revisions never go backwards, so a late duplicate ack changes nothing. None:
    /// no such device at the site.
    pub async fn device_ack(
        &self,
        site: Uuid,
        device: Uuid,
        revision: i64,
    ) -> Result<Option<Acked>, StoreError> {
        // One statement, one commit ([`Store::device_acks`]). It leaves the site row
        // alone: the device's `last_seen_time` is the agent's liveness (see
        // `sync_status`), because every write of the site holds the site row lock
        // until it commits and an ack that updated the site row queued behind them
        // (9.8 ms per ack under load, and the writes waited on the acks). The head
        // revision is a plain read: the agent only ever received committed
        // revisions. When the ack moves the device on, the age of the acked
        // revision's change is read from its log rows (metrics).
        Ok(self
            .device_acks(&[(site, device, revision)])
            .await?
            .pop()
            .flatten())
    }

    /// Records many acks (site, device, revision) in one statement and one commit,
    /// each as [`Store::device_ack`] does; the results are in the order given. Acks
    /// of one device are taken together (the highest revision counts, and each gets
    /// the same result). The device rows are locked in (site, device) order, so two
    /// batches never wait on each other in a cycle.
    pub async fn device_acks(
        &self,
        acks: &[(Uuid, Uuid, i64)],
    ) -> Result<Vec<Option<Acked>>, StoreError> {
        let mut merged: std::collections::BTreeMap<(Uuid, Uuid), i64> =
            std::collections::BTreeMap::new();
        for &(site, device, revision) in acks {
            let r = merged.entry((site, device)).or_insert(revision);
            *r = (*r).max(revision);
        }
        let (sites, rest): (Vec<Uuid>, Vec<(Uuid, i64)>) =
            merged.iter().map(|(&(s, d), &r)| (s, (d, r))).unzip();
        let (devices, revisions): (Vec<Uuid>, Vec<i64>) = rest.into_iter().unzip();
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "WITH input AS (
                    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]) AS i(site_id, device_id, revision)
                 ), locked AS (
                    SELECT d.site_id, d.id, d.applied_revision, i.revision FROM device d
                      JOIN input i ON i.site_id = d.site_id AND i.device_id = d.id
                     ORDER BY d.site_id, d.id
                       FOR NO KEY UPDATE OF d
                 ), acked AS (
                    UPDATE device d SET applied_revision = GREATEST(d.applied_revision,
                        LEAST(l.revision, (SELECT revision FROM site WHERE id = l.site_id))),
                        last_seen_time = now()
                      FROM locked l
                     WHERE d.site_id = l.site_id AND d.id = l.id
                    RETURNING d.site_id, d.id, d.applied_revision, l.applied_revision AS before
                 )
                 SELECT site_id, id, CASE WHEN applied_revision > before THEN
                        (SELECT extract(epoch FROM clock_timestamp() - max(ch.change_time))::float8
                           FROM site_change ch
                          WHERE ch.site_id = acked.site_id AND ch.revision = acked.applied_revision)
                        END
                   FROM acked",
                &[&sites, &devices, &revisions],
            )
            .await?;
        let recorded: std::collections::HashMap<(Uuid, Uuid), Acked> = rows
            .iter()
            .map(|r| {
                (
                    (r.get(0), r.get(1)),
                    Acked {
                        commit_age: r
                            .get::<_, Option<f64>>(2)
                            .map(|secs| std::time::Duration::from_secs_f64(secs.max(0.0))),
                    },
                )
            })
            .collect();
        Ok(acks
            .iter()
            .map(|&(site, device, _)| recorded.get(&(site, device)).copied())
            .collect())
    }

    /// Marks the site's agent stream `session` as the open one (recording no place:
    /// see [`Store::agent_session_open_at`]); returns the new session epoch.
    pub async fn agent_session_open(&self, site: Uuid, session: Uuid) -> Result<i64, StoreError> {
        Ok(self
            .agent_session_open_at(site, session, &crate::AgentPlace::default())
            .await?
            .epoch)
    }

    /// Records that this replica still holds an open agent stream for each of
    /// `sites` (an idle agent sends nothing, yet is connected). One statement for
    /// all of them; a site row a write holds locked right now is skipped rather than
    /// waited for (the next refresh catches it, well within the liveness window).
    pub async fn agents_seen(&self, sites: &[Uuid]) -> Result<u64, StoreError> {
        if sites.is_empty() {
            return Ok(0);
        }
        let conn = self.conn().await?;
        // Once per refresh period: not worth a cached statement.
        Ok(conn
            .execute(
                "UPDATE site SET agent_last_seen = now()
                 WHERE id IN (SELECT id FROM site WHERE id = ANY($1) AND agent_connected
                              FOR NO KEY UPDATE SKIP LOCKED)",
                &[&sites],
            )
            .await?)
    }

    /// Marks the site's agent disconnected, unless another stream opened since
    /// `session` did (a duplicate or a reconnect that overtook it).
    pub async fn agent_session_close(&self, site: Uuid, session: Uuid) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.execute(
            "UPDATE site SET agent_connected = false, agent_last_seen = now()
             WHERE id = $1 AND agent_session = $2",
            &[&site, &session],
        )
        .await?;
        Ok(())
    }

    /// Sync state of a site and its devices.
    pub async fn sync_status(&self, dealer: Uuid, site: Uuid) -> Result<SiteSync, StoreError> {
        let conn = self.conn().await?;
        let tx = crate::Transaction::begin(&conn, crate::READ_SNAPSHOT);
        let s = site_get_in_txn(&tx, dealer, site).await?;
        let row = tx
            .query_one(
                // The agent was last seen when its stream opened or closed (the site
                // row) or when it last acknowledged a device (`device_ack`).
                "SELECT seen, agent_connected AND coalesce(extract(epoch FROM now() - seen)::float8 < $2, false)
                 FROM site s, LATERAL (SELECT GREATEST(s.agent_last_seen,
                    (SELECT max(last_seen_time) FROM device d WHERE d.site_id = s.id)) AS seen) l
                 WHERE s.id = $1",
                &[&site, &AGENT_LIVENESS_SECS],
            )
            .await?;
        let agent_last_seen = row.get(0);
        let agent_connected = row.get(1);
        let devices = tx
            .query(
                "SELECT d.id, d.applied_revision, d.last_seen_time,
                    coalesce((SELECT max(revision) FROM site_change ch WHERE ch.site_id = d.site_id AND ch.device_id = d.id),
                             (SELECT change_floor FROM site WHERE id = d.site_id)),
                    (SELECT count(DISTINCT slot) FROM site_change ch
                      WHERE ch.site_id = d.site_id AND ch.device_id = d.id AND ch.revision > d.applied_revision),
                    (SELECT count(*) FROM slot_assignment sa WHERE sa.site_id = d.site_id AND sa.device_id = d.id),
                    (SELECT count(*) FROM observed_slot o WHERE o.site_id = d.site_id AND o.device_id = d.id
                       AND o.state IN ('foreign', 'conflict')),
                    (SELECT count(*) FROM observed_slot o WHERE o.site_id = d.site_id AND o.device_id = d.id
                       AND o.state IN ('drifted', 'missing')),
                    (SELECT count(*) FROM observed_slot o WHERE o.site_id = d.site_id AND o.device_id = d.id
                       AND o.state = 'conflict'),
                    (SELECT count(*) FROM observed_slot o WHERE o.site_id = d.site_id AND o.device_id = d.id
                       AND o.state = 'unverifiable')
                 FROM device d WHERE d.site_id = $1 ORDER BY d.id",
                &[&site],
            )
            .await?
            .iter()
            .map(|r| DeviceSync {
                device: r.get(0),
                applied_revision: r.get(1),
                last_seen: r.get(2),
                desired_revision: r.get(3),
                pending_changes: r.get(4),
                managed_slots: r.get(5),
                local_slots: r.get(6),
                drifted_slots: r.get(7),
                conflicts: r.get(8),
                unverifiable_slots: r.get(9),
            })
            .collect();
        let mut setup_issues = Vec::new();
        let row = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM device WHERE site_id = $1 AND kind = 'panel'),
                        EXISTS (SELECT 1 FROM user_authority WHERE site_id = $1 AND level = 1)",
                &[&site],
            )
            .await?;
        let (has_panel, has_master): (bool, bool) = (row.get(0), row.get(1));
        let other_key: i64 = tx
            .query_one(
                "SELECT count(*) FROM credential WHERE site_id = $1 AND pin_key_id <> ALL($2)",
                &[&site, &self.key().ids()],
            )
            .await?
            .get(0);
        if other_key > 0 {
            setup_issues.push(format!(
                "{other_key} code(s) are sealed under a PIN key this server does not hold ({}) and cannot reach the devices: start every replica with the same key file",
                self.key().ids().join(", ")
            ));
        }
        if has_panel && !has_master {
            setup_issues.push(
                "no master code yet: the installer must add at least one master (level 1) user"
                    .to_owned(),
            );
        }
        tx.commit().await?;
        Ok(SiteSync {
            setup_issues,
            site,
            revision: s.revision,
            agent_connected,
            agent_last_seen,
            devices,
        })
    }
}

/// How much of each site's change log is kept (see [`Store::change_log_prune`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeWindow {
    /// At most this many change rows per site (one row is one slot of one revision).
    pub rows: i64,
    /// Changes older than this are pruned.
    pub age: Duration,
}

impl Default for ChangeWindow {
    /// 100,000 rows (a plan edit on a site of 20 full doors marks about 5,000) and
    /// 30 days: an agent offline longer gets a snapshot, which it needs anyway.
    fn default() -> Self {
        ChangeWindow {
            rows: 100_000,
            age: Duration::from_secs(30 * 86_400),
        }
    }
}

/// What one [`Store::change_log_prune`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Sites whose window moved.
    pub sites: u64,
    /// Change rows deleted.
    pub rows: u64,
}

impl Store {
    /// Prunes the change log of at most `batch` sites to `window`: every change at or
    /// below a site's new floor is deleted and `site.change_floor` raised to it, in one
    /// transaction per site (agents read floor and log in one snapshot). Only sites
    /// whose revision moved after `since` (every site when None) or that hold changes
    /// older than the window are looked at, so an idle database costs one indexed
    /// read. Returns what it did and the database's clock, the next `since`.
    pub async fn change_log_prune(
        &self,
        window: ChangeWindow,
        since: Option<SystemTime>,
        batch: i64,
    ) -> Result<(Pruned, SystemTime), StoreError> {
        let age = window.age.as_secs_f64();
        let (sites, now): (Vec<Uuid>, SystemTime) = {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT n.now, c.site_id FROM (SELECT now() AS now) n LEFT JOIN (
                        SELECT id AS site_id FROM site WHERE $1::timestamptz IS NULL OR change_time > $1
                        UNION
                        SELECT DISTINCT site_id FROM site_change
                         WHERE change_time < now() - make_interval(secs => $2)
                     ) c ON true LIMIT $3",
                    &[&since, &age, &batch],
                )
                .await?;
            let now = rows
                .first()
                .map(|r| r.get(0))
                .ok_or_else(|| StoreError::Internal("no clock row".into()))?;
            (
                rows.iter()
                    .filter_map(|r| r.get::<_, Option<Uuid>>(1))
                    .collect(),
                now,
            )
        };
        let mut pruned = Pruned::default();
        for site in sites {
            let deleted: Option<i64> = in_txn!(self, "change_log_prune", |tx| {
                let row = tx
                    .query_one(
                        "WITH f AS (SELECT GREATEST(
                            (SELECT revision FROM site_change WHERE site_id = $1
                              ORDER BY revision DESC OFFSET $2 LIMIT 1),
                            (SELECT max(revision) FROM site_change WHERE site_id = $1
                              AND change_time < now() - make_interval(secs => $3))) AS floor),
                         d AS (DELETE FROM site_change ch USING f
                               WHERE ch.site_id = $1 AND ch.revision <= f.floor RETURNING 1),
                         s AS (UPDATE site SET change_floor = GREATEST(change_floor, f.floor)
                               FROM f WHERE id = $1 AND f.floor > change_floor RETURNING 1)
                         SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM s)",
                        &[&site, &window.rows, &age],
                    )
                    .await?;
                let (deleted, moved): (i64, i64) = (row.get(0), row.get(1));
                Ok((moved > 0).then_some(deleted))
            })?;
            if let Some(deleted) = deleted {
                pruned.sites += 1;
                pruned.rows += u64::try_from(deleted).unwrap_or(0);
            }
        }
        Ok((pruned, now))
    }
}

/// A recorded ack.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    /// When the ack moved the device on: the time since the acked revision's change
    /// was committed (None when it moved nothing, or that revision logged no slot).
    pub commit_age: Option<std::time::Duration>,
}
