//! What the status of each slot assignment is decided from (docs/STATUS.md): the
//! agent's write reports and device reachability are stored here, and the facts about
//! every assignment are loaded in one pipelined read. The decision itself is
//! `keyplane_core::status::slot_state`; nothing here decides.

use crate::site::site_get_in_txn;
use crate::stored_json::{
    reported_from_json, reported_to_json, thresholds_from_json, thresholds_to_json,
};
use crate::{Cached, Store, StoreError};
use chrono::{DateTime, Utc};
use keyplane_core::DeviceModel;
use keyplane_core::EventKind;
use keyplane_core::constraints::{DeviceConstraints, ReportedConstraints};
use keyplane_core::observed::SlotFinding;
use keyplane_core::schedule::Schedule;
use keyplane_core::status::{
    AgentLink, IssueCode, Presence, ReadBack, Refusal, SiteThresholds, SlotFacts, SlotStatus,
    SlotSummary, SlotValue, WithheldReason, WriteOutcome, WriteReport,
};
use std::collections::BTreeMap;
use uuid::Uuid;

/// An agent is shown as connected only if heard from within this many seconds (as in
/// GetSyncStatus).
const AGENT_LIVENESS_SECS: f64 = 90.0;

/// The facts about one slot assignment, with whose it is.
#[derive(Debug, Clone)]
pub struct AssignmentFacts {
    /// The credential.
    pub credential: Uuid,
    /// Its user.
    pub user: Uuid,
    /// The device.
    pub device: Uuid,
    /// The device's model.
    pub model: &'static DeviceModel,
    /// What the status is decided from.
    pub facts: SlotFacts,
    /// The summary of the last evaluation (None: never evaluated).
    pub last: Option<SlotSummary>,
    /// The assignment is gone (credential deleted, device out of scope): the code
    /// leaves the device, REMOVING until the device confirms.
    pub removed: bool,
    /// What the device was last recorded to hold of the credential in the slot.
    pub held: Held,
    /// What it is known to hold now (to record): the desired value once the device
    /// acked the slot's last change, else as recorded.
    pub held_now: Held,
}

/// What a device holds of one credential in one slot, as far as keyplaned knows:
/// compared with what keyplane wants, it says what a change on its way changes.
/// Never a PIN: the code is known by its keyed hash and write generation.
#[derive(Clone, PartialEq, Eq)]
pub enum Held {
    /// Not recorded (assignments from before the record existed, removals).
    Unknown,
    /// The device holds nothing of this credential there.
    Nothing,
    /// The device holds the code.
    Code {
        /// The PIN's keyed hash, as in `slot_assignment.pin_hash`.
        pin_hash: Vec<u8>,
        /// The write generation (ResolveDrift re-writes bump it).
        generation: i64,
        /// The schedules it follows; None: always.
        schedules: Option<Vec<Schedule>>,
    },
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash is no PIN, but nothing about a code is worth printing.
        match self {
            Held::Unknown => f.write_str("Unknown"),
            Held::Nothing => f.write_str("Nothing"),
            Held::Code { generation, .. } => write!(f, "Code(generation {generation})"),
        }
    }
}

/// Length of a PIN hash tagged with its key id (the id's four bytes, then the HMAC).
const TAGGED_HASH_LEN: usize = 36;

/// Whether two PIN hashes were made under different keys (a key rotation re-hashed
/// the site's codes in between), so comparing them says nothing about the codes.
fn other_key(a: &[u8], b: &[u8]) -> bool {
    a.len() != b.len() || (a.len() == TAGGED_HASH_LEN && a[..4] != b[..4])
}

impl Held {
    /// The slot value the device holds, for `keyplane_core::status`, compared with
    /// `desired` (code version 1, settings version 0): the code version differs when
    /// the code changed, the settings version when neither the code nor the schedules
    /// did (the slot changed all the same: panel levels, open/close reporting). None:
    /// nothing held, or not known (`Unknown` is told apart by the caller).
    fn value(&self, pin_hash: &[u8], generation: i64, desired: &SlotValue) -> Option<SlotValue> {
        let Held::Code {
            pin_hash: held_hash,
            generation: held_generation,
            schedules,
        } = self
        else {
            return None;
        };
        // Across a key rotation the hashes cannot be compared; a rotation alone
        // changes no code.
        let same_code = *held_generation == generation
            && (held_hash.as_slice() == pin_hash || other_key(held_hash, pin_hash));
        let same_schedules = *schedules == desired.schedules;
        Some(SlotValue {
            code_version: if same_code { 1 } else { 0 },
            settings_version: if same_code && same_schedules { 1 } else { 0 },
            schedules: schedules.clone(),
        })
    }
}

/// Slots of one device named by what the agent read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFindings {
    /// The device.
    pub device: Uuid,
    /// Managed slots changed or cleared by hand.
    pub drifted: Vec<u16>,
    /// Hand-programmed slots whose code equals a managed code.
    pub conflicting: Vec<u16>,
    /// Managed slots the device masks.
    pub unverifiable: Vec<u16>,
}

/// The facts of a site's (or a user's) slot assignments, and the findings per device.
#[derive(Debug, Clone, Default)]
pub struct SlotStatusFacts {
    /// One per credential and device, by credential then device.
    pub assignments: Vec<AssignmentFacts>,
    /// Every device of the site with a finding (site-wide loads only).
    pub findings: Vec<DeviceFindings>,
    /// The site's status sequence as read (see [`Store::status_record`]).
    pub seq: i64,
    /// The site's first evaluation since the status sweep came: what holds is
    /// recorded without events (it predates the sweep).
    pub baseline: bool,
}

/// One evaluated assignment, to store as the last evaluation.
#[derive(Debug, Clone)]
pub struct EvaluatedSlot {
    /// The device.
    pub device: Uuid,
    /// The slot.
    pub slot: u16,
    /// The credential.
    pub credential: Uuid,
    /// Its user.
    pub user: Uuid,
    /// The evaluation's summary.
    pub summary: SlotSummary,
    /// A removal the device confirmed: its last evaluation is dropped.
    pub done: bool,
    /// What the device holds of it now.
    pub held: Held,
}

/// An event raised by a slot-status transition.
#[derive(Debug, Clone)]
pub struct StatusEvent {
    /// The device.
    pub device: Uuid,
    /// The slot (stored as the event's user number).
    pub slot: u16,
    /// The credential.
    pub credential: Uuid,
    /// Its user.
    pub user: Uuid,
    /// The event kind.
    pub kind: EventKind,
    /// The issue raised or cleared.
    pub issue: Option<IssueCode>,
    /// When keyplaned saw the transition.
    pub at: DateTime<Utc>,
}

fn status_text(s: SlotStatus) -> &'static str {
    s.as_str()
}

fn status_from(text: &str) -> Option<SlotStatus> {
    SlotStatus::ALL.into_iter().find(|s| s.as_str() == text)
}

fn withheld_parts(w: &WithheldReason) -> (&'static str, Option<DateTime<Utc>>) {
    let at = match w {
        WithheldReason::OutsideSchedule { next_set_at } => *next_set_at,
        WithheldReason::BeforeValidity { starts_at } => Some(*starts_at),
        _ => None,
    };
    (w.code(), at)
}

fn withheld_from(code: &str, at: Option<DateTime<Utc>>) -> Option<WithheldReason> {
    Some(match code {
        "not_an_access_point" => WithheldReason::NotAnAccessPoint,
        "after_validity" => WithheldReason::AfterValidity,
        "lockdown" => WithheldReason::Lockdown,
        "outside_schedule" => WithheldReason::OutsideSchedule { next_set_at: at },
        "before_validity" => WithheldReason::BeforeValidity { starts_at: at? },
        _ => return None,
    })
}

fn outcome_text(o: &WriteOutcome) -> (&'static str, &str, Option<i16>) {
    match o {
        WriteOutcome::Done => ("done", "", None),
        WriteOutcome::Refused(Refusal::Duplicate) => ("refused_duplicate", "", None),
        WriteOutcome::Refused(Refusal::NoSpace) => ("refused_no_space", "", None),
        WriteOutcome::Refused(Refusal::Other(reason)) => ("refused", reason.as_str(), None),
        WriteOutcome::Unconfirmed => ("unconfirmed", "", None),
        WriteOutcome::DeferredArmed { partition } => {
            ("deferred_armed", "", Some(i16::from(*partition)))
        }
    }
}

fn outcome_from(text: &str, reason: String, partition: Option<i16>) -> Option<WriteOutcome> {
    Some(match text {
        "done" => WriteOutcome::Done,
        "refused_duplicate" => WriteOutcome::Refused(Refusal::Duplicate),
        "refused_no_space" => WriteOutcome::Refused(Refusal::NoSpace),
        "refused" => WriteOutcome::Refused(Refusal::Other(reason)),
        "unconfirmed" => WriteOutcome::Unconfirmed,
        "deferred_armed" => WriteOutcome::DeferredArmed {
            partition: u8::try_from(partition?).ok()?,
        },
        _ => return None,
    })
}

fn finding_from(text: &str) -> Option<SlotFinding> {
    Some(match text {
        "managed" => SlotFinding::Managed,
        "drifted" => SlotFinding::Drifted,
        "missing" => SlotFinding::Missing,
        "unverifiable" => SlotFinding::Unverifiable,
        "foreign" => SlotFinding::Foreign,
        "conflict" => SlotFinding::Conflict,
        _ => return None,
    })
}

fn slot_of(n: i32) -> Result<u16, StoreError> {
    u16::try_from(n).map_err(|_| StoreError::Internal("slot out of range".into()))
}

const SITE_SQL: &str = "SELECT time_zone, lockdown, agent_last_seen,
        agent_connected AND coalesce(extract(epoch FROM now() - agent_last_seen)::float8 < $2, false),
        now(), status_thresholds, status_seq, status_baseline
     FROM site WHERE id = $1";

/// `LEFT JOIN LATERAL ... ch`: the latest (`max_rev`, `max_time`) and the earliest
/// (`min_rev`) logged change of the slot of `$a` (a table alias with `site_id`,
/// `device_id` and `slot`), each one probe of `site_change_by_slot` (migration 0027).
macro_rules! slot_changes_sql {
    ($a:literal) => {
        concat!(
            "     LEFT JOIN LATERAL (SELECT hi.revision AS max_rev, lo.revision AS min_rev,
                               hi.change_time AS max_time
                        FROM (SELECT revision, change_time FROM site_change ch
                               WHERE ch.site_id = ",
            $a,
            ".site_id AND ch.device_id = ",
            $a,
            ".device_id
                                 AND ch.slot = ",
            $a,
            ".slot ORDER BY revision DESC LIMIT 1) hi,
                             (SELECT revision FROM site_change ch
                               WHERE ch.site_id = ",
            $a,
            ".site_id AND ch.device_id = ",
            $a,
            ".device_id
                                 AND ch.slot = ",
            $a,
            ".slot ORDER BY revision LIMIT 1) lo) ch ON true"
        )
    };
}

/// Every assignment of site `$1` (of user `$2` when not NULL) with what its status is
/// decided from: the slot's last change, the agent's last write report, what was read
/// back, and a hand-programmed copy of its code. A slot whose changes were all pruned
/// from the log last changed at the site's `change_floor` at the latest: read as then.
const FACTS_SQL: &str = concat!(
    "SELECT sa.device_id, sa.slot, sa.credential_id, c.user_id, d.model,
        d.applied_revision, d.reachable, d.last_contact_time, c.valid_from, c.valid_until,
        sa.write_generation, coalesce(ch.max_rev, (SELECT change_floor FROM site WHERE id = $1)), coalesce(ch.max_time, c.update_time),
        coalesce(ch.min_rev, 0),
        w.revision, w.outcome, w.device_reason, w.partition, w.report_time,
        o.state, o.observe_time, lc.slot, lc.observe_time, d.reported_constraints,
        sl.credential_id, sl.status, sl.withheld, sl.withheld_at, sl.issues, false,
        sa.pin_hash, sl.held_known, sl.held_pin_hash, sl.held_generation, sl.held_schedules
     FROM slot_assignment sa
     JOIN credential c ON c.site_id = sa.site_id AND c.id = sa.credential_id
     JOIN device d ON d.site_id = sa.site_id AND d.id = sa.device_id
",
    slot_changes_sql!("sa"),
    "
     LEFT JOIN slot_write_report w ON w.site_id = sa.site_id AND w.device_id = sa.device_id
                                  AND w.slot = sa.slot
     LEFT JOIN observed_slot o ON o.site_id = sa.site_id AND o.device_id = sa.device_id
                              AND o.slot = sa.slot
     LEFT JOIN slot_state_last sl ON sl.site_id = sa.site_id AND sl.device_id = sa.device_id
                                 AND sl.slot = sa.slot
     LEFT JOIN LATERAL (SELECT o2.slot, o2.observe_time FROM observed_slot o2
                        WHERE o2.site_id = sa.site_id AND o2.device_id = sa.device_id
                          AND o2.state = 'conflict' AND o2.pin_hash = sa.pin_hash
                        ORDER BY o2.slot LIMIT 1) lc ON true
     WHERE sa.site_id = $1 AND ($2::uuid IS NULL OR c.user_id = $2)
     UNION ALL
     SELECT sl.device_id, sl.slot, sl.credential_id, sl.user_id, d.model,
        d.applied_revision, d.reachable, d.last_contact_time, NULL::timestamptz, NULL::timestamptz,
        0::bigint, coalesce(ch.max_rev, (SELECT change_floor FROM site WHERE id = $1)), coalesce(ch.max_time, now()), coalesce(ch.min_rev, 0),
        w.revision, w.outcome, w.device_reason, w.partition, w.report_time,
        o.state, o.observe_time, NULL::integer, NULL::timestamptz, d.reported_constraints,
        sl.credential_id, sl.status, sl.withheld, sl.withheld_at, sl.issues, true,
        NULL::bytea, sl.held_known, sl.held_pin_hash, sl.held_generation, sl.held_schedules
     FROM slot_state_last sl
     JOIN device d ON d.site_id = sl.site_id AND d.id = sl.device_id
",
    slot_changes_sql!("sl"),
    "
     LEFT JOIN slot_write_report w ON w.site_id = sl.site_id AND w.device_id = sl.device_id
                                  AND w.slot = sl.slot
     LEFT JOIN observed_slot o ON o.site_id = sl.site_id AND o.device_id = sl.device_id
                              AND o.slot = sl.slot
     WHERE sl.site_id = $1 AND ($2::uuid IS NULL OR sl.user_id = $2)
       AND NOT EXISTS (SELECT 1 FROM slot_assignment sa WHERE sa.site_id = sl.site_id
                         AND sa.device_id = sl.device_id AND sa.slot = sl.slot)
     ORDER BY 3, 1"
);

const FINDINGS_SQL: &str = "SELECT device_id, slot, state FROM observed_slot
     WHERE site_id = $1 AND state IN ('drifted', 'missing', 'conflict', 'unverifiable')
     ORDER BY device_id, slot";

impl Store {
    /// Stores the agent's report on its last write to `slot` of `device` (the latest
    /// replaces the one before). False when the device is not at the site.
    pub async fn write_report_record(
        &self,
        site: Uuid,
        device: Uuid,
        slot: u16,
        clear: bool,
        report: &WriteReport,
    ) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        let (outcome, reason, partition) = outcome_text(&report.outcome);
        let n = conn
            .execute(
                "WITH due AS (UPDATE site SET status_seq = status_seq + 1 WHERE id = $1)
                 INSERT INTO slot_write_report
                    (site_id, device_id, slot, revision, clear, outcome, device_reason, partition, report_time)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
                 WHERE EXISTS (SELECT 1 FROM device WHERE site_id = $1 AND id = $2)
                 ON CONFLICT (site_id, device_id, slot) DO UPDATE SET revision = EXCLUDED.revision,
                    clear = EXCLUDED.clear, outcome = EXCLUDED.outcome,
                    device_reason = EXCLUDED.device_reason, partition = EXCLUDED.partition,
                    report_time = EXCLUDED.report_time",
                &[
                    &site,
                    &device,
                    &i32::from(slot),
                    &report.revision,
                    &clear,
                    &outcome,
                    &reason,
                    &partition,
                    &report.at,
                ],
            )
            .await?;
        Ok(n > 0)
    }

    /// Records what `device` reported about itself (None: nothing; the profile alone
    /// holds). A report that makes no sense is refused whole and the stored one kept.
    /// False when the device is not at the site.
    pub async fn device_reported_record(
        &self,
        site: Uuid,
        device: Uuid,
        model: &'static DeviceModel,
        reported: Option<&ReportedConstraints>,
    ) -> Result<bool, StoreError> {
        if let Some(r) = reported {
            DeviceConstraints::from_model(model)
                .with_reported(r)
                .map_err(|e| StoreError::InvalidArgument(format!("reported constraints: {e}")))?;
        }
        let json = reported
            .filter(|r| **r != ReportedConstraints::default())
            .map(reported_to_json);
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "WITH due AS (UPDATE site SET status_seq = status_seq + 1 WHERE id = $1)
                 UPDATE device SET reported_constraints = $4
                 WHERE site_id = $1 AND id = $2 AND model = $3
                   AND reported_constraints IS DISTINCT FROM $4",
                &[&site, &device, &model.id, &json],
            )
            .await?;
        Ok(n > 0)
    }

    /// Occupied slots of each device of `site`: keyplane's codes and codes programmed
    /// at the device (for the published capacity).
    pub async fn device_occupancy(
        &self,
        site: Uuid,
    ) -> Result<BTreeMap<Uuid, std::collections::BTreeSet<u16>>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT device_id, slot FROM slot_assignment WHERE site_id = $1
                 UNION SELECT device_id, slot FROM observed_slot
                 WHERE site_id = $1 AND state IN ('foreign', 'conflict')",
                &[&site],
            )
            .await?;
        let mut out: BTreeMap<Uuid, std::collections::BTreeSet<u16>> = BTreeMap::new();
        for r in &rows {
            out.entry(r.get(0)).or_default().insert(slot_of(r.get(1))?);
        }
        Ok(out)
    }

    /// Records whether the agent reaches `device`, and when it last did.
    pub async fn reachability_record(
        &self,
        site: Uuid,
        device: Uuid,
        reachable: bool,
        last_contact: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "WITH due AS (UPDATE site SET status_seq = status_seq + 1 WHERE id = $1)
                 UPDATE device SET reachable = $3,
                    last_contact_time = GREATEST(last_contact_time, $4)
                 WHERE site_id = $1 AND id = $2",
                &[&site, &device, &reachable, &last_contact],
            )
            .await?;
        Ok(n > 0)
    }

    /// The facts about the slot assignments of `site` (of `user` only, when given),
    /// read in one repeatable-read snapshot with the reads pipelined; with every
    /// device's findings when the whole site is read.
    pub async fn slot_status_facts(
        &self,
        dealer: Uuid,
        site: Uuid,
        user: Option<Uuid>,
    ) -> Result<SlotStatusFacts, StoreError> {
        self.facts_read(Some(dealer), site, user).await
    }

    /// The facts of every assignment of `site`, for keyplaned's own re-evaluation
    /// (no dealer scoping: the sweep only).
    pub async fn slot_status_facts_for_sweep(
        &self,
        site: Uuid,
    ) -> Result<SlotStatusFacts, StoreError> {
        self.facts_read(None, site, None).await
    }

    async fn facts_read(
        &self,
        dealer: Option<Uuid>,
        site: Uuid,
        user: Option<Uuid>,
    ) -> Result<SlotStatusFacts, StoreError> {
        let conn = self.conn().await?;
        let tx = crate::Transaction::begin(&conn, crate::READ_SNAPSHOT);
        let users: Option<Vec<Uuid>> = user.map(|u| vec![u]);
        let whole_site = user.is_none();
        let site_params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
            &[&site, &AGENT_LIVENESS_SECS];
        let facts_params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[&site, &user];
        let (found, site_row, rows, rules, findings) = tokio::join!(
            async {
                match dealer {
                    Some(dealer) => site_get_in_txn(&tx, dealer, site).await.map(|_| ()),
                    None => Ok(()),
                }
            },
            tx.query_one(SITE_SQL, site_params),
            tx.query(FACTS_SQL, facts_params),
            crate::rules::access_rules_for_in_txn(&tx, site, users.as_deref()),
            async {
                if whole_site {
                    tx.query(FINDINGS_SQL, &[&site]).await
                } else {
                    Ok(Vec::new())
                }
            },
        );
        found?;
        let (site_row, rows, rules, findings) = (site_row?, rows?, rules?, findings?);
        tx.commit().await?;

        let time_zone: String = site_row.get(0);
        let time_zone: chrono_tz::Tz = time_zone
            .parse()
            .map_err(|_| StoreError::Internal(format!("stored time zone {time_zone}")))?;
        let lockdown: bool = site_row.get(1);
        let agent = AgentLink {
            connected: site_row.get(3),
            last_seen: site_row.get(2),
        };
        let now: DateTime<Utc> = site_row.get(4);
        let thresholds = thresholds_from_json(site_row.get(5));
        let seq: i64 = site_row.get(6);
        let baseline: bool = site_row.get(7);

        let mut assignments = Vec::with_capacity(rows.len());
        for r in &rows {
            let device: Uuid = r.get(0);
            let slot = slot_of(r.get(1))?;
            let credential: Uuid = r.get(2);
            let user: Uuid = r.get(3);
            let model_id: &str = r.get(4);
            let model = DeviceModel::find(model_id)
                .ok_or_else(|| StoreError::Internal(format!("unknown model {model_id}")))?;
            let applied_revision: i64 = r.get(5);
            let reachable: bool = r.get(6);
            let last_contact: Option<DateTime<Utc>> = r.get(7);
            let removed: bool = r.get(29);
            let schedules = rules.schedules_for(user, device, Some(model.kind));
            // An empty list: the user's plan does not name the device.
            let access_point = schedules.as_ref().is_none_or(|s| !s.is_empty());
            let write_generation: i64 = r.get(10);
            let desired = SlotValue {
                code_version: 1,
                settings_version: 0,
                schedules: if access_point { schedules } else { None },
            };
            let changed_revision: i64 = r.get(11);
            let changed_at: DateTime<Utc> = r.get(12);
            let first_revision: i64 = r.get(13);
            let same_credential = r.get::<_, Option<Uuid>>(24) == Some(credential);
            let held = if same_credential && r.get::<_, Option<bool>>(31) == Some(true) {
                match r.get::<_, Option<Vec<u8>>>(32) {
                    None => Held::Nothing,
                    Some(pin_hash) => Held::Code {
                        pin_hash,
                        generation: r.get::<_, Option<i64>>(33).unwrap_or(0),
                        schedules: match r.get::<_, Option<serde_json::Value>>(34) {
                            Some(v) => Some(serde_json::from_value(v).map_err(|e| {
                                StoreError::Internal(format!("stored held schedules: {e}"))
                            })?),
                            None => None,
                        },
                    },
                }
            } else {
                Held::Unknown
            };
            let pin_hash: Option<Vec<u8>> = r.get(30);
            let pin_hash = pin_hash.unwrap_or_default();
            let acked = applied_revision >= changed_revision;
            let held_now = match (removed, acked) {
                (false, true) if access_point => Held::Code {
                    pin_hash: pin_hash.clone(),
                    generation: write_generation,
                    schedules: desired.schedules.clone(),
                },
                (false, true) => Held::Nothing,
                _ => held.clone(),
            };
            let applied_value = match &held {
                Held::Unknown => {
                    // Not recorded: a device that applied any earlier change of the
                    // slot is taken to hold an older code there.
                    (first_revision > 0 && applied_revision >= first_revision).then(|| SlotValue {
                        code_version: 0,
                        ..desired.clone()
                    })
                }
                known => known.value(&pin_hash, write_generation, &desired),
            };
            let last_write = match r.get::<_, Option<i64>>(14) {
                // The agent acks a device only once it holds its whole desired table:
                // an ack at or after the report's revision says the write went through
                // (a success after a reconnect is not reported again).
                Some(revision) if applied_revision >= revision => None,
                None => None,
                Some(revision) => {
                    let outcome: String = r.get(15);
                    outcome_from(&outcome, r.get(16), r.get(17)).map(|outcome| WriteReport {
                        revision,
                        at: r.get(18),
                        outcome,
                    })
                }
            };
            let read_back = r
                .get::<_, Option<&str>>(19)
                .and_then(finding_from)
                .map(|finding| ReadBack {
                    finding,
                    since: r.get(20),
                });
            let local_conflict = match r.get::<_, Option<i32>>(21) {
                Some(n) => Some((slot_of(n)?, r.get::<_, DateTime<Utc>>(22))),
                None => None,
            };
            let last = match (r.get::<_, Option<Uuid>>(24), r.get::<_, Option<&str>>(25)) {
                (Some(c), Some(status)) if c == credential => {
                    status_from(status).map(|status| SlotSummary {
                        status,
                        withheld: r
                            .get::<_, Option<&str>>(26)
                            .and_then(|w| withheld_from(w, r.get(27))),
                        issues: r
                            .get::<_, Vec<String>>(28)
                            .iter()
                            .filter_map(|i| IssueCode::ALL.into_iter().find(|c| c.as_str() == i))
                            .collect(),
                    })
                }
                _ => None,
            };
            // A removal: keyplane wants nothing there, and the device had the code.
            let (desired, applied_value, presence_point) = if removed {
                (None, Some(desired), true)
            } else {
                (Some(desired), applied_value, access_point)
            };
            assignments.push(AssignmentFacts {
                removed,
                last,
                held,
                held_now,
                credential,
                user,
                device,
                model,
                facts: SlotFacts {
                    kind: model.kind,
                    slot,
                    keeps_schedules: match reported_from_json(r.get(23)) {
                        Some(rep) => DeviceConstraints::from_model(model)
                            .with_reported(&rep)
                            .map_or(model.on_device_schedules, |c| c.keeps_schedules),
                        None => model.on_device_schedules,
                    },
                    time_zone,
                    desired,
                    presence: Presence {
                        access_point: presence_point,
                        valid_from: r.get(8),
                        valid_until: r.get(9),
                        lockdown,
                    },
                    applied_value,
                    changed_revision,
                    changed_at,
                    applied_revision,
                    last_write,
                    read_back,
                    local_conflict,
                    agent,
                    // A reachable device is in contact now; otherwise since its last contact.
                    device_last_seen: if reachable { Some(now) } else { last_contact },
                    thresholds: thresholds.for_kind(model.kind),
                    now,
                },
            });
        }

        let mut by_device: BTreeMap<Uuid, DeviceFindings> = BTreeMap::new();
        for r in &findings {
            let device: Uuid = r.get(0);
            let slot = slot_of(r.get(1))?;
            let entry = by_device.entry(device).or_insert_with(|| DeviceFindings {
                device,
                ..Default::default()
            });
            match r.get::<_, &str>(2) {
                "drifted" | "missing" => entry.drifted.push(slot),
                "conflict" => entry.conflicting.push(slot),
                _ => entry.unverifiable.push(slot),
            }
        }
        Ok(SlotStatusFacts {
            assignments,
            findings: by_device.into_values().collect(),
            seq,
            baseline,
        })
    }
}

impl Store {
    /// Sets a site's per-kind threshold overrides (audited).
    pub async fn site_thresholds_set(
        &self,
        actor: &crate::Actor,
        site: Uuid,
        thresholds: &SiteThresholds,
    ) -> Result<crate::Site, StoreError> {
        let json = thresholds_to_json(thresholds);
        crate::in_txn!(self, "site_thresholds_set", |tx| {
            site_get_in_txn(&tx, actor.dealer, site).await?;
            let audit = crate::site::AuditParams::new(
                actor,
                Some(site),
                "site.status_thresholds",
                &format!("sites/{site}"),
                json.clone().unwrap_or(serde_json::Value::Null),
            );
            let after = Some(serde_json::json!({ "status_thresholds": json }));
            crate::batch_in_txn(
                &tx,
                &[
                    audit.step_in(
                        crate::site::SITE_FIELD_AUDIT_SQL,
                        crate::params![&"status_thresholds", &after],
                    ),
                    (
                        "UPDATE site SET status_thresholds = $2, status_seq = status_seq + 1,
                            version = version + 1, update_time = now() WHERE id = $1",
                        crate::params![&site, &json],
                    ),
                ],
            )
            .await?;
            site_get_in_txn(&tx, actor.dealer, site).await
        })
    }

    /// Marks as evaluated, in one statement, up to `limit` due sites that hold
    /// nothing a status is kept for (no slot assignment and no summary kept for a
    /// removal): evaluating one raises nothing and records nothing but that, and a
    /// fleet of agents connecting at once makes thousands of them due, ahead of the
    /// sites with codes in a sweep of [`Store::status_due_sites`]. Each site keeps
    /// the sequence it was read at, so a change made meanwhile leaves it due, and a
    /// site another replica evaluated meanwhile (which may have found a code made
    /// since) is left as that evaluation recorded it.
    pub async fn status_settle_quiet_sites(&self, limit: i64) -> Result<u64, StoreError> {
        let conn = self.conn().await?;
        // Once per sweep tick: not worth a cached statement.
        Ok(conn
            .execute(
                "UPDATE site s SET status_evaluated_seq = GREATEST(s.status_evaluated_seq, q.seq),
                        status_pending = false, status_evaluated_at = now(),
                        status_baseline = false
                   FROM (SELECT d.id, d.status_seq AS seq, d.status_evaluated_seq AS evaluated
                           FROM site d
                          WHERE (d.status_seq > d.status_evaluated_seq OR d.status_pending)
                            AND NOT EXISTS (SELECT 1 FROM slot_assignment a WHERE a.site_id = d.id)
                            AND NOT EXISTS (SELECT 1 FROM slot_state_last l WHERE l.site_id = d.id)
                          LIMIT $1) q
                  WHERE s.id = q.id AND s.status_evaluated_seq = q.evaluated",
                &[&limit],
            )
            .await?)
    }

    /// Sites whose assignments are due for evaluation: those where something changed
    /// since the last one first, then those where something changes by the clock;
    /// least recently evaluated first within each.
    pub async fn status_due_sites(&self, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id FROM site WHERE status_seq > status_evaluated_seq OR status_pending
                 ORDER BY status_seq > status_evaluated_seq DESC, status_evaluated_at NULLS FIRST
                 LIMIT $1",
                &[&limit],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Stores an evaluation of `site` made from facts read at sequence `seq`: the
    /// changed summaries, the events of their transitions, and whether the site stays
    /// pending; one batch. Changes after `seq` keep the site due. `baseline`: the
    /// evaluation was the site's baseline (see [`SlotStatusFacts::baseline`]), done.
    pub async fn status_record(
        &self,
        site: Uuid,
        seq: i64,
        pending: bool,
        baseline: bool,
        changed: &[EvaluatedSlot],
        events: &[StatusEvent],
    ) -> Result<(), StoreError> {
        let (done, changed): (Vec<&EvaluatedSlot>, Vec<&EvaluatedSlot>) =
            changed.iter().partition(|c| c.done);
        let done_devices: Vec<Uuid> = done.iter().map(|c| c.device).collect();
        let done_slots: Vec<i32> = done.iter().map(|c| i32::from(c.slot)).collect();
        let done_credentials: Vec<Uuid> = done.iter().map(|c| c.credential).collect();
        let users: Vec<Uuid> = changed.iter().map(|c| c.user).collect();
        let devices: Vec<Uuid> = changed.iter().map(|c| c.device).collect();
        let slots: Vec<i32> = changed.iter().map(|c| i32::from(c.slot)).collect();
        let credentials: Vec<Uuid> = changed.iter().map(|c| c.credential).collect();
        let statuses: Vec<&str> = changed
            .iter()
            .map(|c| status_text(c.summary.status))
            .collect();
        let withheld: Vec<Option<&str>> = changed
            .iter()
            .map(|c| c.summary.withheld.as_ref().map(|w| withheld_parts(w).0))
            .collect();
        let withheld_at: Vec<Option<DateTime<Utc>>> = changed
            .iter()
            .map(|c| {
                c.summary
                    .withheld
                    .as_ref()
                    .and_then(|w| withheld_parts(w).1)
            })
            .collect();
        // Issue codes joined, since arrays of arrays cannot be unnested row by row.
        let issues: Vec<String> = changed
            .iter()
            .map(|c| {
                c.summary
                    .issues
                    .iter()
                    .map(|i| i.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let held_known: Vec<bool> = changed.iter().map(|c| c.held != Held::Unknown).collect();
        let held_hashes: Vec<Option<&[u8]>> = changed
            .iter()
            .map(|c| match &c.held {
                Held::Code { pin_hash, .. } => Some(pin_hash.as_slice()),
                _ => None,
            })
            .collect();
        let held_generations: Vec<Option<i64>> = changed
            .iter()
            .map(|c| match &c.held {
                Held::Code { generation, .. } => Some(*generation),
                _ => None,
            })
            .collect();
        let mut held_schedules: Vec<Option<serde_json::Value>> = Vec::with_capacity(changed.len());
        for c in &changed {
            held_schedules.push(match &c.held {
                Held::Code {
                    schedules: Some(s), ..
                } => Some(
                    serde_json::to_value(s)
                        .map_err(|e| StoreError::Internal(format!("held schedules: {e}")))?,
                ),
                _ => None,
            });
        }
        let e_devices: Vec<Uuid> = events.iter().map(|e| e.device).collect();
        let e_slots: Vec<i32> = events.iter().map(|e| i32::from(e.slot)).collect();
        let e_credentials: Vec<Uuid> = events.iter().map(|e| e.credential).collect();
        let e_users: Vec<Uuid> = events.iter().map(|e| e.user).collect();
        let e_kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        let e_issues: Vec<Option<&str>> = events
            .iter()
            .map(|e| e.issue.map(IssueCode::as_str))
            .collect();
        let e_at: Vec<DateTime<Utc>> = events.iter().map(|e| e.at).collect();
        crate::in_txn!(self, "status_record", |tx| {
            crate::batch_in_txn(
                &tx,
                &[
                    // First: the site row lock, which the event inserts below take
                    // too (their place in the site's event log), before any other row.
                    (
                        "UPDATE site SET status_evaluated_seq = GREATEST(status_evaluated_seq, $2),
                            status_pending = $3, status_evaluated_at = now(),
                            status_baseline = status_baseline AND NOT $4
                         WHERE id = $1",
                        crate::params![&site, &seq, &pending, &baseline],
                    ),
                    (
                        "INSERT INTO slot_state_last
                            (site_id, device_id, slot, credential_id, user_id, status, withheld,
                             withheld_at, issues, held_known, held_pin_hash, held_generation,
                             held_schedules)
                         SELECT $1, u.d, u.s, u.c, u.us, u.st, u.w, u.wa,
                                CASE WHEN u.i = '' THEN '{}'::text[] ELSE string_to_array(u.i, ',') END,
                                u.hk, u.hh, u.hg, u.hs
                         FROM unnest($2::uuid[], $3::int[], $4::uuid[], $5::text[], $6::text[],
                                     $7::timestamptz[], $8::text[], $9::uuid[], $10::bool[],
                                     $11::bytea[], $12::bigint[], $13::jsonb[])
                              AS u(d, s, c, st, w, wa, i, us, hk, hh, hg, hs)
                         WHERE EXISTS (SELECT 1 FROM device WHERE site_id = $1 AND id = u.d)
                         ON CONFLICT (site_id, device_id, slot) DO UPDATE SET
                            credential_id = EXCLUDED.credential_id, user_id = EXCLUDED.user_id,
                            status = EXCLUDED.status,
                            withheld = EXCLUDED.withheld, withheld_at = EXCLUDED.withheld_at,
                            issues = EXCLUDED.issues, held_known = EXCLUDED.held_known,
                            held_pin_hash = EXCLUDED.held_pin_hash,
                            held_generation = EXCLUDED.held_generation,
                            held_schedules = EXCLUDED.held_schedules",
                        crate::params![
                            &site,
                            &devices,
                            &slots,
                            &credentials,
                            &statuses,
                            &withheld,
                            &withheld_at,
                            &issues,
                            &users,
                            &held_known,
                            &held_hashes,
                            &held_generations,
                            &held_schedules
                        ],
                    ),
                    (
                        "DELETE FROM slot_state_last sl USING unnest($2::uuid[], $3::int[], $4::uuid[]) AS u(d, s, c)
                         WHERE sl.site_id = $1 AND sl.device_id = u.d AND sl.slot = u.s
                           AND sl.credential_id = u.c",
                        crate::params![&site, &done_devices, &done_slots, &done_credentials],
                    ),
                    (
                        "INSERT INTO device_event (site_id, device_id, source_seq, kind, user_number,
                            user_id, occur_time, issue, credential_id)
                         SELECT $1, u.d, 0, u.k, u.s, p.id, u.at, u.i, CASE WHEN p.id IS NULL THEN NULL ELSE u.c END
                         FROM unnest($2::uuid[], $3::int[], $4::uuid[], $5::uuid[], $6::text[],
                                     $7::text[], $8::timestamptz[]) AS u(d, s, c, us, k, i, at)
                         -- A person deleted (or erased) since the facts were read is
                         -- not named: their erasure committed before this lock.
                         LEFT JOIN site_user p ON p.site_id = $1 AND p.id = u.us
                         WHERE EXISTS (SELECT 1 FROM device WHERE site_id = $1 AND id = u.d)",
                        crate::params![
                            &site,
                            &e_devices,
                            &e_slots,
                            &e_credentials,
                            &e_users,
                            &e_kinds,
                            &e_issues,
                            &e_at
                        ],
                    ),
                ],
            )
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_device_holds_says_what_a_change_changes() {
        use keyplane_core::status::PendingChange as P;
        let office = vec![Schedule {
            windows: vec![keyplane_core::schedule::Window {
                days: 0b001_1111,
                start: keyplane_core::schedule::parse_time("08:00").expect("time"),
                end: keyplane_core::schedule::parse_time("18:00").expect("time"),
            }],
            ..Schedule::default()
        }];
        let tagged = |key: u8, code: u8| {
            let mut h = vec![key; 4];
            h.extend(std::iter::repeat_n(code, TAGGED_HASH_LEN - 4));
            h
        };
        let held = |hash: Vec<u8>, generation, schedules: Option<Vec<Schedule>>| Held::Code {
            pin_hash: hash,
            generation,
            schedules,
        };
        let want = |schedules: Option<Vec<Schedule>>| SlotValue {
            code_version: 1,
            settings_version: 0,
            schedules,
        };
        /// What the device holds, the code now (hash, generation), the wanted
        /// schedules, the changes on their way.
        type Case = (Held, (Vec<u8>, i64), Option<Vec<Schedule>>, Vec<P>);
        let cases: Vec<Case> = vec![
            // Only the schedules: from what it has to what it gets.
            (
                held(tagged(1, 7), 0, None),
                (tagged(1, 7), 0),
                Some(office.clone()),
                vec![P::UpdatingSchedule {
                    from: None,
                    to: Some(office.clone()),
                }],
            ),
            // Only the PIN.
            (
                held(tagged(1, 7), 0, None),
                (tagged(1, 8), 0),
                None,
                vec![P::UpdatingCode],
            ),
            // Written again (ResolveDrift).
            (
                held(tagged(1, 7), 0, None),
                (tagged(1, 7), 1),
                None,
                vec![P::UpdatingCode],
            ),
            // Both.
            (
                held(tagged(1, 7), 0, Some(office.clone())),
                (tagged(1, 8), 0),
                None,
                vec![
                    P::UpdatingCode,
                    P::UpdatingSchedule {
                        from: Some(office.clone()),
                        to: None,
                    },
                ],
            ),
            // A key rotation re-hashed the code: no code change for that.
            (
                held(tagged(1, 7), 0, None),
                (tagged(2, 9), 0),
                Some(office.clone()),
                vec![P::UpdatingSchedule {
                    from: None,
                    to: Some(office.clone()),
                }],
            ),
            // Neither: the slot changed all the same (panel levels, reporting).
            (
                held(tagged(1, 7), 0, None),
                (tagged(1, 7), 0),
                None,
                vec![P::UpdatingSettings],
            ),
            // The device holds nothing of it: created.
            (Held::Nothing, (tagged(1, 7), 0), None, vec![P::Creating]),
        ];
        for (i, (held, (hash, generation), schedules, expected)) in cases.into_iter().enumerate() {
            let desired = want(schedules);
            let applied = held.value(&hash, generation, &desired);
            let facts = SlotFacts {
                kind: keyplane_core::DeviceKind::Lock,
                slot: 2,
                keeps_schedules: true,
                time_zone: chrono_tz::Europe::Paris,
                desired: Some(desired),
                presence: Presence::default(),
                applied_value: applied,
                changed_revision: 5,
                changed_at: Utc::now(),
                applied_revision: 4,
                last_write: None,
                read_back: None,
                local_conflict: None,
                agent: AgentLink {
                    connected: true,
                    last_seen: Some(Utc::now()),
                },
                device_last_seen: Some(Utc::now()),
                thresholds: keyplane_core::status::Thresholds::default_for(
                    keyplane_core::DeviceKind::Lock,
                ),
                now: Utc::now(),
            };
            let state = keyplane_core::status::slot_state(&facts);
            assert_eq!(state.status, SlotStatus::Setting, "case {i}");
            assert_eq!(state.pending, expected, "case {i}");
        }
        assert!(!format!("{:?}", held(tagged(1, 7), 3, None)).contains('7'));
    }

    #[test]
    fn stored_words_read_back() {
        for s in SlotStatus::ALL {
            assert_eq!(status_from(status_text(s)), Some(s));
        }
        let at = Utc::now();
        for w in [
            WithheldReason::NotAnAccessPoint,
            WithheldReason::AfterValidity,
            WithheldReason::Lockdown,
            WithheldReason::OutsideSchedule { next_set_at: None },
            WithheldReason::OutsideSchedule {
                next_set_at: Some(at),
            },
            WithheldReason::BeforeValidity { starts_at: at },
        ] {
            let (code, when) = withheld_parts(&w);
            assert_eq!(withheld_from(code, when), Some(w));
        }
        for o in [
            WriteOutcome::Done,
            WriteOutcome::Refused(Refusal::Duplicate),
            WriteOutcome::Refused(Refusal::NoSpace),
            WriteOutcome::Refused(Refusal::Other("too long".into())),
            WriteOutcome::Unconfirmed,
            WriteOutcome::DeferredArmed { partition: 2 },
        ] {
            let (text, reason, partition) = outcome_text(&o);
            assert_eq!(outcome_from(text, reason.to_owned(), partition), Some(o));
        }
    }
}
