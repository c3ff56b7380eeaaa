//! What the API says about each credential on each device (a slot assignment): one
//! closed vocabulary of statuses, withheld reasons, pending changes and typed issues,
//! and the decision that turns what keyplaned knows about one slot into them.
//!
//! The decision is level-triggered: facts in, status out, no memory. An issue exists
//! exactly while its condition holds, so errors clear themselves when the condition
//! ends; the caller turns differences between two evaluations into events. The agent
//! enforces schedule windows and validity periods itself (also offline), so once a
//! device has applied a change the status follows the clock: SET inside a window,
//! WITHHELD outside it. The vocabulary is documented in `docs/STATUS.md`.

use crate::model::DeviceKind;
use crate::observed::SlotFinding;
use crate::schedule::{Schedule, any_next_open, any_open};
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use std::collections::BTreeMap;
use std::fmt;

/// Where a credential stands on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotStatus {
    /// The code should be on the device and the device has not confirmed it yet.
    Setting,
    /// The device holds the code as keyplane wants it.
    Set,
    /// The code must leave the device and the device has not confirmed it yet.
    Removing,
    /// The code is not on the device and keyplane is not putting it there.
    Unset,
    /// The code is kept off the device for a [`WithheldReason`].
    Withheld,
    /// The device answered a write without saying whether it took it.
    Unknown,
}

impl SlotStatus {
    /// Every status, in API order.
    pub const ALL: [SlotStatus; 6] = [
        SlotStatus::Setting,
        SlotStatus::Set,
        SlotStatus::Removing,
        SlotStatus::Unset,
        SlotStatus::Withheld,
        SlotStatus::Unknown,
    ];

    /// Stable upper-case name, as in the API (`SETTING`).
    pub fn as_str(self) -> &'static str {
        match self {
            SlotStatus::Setting => "SETTING",
            SlotStatus::Set => "SET",
            SlotStatus::Removing => "REMOVING",
            SlotStatus::Unset => "UNSET",
            SlotStatus::Withheld => "WITHHELD",
            SlotStatus::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for SlotStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a code is kept off a device, and until when where that is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WithheldReason {
    /// The user's plan does not name the device as one of its access points.
    NotAnAccessPoint,
    /// Outside every schedule window; set again at `next_set_at` (None: never again).
    OutsideSchedule {
        /// When the next window opens within the validity period.
        next_set_at: Option<DateTime<Utc>>,
    },
    /// The credential's validity period has not started.
    BeforeValidity {
        /// Start of the validity period.
        starts_at: DateTime<Utc>,
    },
    /// The credential's validity period is over.
    AfterValidity,
    /// The site's doors are locked down.
    Lockdown,
}

impl WithheldReason {
    /// Stable snake_case name (`not_an_access_point`).
    pub fn code(&self) -> &'static str {
        match self {
            WithheldReason::NotAnAccessPoint => "not_an_access_point",
            WithheldReason::OutsideSchedule { .. } => "outside_schedule",
            WithheldReason::BeforeValidity { .. } => "before_validity",
            WithheldReason::AfterValidity => "after_validity",
            WithheldReason::Lockdown => "lockdown",
        }
    }
}

/// A change on its way to the device. Never carries a PIN: only that the code changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingChange {
    /// The code is being written for the first time.
    Creating,
    /// The code will be written at `at` (a window opens, the validity starts).
    DeferredCreation {
        /// When the agent writes it.
        at: DateTime<Utc>,
    },
    /// The code itself changes (or is written again after a change at the keypad).
    UpdatingCode,
    /// The schedules the code follows change; None: always open.
    UpdatingSchedule {
        /// What the device has.
        from: Option<Vec<Schedule>>,
        /// What it gets.
        to: Option<Vec<Schedule>>,
    },
    /// Other settings of the code change (panel authority levels, open/close reporting).
    UpdatingSettings,
    /// The code is being taken off the device.
    Removing,
}

impl PendingChange {
    /// Stable snake_case name (`deferred_creation`).
    pub fn code(&self) -> &'static str {
        match self {
            PendingChange::Creating => "creating",
            PendingChange::DeferredCreation { .. } => "deferred_creation",
            PendingChange::UpdatingCode => "updating_code",
            PendingChange::UpdatingSchedule { .. } => "updating_schedule",
            PendingChange::UpdatingSettings => "updating_settings",
            PendingChange::Removing => "removing",
        }
    }
}

/// Whether an issue means the code is not what was asked (error) or may soon be (warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// The device does not hold what keyplane wants, and waiting will not fix it.
    Error,
    /// Something is late or unverifiable; it may resolve on its own.
    Warning,
}

impl Severity {
    /// Stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// The code of an issue: the closed vocabulary, without details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IssueCode {
    /// The device refused to store the code.
    FailedToSetOnDevice,
    /// The device refused to clear the code.
    FailedToRemoveFromDevice,
    /// The device refused the code because another slot holds the same code.
    DuplicateCodeOnDevice,
    /// The device refused the code because it has no free slot.
    NoSpaceOnDevice,
    /// Someone changed or cleared the slot at the device.
    CodeModifiedAtDevice,
    /// A code programmed at the device, in another slot, equals this code.
    LocalCodeConflict,
    /// The device masks codes or did not confirm the write: the slot cannot be verified.
    StateUnconfirmed,
    /// The agent cannot reach the device.
    DeviceOffline,
    /// The site's agent is not connected, so changes cannot reach the device.
    AgentDisconnected,
    /// The panel is armed; it is programmed once the partition is disarmed.
    PanelArmedProgrammingDeferred,
    /// A removal was sent, but the device still shows the slot occupied or did not confirm.
    RevocationUnconfirmed,
    /// Setting takes longer than the device kind's threshold.
    DelayInSetting,
    /// Removing takes longer than the device kind's threshold.
    DelayInRemoving,
}

impl IssueCode {
    /// Every issue code, in API order.
    pub const ALL: [IssueCode; 13] = [
        IssueCode::FailedToSetOnDevice,
        IssueCode::FailedToRemoveFromDevice,
        IssueCode::DuplicateCodeOnDevice,
        IssueCode::NoSpaceOnDevice,
        IssueCode::CodeModifiedAtDevice,
        IssueCode::LocalCodeConflict,
        IssueCode::StateUnconfirmed,
        IssueCode::DeviceOffline,
        IssueCode::AgentDisconnected,
        IssueCode::PanelArmedProgrammingDeferred,
        IssueCode::RevocationUnconfirmed,
        IssueCode::DelayInSetting,
        IssueCode::DelayInRemoving,
    ];

    /// Stable snake_case name, as in the API and events.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::FailedToSetOnDevice => "failed_to_set_on_device",
            IssueCode::FailedToRemoveFromDevice => "failed_to_remove_from_device",
            IssueCode::DuplicateCodeOnDevice => "duplicate_code_on_device",
            IssueCode::NoSpaceOnDevice => "no_space_on_device",
            IssueCode::CodeModifiedAtDevice => "code_modified_at_device",
            IssueCode::LocalCodeConflict => "local_code_conflict",
            IssueCode::StateUnconfirmed => "state_unconfirmed",
            IssueCode::DeviceOffline => "device_offline",
            IssueCode::AgentDisconnected => "agent_disconnected",
            IssueCode::PanelArmedProgrammingDeferred => "panel_armed_programming_deferred",
            IssueCode::RevocationUnconfirmed => "revocation_unconfirmed",
            IssueCode::DelayInSetting => "delay_in_setting",
            IssueCode::DelayInRemoving => "delay_in_removing",
        }
    }

    /// Error or warning; fixed per code.
    pub fn severity(self) -> Severity {
        match self {
            IssueCode::FailedToSetOnDevice
            | IssueCode::FailedToRemoveFromDevice
            | IssueCode::DuplicateCodeOnDevice
            | IssueCode::NoSpaceOnDevice
            | IssueCode::CodeModifiedAtDevice
            | IssueCode::LocalCodeConflict
            | IssueCode::RevocationUnconfirmed => Severity::Error,
            IssueCode::StateUnconfirmed
            | IssueCode::DeviceOffline
            | IssueCode::AgentDisconnected
            | IssueCode::PanelArmedProgrammingDeferred
            | IssueCode::DelayInSetting
            | IssueCode::DelayInRemoving => Severity::Warning,
        }
    }

    /// One line of documentation, as in the proto and docs/STATUS.md.
    pub fn doc(self) -> &'static str {
        match self {
            IssueCode::FailedToSetOnDevice => {
                "The device refused to store the code; `device_reason` says why."
            }
            IssueCode::FailedToRemoveFromDevice => {
                "The device refused to clear the code; it may still open the device."
            }
            IssueCode::DuplicateCodeOnDevice => {
                "The device refused the code because another of its slots holds the same code."
            }
            IssueCode::NoSpaceOnDevice => {
                "The device refused the code because it has no free slot."
            }
            IssueCode::CodeModifiedAtDevice => {
                "The slot was changed or cleared at the device; `slot` names it."
            }
            IssueCode::LocalCodeConflict => {
                "A code programmed at the device in another slot equals this code."
            }
            IssueCode::StateUnconfirmed => {
                "The device masks codes or did not confirm the write: the slot cannot be verified."
            }
            IssueCode::DeviceOffline => "The agent has not reached the device for too long.",
            IssueCode::AgentDisconnected => {
                "The site's agent is not connected: the change cannot reach the device."
            }
            IssueCode::PanelArmedProgrammingDeferred => {
                "The panel partition is armed; programming waits until it is disarmed."
            }
            IssueCode::RevocationUnconfirmed => {
                "A removal was sent but the device still shows the slot occupied or did not confirm."
            }
            IssueCode::DelayInSetting => {
                "Setting has taken longer than the device kind's threshold since the commit."
            }
            IssueCode::DelayInRemoving => {
                "Removing has taken longer than the device kind's threshold since the commit."
            }
        }
    }
}

impl fmt::Display for IssueCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An issue with its details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issue {
    /// See [`IssueCode::FailedToSetOnDevice`].
    FailedToSetOnDevice {
        /// The device's reason, as the agent reported it (never a PIN).
        reason: String,
    },
    /// See [`IssueCode::FailedToRemoveFromDevice`].
    FailedToRemoveFromDevice {
        /// The device's reason, as the agent reported it (never a PIN).
        reason: String,
    },
    /// See [`IssueCode::DuplicateCodeOnDevice`].
    DuplicateCodeOnDevice,
    /// See [`IssueCode::NoSpaceOnDevice`].
    NoSpaceOnDevice,
    /// See [`IssueCode::CodeModifiedAtDevice`].
    CodeModifiedAtDevice {
        /// The slot that changed.
        slot: u16,
        /// True when the slot was emptied rather than given another code.
        cleared: bool,
    },
    /// See [`IssueCode::LocalCodeConflict`].
    LocalCodeConflict {
        /// The slot holding the hand-programmed copy.
        local_slot: u16,
    },
    /// See [`IssueCode::StateUnconfirmed`].
    StateUnconfirmed,
    /// See [`IssueCode::DeviceOffline`].
    DeviceOffline,
    /// See [`IssueCode::AgentDisconnected`].
    AgentDisconnected,
    /// See [`IssueCode::PanelArmedProgrammingDeferred`].
    PanelArmedProgrammingDeferred {
        /// The armed partition.
        partition: u8,
    },
    /// See [`IssueCode::RevocationUnconfirmed`].
    RevocationUnconfirmed,
    /// See [`IssueCode::DelayInSetting`].
    DelayInSetting,
    /// See [`IssueCode::DelayInRemoving`].
    DelayInRemoving,
}

impl Issue {
    /// The code of this issue.
    pub fn code(&self) -> IssueCode {
        match self {
            Issue::FailedToSetOnDevice { .. } => IssueCode::FailedToSetOnDevice,
            Issue::FailedToRemoveFromDevice { .. } => IssueCode::FailedToRemoveFromDevice,
            Issue::DuplicateCodeOnDevice => IssueCode::DuplicateCodeOnDevice,
            Issue::NoSpaceOnDevice => IssueCode::NoSpaceOnDevice,
            Issue::CodeModifiedAtDevice { .. } => IssueCode::CodeModifiedAtDevice,
            Issue::LocalCodeConflict { .. } => IssueCode::LocalCodeConflict,
            Issue::StateUnconfirmed => IssueCode::StateUnconfirmed,
            Issue::DeviceOffline => IssueCode::DeviceOffline,
            Issue::AgentDisconnected => IssueCode::AgentDisconnected,
            Issue::PanelArmedProgrammingDeferred { .. } => IssueCode::PanelArmedProgrammingDeferred,
            Issue::RevocationUnconfirmed => IssueCode::RevocationUnconfirmed,
            Issue::DelayInSetting => IssueCode::DelayInSetting,
            Issue::DelayInRemoving => IssueCode::DelayInRemoving,
        }
    }
}

/// A typed, timestamped error or warning on one slot assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotIssue {
    /// What is wrong.
    pub issue: Issue,
    /// Since when the condition holds (as well as keyplaned can tell).
    pub since: DateTime<Utc>,
}

impl SlotIssue {
    /// The issue's code.
    pub fn code(&self) -> IssueCode {
        self.issue.code()
    }

    /// Error or warning.
    pub fn severity(&self) -> Severity {
        self.code().severity()
    }

    /// One human line for the API's `detail`; slots shown the device kind's way.
    pub fn detail(&self, kind: DeviceKind) -> String {
        match &self.issue {
            Issue::FailedToSetOnDevice { reason } => {
                format!("the {kind} refused the code: {reason}")
            }
            Issue::FailedToRemoveFromDevice { reason } => {
                format!("the {kind} refused to clear the code: {reason}")
            }
            Issue::CodeModifiedAtDevice { slot, cleared } => format!(
                "slot {} was {} at the {kind}",
                kind.display_slot(*slot),
                if *cleared {
                    "cleared"
                } else {
                    "given another code"
                }
            ),
            Issue::LocalCodeConflict { local_slot } => format!(
                "slot {} holds the same code, programmed at the {kind}",
                kind.display_slot(*local_slot)
            ),
            Issue::PanelArmedProgrammingDeferred { partition } => {
                format!("partition {partition} is armed; programming waits for disarm")
            }
            other => other.code().doc().trim_end_matches('.').to_owned(),
        }
    }
}

/// What the device refused, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another slot of the device holds the same code.
    Duplicate,
    /// The device has no free slot.
    NoSpace,
    /// Anything else, in the device's words (the agent keeps PINs out of it).
    Other(String),
}

impl Refusal {
    fn reason(&self) -> String {
        match self {
            Refusal::Duplicate => "the same code is in another slot".to_owned(),
            Refusal::NoSpace => "no free slot".to_owned(),
            Refusal::Other(reason) => reason.clone(),
        }
    }
}

/// How the device answered the agent's last write to the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written (or cleared) and acknowledged.
    Done,
    /// The device refused.
    Refused(Refusal),
    /// The device did not say whether it took the write.
    Unconfirmed,
    /// A panel partition is armed; the agent holds the write until it is disarmed.
    DeferredArmed {
        /// The armed partition.
        partition: u8,
    },
}

/// The agent's report on its last write to the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// Site revision the write carried out; older than the slot's change: stale, ignored.
    pub revision: i64,
    /// When the agent saw the outcome.
    pub at: DateTime<Utc>,
    /// The outcome.
    pub outcome: WriteOutcome,
}

/// What the agent last read back from the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBack {
    /// How the slot compared with what keyplane wrote.
    pub finding: SlotFinding,
    /// Since when the agent has seen it so.
    pub since: DateTime<Utc>,
}

/// The parts of a slot's desired value that status compares. Never the PIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotValue {
    /// Changes whenever the code is (re)written: the PIN or the write generation.
    pub code_version: i64,
    /// Changes with the code's other settings (panel levels, open/close reporting).
    pub settings_version: i64,
    /// Schedules the code follows; None: always.
    pub schedules: Option<Vec<Schedule>>,
}

/// What gates the code's presence on the device besides its schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// False when the user's configured plan does not name the device.
    pub access_point: bool,
    /// Start of the credential's validity period.
    pub valid_from: Option<DateTime<Utc>>,
    /// End of the credential's validity period (exclusive).
    pub valid_until: Option<DateTime<Utc>>,
    /// The site's doors are locked down (doors only).
    pub lockdown: bool,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            access_point: true,
            valid_from: None,
            valid_until: None,
            lockdown: false,
        }
    }
}

/// How long before a slow change is flagged, and a silent device called offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// From the commit to `delay_in_setting`.
    pub setting: Duration,
    /// From the commit to `delay_in_removing`.
    pub removing: Duration,
    /// From the device's last contact to `device_offline`.
    pub offline: Duration,
}

impl Thresholds {
    /// Defaults per device kind (docs/STATUS.md says why these values).
    pub fn default_for(kind: DeviceKind) -> Thresholds {
        match kind {
            // Panels are programmed over a slow keypad bus, one user number at a time.
            DeviceKind::Panel => Thresholds {
                setting: Duration::minutes(5),
                removing: Duration::minutes(5),
                offline: Duration::minutes(10),
            },
            // Z-Wave locks answer within seconds but retry through a mesh; they are
            // polled rarely to spare batteries.
            DeviceKind::Lock => Thresholds {
                setting: Duration::minutes(5),
                removing: Duration::minutes(5),
                offline: Duration::minutes(15),
            },
            // Door controllers are wired IP devices: slowness means trouble.
            DeviceKind::Door => Thresholds {
                setting: Duration::minutes(2),
                removing: Duration::minutes(2),
                offline: Duration::minutes(5),
            },
        }
    }
}

/// A site's overrides of one kind's thresholds; None keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThresholdOverride {
    /// Replaces [`Thresholds::setting`].
    pub setting: Option<Duration>,
    /// Replaces [`Thresholds::removing`].
    pub removing: Option<Duration>,
    /// Replaces [`Thresholds::offline`].
    pub offline: Option<Duration>,
}

/// A site's threshold overrides per device kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SiteThresholds {
    /// Panels.
    pub panel: ThresholdOverride,
    /// Locks.
    pub lock: ThresholdOverride,
    /// Doors.
    pub door: ThresholdOverride,
}

impl SiteThresholds {
    /// The thresholds in force for `kind` at this site.
    pub fn for_kind(&self, kind: DeviceKind) -> Thresholds {
        let d = Thresholds::default_for(kind);
        let o = match kind {
            DeviceKind::Panel => self.panel,
            DeviceKind::Lock => self.lock,
            DeviceKind::Door => self.door,
        };
        Thresholds {
            setting: o.setting.unwrap_or(d.setting),
            removing: o.removing.unwrap_or(d.removing),
            offline: o.offline.unwrap_or(d.offline),
        }
    }
}

/// The site's agent link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLink {
    /// Whether the agent's stream is open.
    pub connected: bool,
    /// Last time the agent was heard from (None: never).
    pub last_seen: Option<DateTime<Utc>>,
}

/// Everything keyplaned knows about one slot assignment on one device.
#[derive(Debug, Clone)]
pub struct SlotFacts {
    /// The device's kind.
    pub kind: DeviceKind,
    /// The slot (user number) of the assignment.
    pub slot: u16,
    /// Whether the device keeps schedules itself (then it holds scheduled codes all
    /// the time and enforces the windows).
    pub keeps_schedules: bool,
    /// The site's time zone, for schedules.
    pub time_zone: Tz,
    /// What keyplane wants in the slot now; None: the code must leave (credential
    /// deleted, or its scope no longer names the device).
    pub desired: Option<SlotValue>,
    /// Plan membership, validity and lockdown.
    pub presence: Presence,
    /// The slot's desired value as of the device's applied revision (None: the device
    /// never had this code).
    pub applied_value: Option<SlotValue>,
    /// Site revision that last changed the slot's desired value.
    pub changed_revision: i64,
    /// Commit time of that revision: delays are measured from it.
    pub changed_at: DateTime<Utc>,
    /// Site revision up to which the agent reported the device applied.
    pub applied_revision: i64,
    /// The agent's report on its last write to the slot.
    pub last_write: Option<WriteReport>,
    /// What the agent last read back from the slot.
    pub read_back: Option<ReadBack>,
    /// A hand-programmed slot holding the same code, and since when.
    pub local_conflict: Option<(u16, DateTime<Utc>)>,
    /// The site's agent.
    pub agent: AgentLink,
    /// Last time the agent reached the device (None: never).
    pub device_last_seen: Option<DateTime<Utc>>,
    /// Thresholds in force for the device's kind at this site.
    pub thresholds: Thresholds,
    /// The instant evaluated.
    pub now: DateTime<Utc>,
}

/// The status of one slot assignment, with why and what is on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// Where the code stands.
    pub status: SlotStatus,
    /// Why the code is kept off the device (WITHHELD, or REMOVING because withheld).
    pub withheld: Option<WithheldReason>,
    /// Changes on their way.
    pub pending: Vec<PendingChange>,
    /// Errors first, then warnings, each in [`IssueCode`] order.
    pub issues: Vec<SlotIssue>,
}

impl SlotState {
    /// Whether any issue is an error.
    pub fn has_error(&self) -> bool {
        self.issues.iter().any(|i| i.severity() == Severity::Error)
    }

    /// The errors.
    pub fn errors(&self) -> impl Iterator<Item = &SlotIssue> {
        self.issues
            .iter()
            .filter(|i| i.severity() == Severity::Error)
    }

    /// The warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &SlotIssue> {
        self.issues
            .iter()
            .filter(|i| i.severity() == Severity::Warning)
    }
}

/// Why the code is kept off the device now, if it is. The most lasting reason wins:
/// a plan outlasts a validity period, which outlasts a lockdown or a closed window.
fn withheld_reason(f: &SlotFacts, value: &SlotValue) -> Option<WithheldReason> {
    let p = &f.presence;
    if !p.access_point {
        return Some(WithheldReason::NotAnAccessPoint);
    }
    if p.valid_until.is_some_and(|until| f.now >= until) {
        return Some(WithheldReason::AfterValidity);
    }
    if let Some(starts_at) = p.valid_from.filter(|from| f.now < *from) {
        return Some(WithheldReason::BeforeValidity { starts_at });
    }
    if p.lockdown && f.kind == DeviceKind::Door {
        return Some(WithheldReason::Lockdown);
    }
    match &value.schedules {
        Some(s) if !f.keeps_schedules && !any_open(s, f.time_zone, f.now) => {
            Some(WithheldReason::OutsideSchedule {
                next_set_at: next_set_at(f, s, f.now),
            })
        }
        _ => None,
    }
}

/// When the code is next due on a device that does not keep schedules, from `from`,
/// within the validity period.
fn next_set_at(
    f: &SlotFacts,
    schedules: &[Schedule],
    from: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let at = if f.keeps_schedules {
        Some(from)
    } else {
        any_next_open(schedules, f.time_zone, from)
    };
    at.filter(|t| f.presence.valid_until.is_none_or(|until| *t < until))
}

/// When a withheld code will be written, where that is known.
fn deferred_until(
    f: &SlotFacts,
    value: &SlotValue,
    reason: &WithheldReason,
) -> Option<DateTime<Utc>> {
    match reason {
        WithheldReason::OutsideSchedule { next_set_at } => *next_set_at,
        WithheldReason::BeforeValidity { starts_at } => match &value.schedules {
            Some(s) => next_set_at(f, s, *starts_at),
            None => Some(*starts_at),
        },
        WithheldReason::NotAnAccessPoint
        | WithheldReason::AfterValidity
        | WithheldReason::Lockdown => None,
    }
}

/// Whether keeping the code off takes a removal from the device: the code left the
/// desired table (deleted, out of scope, not an access point). Clock-driven reasons
/// are enforced by the agent on time, and lockdown by the doors refusing every code.
fn removes(reason: Option<&WithheldReason>) -> bool {
    matches!(reason, None | Some(WithheldReason::NotAnAccessPoint))
}

/// What changes between what the device has and what it gets.
fn changes(from: Option<&SlotValue>, to: &SlotValue) -> Vec<PendingChange> {
    let Some(from) = from else {
        return vec![PendingChange::Creating];
    };
    let mut out = Vec::new();
    if from.code_version != to.code_version {
        out.push(PendingChange::UpdatingCode);
    }
    if from.schedules != to.schedules {
        out.push(PendingChange::UpdatingSchedule {
            from: from.schedules.clone(),
            to: to.schedules.clone(),
        });
    }
    if from.settings_version != to.settings_version {
        out.push(PendingChange::UpdatingSettings);
    }
    out
}

/// Decides the status, pending changes and issues of one slot assignment.
pub fn slot_state(f: &SlotFacts) -> SlotState {
    let target = f
        .desired
        .as_ref()
        .map(|value| (value, withheld_reason(f, value)));
    let wants_on = matches!(target, Some((_, None)));
    let withheld = target.as_ref().and_then(|(_, reason)| reason.clone());
    // A report about an older revision says nothing about the change in flight.
    let outcome = f
        .last_write
        .as_ref()
        .filter(|w| w.revision >= f.changed_revision);
    let acked = f.applied_revision >= f.changed_revision;
    let delivered = match outcome.map(|w| &w.outcome) {
        Some(WriteOutcome::Done | WriteOutcome::Unconfirmed) => true,
        Some(WriteOutcome::Refused(_) | WriteOutcome::DeferredArmed { .. }) => false,
        None => acked,
    };
    let mut issues = Vec::new();
    let mut pending = Vec::new();
    let mut status = if wants_on {
        if delivered {
            SlotStatus::Set
        } else {
            if let Some((value, _)) = &target {
                pending = changes(f.applied_value.as_ref(), value);
            }
            SlotStatus::Setting
        }
    } else if !removes(withheld.as_ref()) {
        // The agent keeps the code off by the clock (or the doors refuse it): it is
        // off already; what is in flight is the new value it will write later.
        if let (false, Some((value, _)), Some(applied)) = (delivered, &target, &f.applied_value) {
            pending = changes(Some(applied), value);
        }
        SlotStatus::Withheld
    } else if !delivered && f.applied_value.is_some() {
        pending.push(PendingChange::Removing);
        SlotStatus::Removing
    } else if withheld.is_some() {
        SlotStatus::Withheld
    } else {
        SlotStatus::Unset
    };
    if let (Some((value, Some(reason))), SlotStatus::Withheld | SlotStatus::Removing) =
        (&target, status)
        && let Some(at) = deferred_until(f, value, reason)
    {
        pending.push(PendingChange::DeferredCreation { at });
    }

    if let Some(w) = outcome {
        match &w.outcome {
            WriteOutcome::Done => {}
            WriteOutcome::Refused(refusal) => issues.push(SlotIssue {
                issue: match (wants_on, refusal) {
                    (true, Refusal::Duplicate) => Issue::DuplicateCodeOnDevice,
                    (true, Refusal::NoSpace) => Issue::NoSpaceOnDevice,
                    (true, other) => Issue::FailedToSetOnDevice {
                        reason: other.reason(),
                    },
                    (false, other) => Issue::FailedToRemoveFromDevice {
                        reason: other.reason(),
                    },
                },
                since: w.at,
            }),
            WriteOutcome::Unconfirmed => {
                status = SlotStatus::Unknown;
                issues.push(SlotIssue {
                    issue: if wants_on {
                        Issue::StateUnconfirmed
                    } else {
                        Issue::RevocationUnconfirmed
                    },
                    since: w.at,
                });
            }
            WriteOutcome::DeferredArmed { partition } => issues.push(SlotIssue {
                issue: Issue::PanelArmedProgrammingDeferred {
                    partition: *partition,
                },
                since: w.at,
            }),
        }
    }

    // What the device shows now, once it has the change.
    if delivered
        && status != SlotStatus::Unknown
        && let Some(read) = f.read_back
    {
        match (wants_on, read.finding) {
            (true, SlotFinding::Drifted | SlotFinding::Missing) => {
                status = SlotStatus::Unset;
                issues.push(SlotIssue {
                    issue: Issue::CodeModifiedAtDevice {
                        slot: f.slot,
                        cleared: read.finding == SlotFinding::Missing,
                    },
                    since: read.since,
                });
            }
            (true, SlotFinding::Unverifiable) => issues.push(SlotIssue {
                issue: Issue::StateUnconfirmed,
                since: read.since,
            }),
            (false, SlotFinding::Managed | SlotFinding::Unverifiable | SlotFinding::Drifted) => {
                status = SlotStatus::Unknown;
                issues.push(SlotIssue {
                    issue: Issue::RevocationUnconfirmed,
                    since: read.since,
                });
            }
            _ => {}
        }
    }

    // A hand-programmed copy opens the device with this code whatever its own slot holds.
    if let Some((local_slot, since)) = f.local_conflict {
        issues.push(SlotIssue {
            issue: Issue::LocalCodeConflict { local_slot },
            since,
        });
    }

    let in_flight = matches!(
        status,
        SlotStatus::Setting | SlotStatus::Removing | SlotStatus::Unknown
    );
    if !f.agent.connected {
        if in_flight {
            issues.push(SlotIssue {
                issue: Issue::AgentDisconnected,
                since: f.agent.last_seen.unwrap_or(f.changed_at),
            });
        }
    } else {
        let silent_since = f.device_last_seen.unwrap_or(f.changed_at);
        if f.now - silent_since >= f.thresholds.offline {
            issues.push(SlotIssue {
                issue: Issue::DeviceOffline,
                since: silent_since,
            });
        }
    }

    // A delay is the warning before a failure: once the device refused, the error says it.
    let failed = issues.iter().any(|i| i.severity() == Severity::Error);
    let delay = match status {
        SlotStatus::Setting => Some((Issue::DelayInSetting, f.thresholds.setting)),
        SlotStatus::Removing => Some((Issue::DelayInRemoving, f.thresholds.removing)),
        _ => None,
    };
    if let Some((issue, after)) = delay
        && !failed
        && f.now - f.changed_at >= after
    {
        issues.push(SlotIssue {
            issue,
            since: f.changed_at + after,
        });
    }

    issues.sort_by_key(|i| (i.severity(), i.code()));
    SlotState {
        status,
        withheld: if matches!(status, SlotStatus::Withheld | SlotStatus::Removing) {
            withheld
        } else {
            None
        },
        pending,
        issues,
    }
}

/// Counts of slot assignments by where they stand; the buckets add up to `total`.
/// An assignment with an error counts as failed whatever its status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollup {
    /// Every assignment counted.
    pub total: u32,
    /// SET without error.
    pub set: u32,
    /// SETTING or REMOVING without error.
    pub pending: u32,
    /// WITHHELD without error.
    pub withheld: u32,
    /// With at least one error.
    pub failed: u32,
    /// UNSET without error.
    pub unset: u32,
    /// UNKNOWN without error.
    pub unknown: u32,
}

impl Rollup {
    /// Counts one assignment.
    pub fn add(&mut self, state: &SlotState) {
        self.total += 1;
        let bucket = if state.has_error() {
            &mut self.failed
        } else {
            match state.status {
                SlotStatus::Set => &mut self.set,
                SlotStatus::Setting | SlotStatus::Removing => &mut self.pending,
                SlotStatus::Withheld => &mut self.withheld,
                SlotStatus::Unset => &mut self.unset,
                SlotStatus::Unknown => &mut self.unknown,
            }
        };
        *bucket += 1;
    }

    /// The roll-up of a credential's assignments (one per device).
    pub fn of<'a>(states: impl IntoIterator<Item = &'a SlotState>) -> Rollup {
        let mut r = Rollup::default();
        for s in states {
            r.add(s);
        }
        r
    }
}

/// A site's roll-up: assignments by where they stand, and how many carry each issue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteRollup {
    /// Every assignment of the site.
    pub slots: Rollup,
    /// Assignments carrying each issue code (codes with none are absent).
    pub issues: BTreeMap<IssueCode, u32>,
}

impl SiteRollup {
    /// The roll-up of every assignment of a site.
    pub fn of<'a>(states: impl IntoIterator<Item = &'a SlotState>) -> SiteRollup {
        let mut r = SiteRollup::default();
        for s in states {
            r.slots.add(s);
            let mut codes: Vec<IssueCode> = s.issues.iter().map(SlotIssue::code).collect();
            codes.dedup();
            for code in codes {
                *r.issues.entry(code).or_default() += 1;
            }
        }
        r
    }
}

/// A change between two evaluations of one slot assignment, for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The device confirmed the code (became SET).
    SetOnDevice,
    /// The device confirmed a removal (REMOVING became UNSET).
    RemovedFromDevice,
    /// The code became WITHHELD.
    Withheld(WithheldReason),
    /// An issue appeared.
    Raised(IssueCode),
    /// An issue's condition ended.
    Cleared(IssueCode),
}

impl Transition {
    /// The event's stable snake_case name (`set_on_device`, `delay_in_setting_on_device`).
    pub fn event_name(&self) -> &'static str {
        match self {
            Transition::SetOnDevice => "set_on_device",
            Transition::RemovedFromDevice => "removed_from_device",
            Transition::Withheld(_) => "withheld_on_device",
            Transition::Raised(code) => match code {
                IssueCode::FailedToSetOnDevice
                | IssueCode::DuplicateCodeOnDevice
                | IssueCode::NoSpaceOnDevice => "failed_to_set_on_device",
                IssueCode::FailedToRemoveFromDevice => "failed_to_remove_from_device",
                IssueCode::DelayInSetting => "delay_in_setting_on_device",
                IssueCode::DelayInRemoving => "delay_in_removing_from_device",
                IssueCode::CodeModifiedAtDevice => "modified_at_device",
                IssueCode::LocalCodeConflict
                | IssueCode::StateUnconfirmed
                | IssueCode::DeviceOffline
                | IssueCode::AgentDisconnected
                | IssueCode::PanelArmedProgrammingDeferred
                | IssueCode::RevocationUnconfirmed => "slot_issue_raised",
            },
            Transition::Cleared(_) => "slot_issue_cleared",
        }
    }
}

impl Transition {
    /// The event kind recorded for this transition.
    pub fn event_kind(&self) -> crate::EventKind {
        use crate::EventKind as K;
        match self.event_name() {
            "set_on_device" => K::SetOnDevice,
            "removed_from_device" => K::RemovedFromDevice,
            "withheld_on_device" => K::WithheldOnDevice,
            "failed_to_set_on_device" => K::FailedToSetOnDevice,
            "failed_to_remove_from_device" => K::FailedToRemoveFromDevice,
            "delay_in_setting_on_device" => K::DelayInSettingOnDevice,
            "delay_in_removing_from_device" => K::DelayInRemovingFromDevice,
            "modified_at_device" => K::ModifiedAtDevice,
            "slot_issue_cleared" => K::SlotIssueCleared,
            _ => K::SlotIssueRaised,
        }
    }

    /// The issue raised or cleared, if the transition is about one.
    pub fn issue(&self) -> Option<IssueCode> {
        match self {
            Transition::Raised(code) | Transition::Cleared(code) => Some(*code),
            _ => None,
        }
    }
}

/// What [`transitions`] compares of an evaluation: kept between evaluations (stored
/// by keyplaned), so the next evaluation's differences become events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSummary {
    /// The status.
    pub status: SlotStatus,
    /// Why withheld.
    pub withheld: Option<WithheldReason>,
    /// The issue codes present.
    pub issues: std::collections::BTreeSet<IssueCode>,
}

impl SlotSummary {
    /// The summary of an evaluation.
    pub fn of(s: &SlotState) -> SlotSummary {
        SlotSummary {
            status: s.status,
            withheld: s.withheld.clone(),
            issues: s.issues.iter().map(SlotIssue::code).collect(),
        }
    }
}

/// The transitions from `before` (None: first evaluation) to `after`, in a stable
/// order: status first, then raised and cleared issues in [`IssueCode`] order. Only
/// differences count, so re-evaluating an unchanged slot yields nothing.
pub fn transitions(before: Option<&SlotState>, after: &SlotState) -> Vec<Transition> {
    summary_transitions(before.map(SlotSummary::of).as_ref(), after)
}

/// [`transitions`] from a stored summary of the previous evaluation.
pub fn summary_transitions(before: Option<&SlotSummary>, after: &SlotState) -> Vec<Transition> {
    let mut out = Vec::new();
    let was = before.map(|b| b.status);
    match after.status {
        SlotStatus::Set if was != Some(SlotStatus::Set) => out.push(Transition::SetOnDevice),
        SlotStatus::Unset if was == Some(SlotStatus::Removing) => {
            out.push(Transition::RemovedFromDevice);
        }
        SlotStatus::Withheld
            if before.is_none_or(|b| {
                b.status != SlotStatus::Withheld || b.withheld != after.withheld
            }) =>
        {
            if let Some(reason) = &after.withheld {
                out.push(Transition::Withheld(reason.clone()));
            }
        }
        _ => {}
    }
    let old = before.map(|b| b.issues.clone()).unwrap_or_default();
    let new: std::collections::BTreeSet<IssueCode> =
        after.issues.iter().map(SlotIssue::code).collect();
    out.extend(new.difference(&old).map(|c| Transition::Raised(*c)));
    out.extend(old.difference(&new).map(|c| Transition::Cleared(*c)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{Window, parse_time, parse_time_zone};

    const REV: i64 = 7;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("rfc3339")
            .with_timezone(&Utc)
    }

    /// Committed at 09:00Z (10:00 Paris), a Monday.
    fn committed() -> DateTime<Utc> {
        utc("2026-11-23T09:00:00Z")
    }

    fn minutes(m: i64) -> DateTime<Utc> {
        committed() + Duration::minutes(m)
    }

    fn value(code_version: i64) -> SlotValue {
        SlotValue {
            code_version,
            settings_version: 1,
            schedules: None,
        }
    }

    fn office() -> Vec<Schedule> {
        vec![Schedule {
            windows: vec![Window {
                days: 0b001_1111,
                start: parse_time("08:00").expect("time"),
                end: parse_time("18:00").expect("time"),
            }],
            ..Schedule::default()
        }]
    }

    /// A lock, code created at revision 7, not yet applied; agent and device fine.
    fn facts(kind: DeviceKind) -> SlotFacts {
        SlotFacts {
            kind,
            slot: 2,
            keeps_schedules: kind != DeviceKind::Panel,
            time_zone: parse_time_zone("Europe/Paris").expect("tz"),
            desired: Some(value(1)),
            presence: Presence::default(),
            applied_value: None,
            changed_revision: REV,
            changed_at: committed(),
            applied_revision: REV - 1,
            last_write: None,
            read_back: None,
            local_conflict: None,
            agent: AgentLink {
                connected: true,
                last_seen: Some(minutes(1)),
            },
            device_last_seen: Some(minutes(1)),
            thresholds: Thresholds::default_for(kind),
            now: minutes(1),
        }
    }

    fn applied(mut f: SlotFacts) -> SlotFacts {
        f.applied_revision = REV;
        f.applied_value = f.desired.clone();
        f
    }

    fn write(f: &mut SlotFacts, outcome: WriteOutcome) {
        f.last_write = Some(WriteReport {
            revision: REV,
            at: minutes(1),
            outcome,
        });
    }

    fn issue(issue: Issue, since: DateTime<Utc>) -> SlotIssue {
        SlotIssue { issue, since }
    }

    struct Case {
        what: &'static str,
        facts: SlotFacts,
        status: SlotStatus,
        withheld: Option<WithheldReason>,
        pending: Vec<PendingChange>,
        issues: Vec<SlotIssue>,
    }

    fn case(what: &'static str, facts: SlotFacts, status: SlotStatus) -> Case {
        Case {
            what,
            facts,
            status,
            withheld: None,
            pending: vec![],
            issues: vec![],
        }
    }

    impl Case {
        fn withheld(mut self, r: WithheldReason) -> Case {
            self.withheld = Some(r);
            self
        }
        fn pending(mut self, p: Vec<PendingChange>) -> Case {
            self.pending = p;
            self
        }
        fn issues(mut self, i: Vec<SlotIssue>) -> Case {
            self.issues = i;
            self
        }
    }

    fn with(mut f: SlotFacts, change: impl FnOnce(&mut SlotFacts)) -> SlotFacts {
        change(&mut f);
        f
    }

    fn run(cases: Vec<Case>) {
        for c in cases {
            let got = slot_state(&c.facts);
            assert_eq!(got.status, c.status, "{}: status", c.what);
            assert_eq!(got.withheld, c.withheld, "{}: withheld", c.what);
            assert_eq!(got.pending, c.pending, "{}: pending", c.what);
            assert_eq!(got.issues, c.issues, "{}: issues", c.what);
        }
    }

    #[test]
    fn setting_to_set_and_failures() {
        use DeviceKind::*;
        use SlotStatus::*;
        let lock = || facts(Lock);
        run(vec![
            case("created, in flight", lock(), Setting).pending(vec![PendingChange::Creating]),
            case("applied", applied(lock()), Set),
            case(
                "written before the ack",
                with(lock(), |f| write(f, WriteOutcome::Done)),
                Set,
            ),
            case(
                "refused with the device's reason",
                with(lock(), |f| {
                    write(
                        f,
                        WriteOutcome::Refused(Refusal::Other("keypad in use".into())),
                    );
                }),
                Setting,
            )
            .pending(vec![PendingChange::Creating])
            .issues(vec![issue(
                Issue::FailedToSetOnDevice {
                    reason: "keypad in use".into(),
                },
                minutes(1),
            )]),
            case(
                "refused although the revision was acked",
                with(applied(lock()), |f| {
                    write(
                        f,
                        WriteOutcome::Refused(Refusal::Other("bad length".into())),
                    );
                }),
                Setting,
            )
            .issues(vec![issue(
                Issue::FailedToSetOnDevice {
                    reason: "bad length".into(),
                },
                minutes(1),
            )]),
            case(
                "a refusal about an older revision is stale",
                with(applied(lock()), |f| {
                    write(f, WriteOutcome::Refused(Refusal::NoSpace));
                    f.last_write.as_mut().expect("write").revision = REV - 1;
                }),
                Set,
            ),
            case(
                "duplicate",
                with(lock(), |f| {
                    write(f, WriteOutcome::Refused(Refusal::Duplicate))
                }),
                Setting,
            )
            .pending(vec![PendingChange::Creating])
            .issues(vec![issue(Issue::DuplicateCodeOnDevice, minutes(1))]),
            case(
                "no space",
                with(lock(), |f| {
                    write(f, WriteOutcome::Refused(Refusal::NoSpace))
                }),
                Setting,
            )
            .pending(vec![PendingChange::Creating])
            .issues(vec![issue(Issue::NoSpaceOnDevice, minutes(1))]),
            case(
                "refused, long ago: the error, not a delay",
                with(lock(), |f| {
                    write(f, WriteOutcome::Refused(Refusal::NoSpace));
                    f.now = minutes(60);
                    f.device_last_seen = Some(minutes(59));
                }),
                Setting,
            )
            .pending(vec![PendingChange::Creating])
            .issues(vec![issue(Issue::NoSpaceOnDevice, minutes(1))]),
            case(
                "write unconfirmed",
                with(lock(), |f| write(f, WriteOutcome::Unconfirmed)),
                Unknown,
            )
            .issues(vec![issue(Issue::StateUnconfirmed, minutes(1))]),
            case(
                "masked read-back",
                with(applied(lock()), |f| {
                    f.read_back = Some(ReadBack {
                        finding: SlotFinding::Unverifiable,
                        since: minutes(1),
                    });
                }),
                Set,
            )
            .issues(vec![issue(Issue::StateUnconfirmed, minutes(1))]),
            case(
                "read back intact",
                with(applied(lock()), |f| {
                    f.read_back = Some(ReadBack {
                        finding: SlotFinding::Managed,
                        since: minutes(1),
                    });
                }),
                Set,
            ),
            case(
                "panel armed: programming deferred",
                with(facts(Panel), |f| {
                    write(f, WriteOutcome::DeferredArmed { partition: 2 });
                }),
                Setting,
            )
            .pending(vec![PendingChange::Creating])
            .issues(vec![issue(
                Issue::PanelArmedProgrammingDeferred { partition: 2 },
                minutes(1),
            )]),
            case(
                "a hand-programmed copy in slot 9",
                with(applied(lock()), |f| {
                    f.local_conflict = Some((9, minutes(1)))
                }),
                Set,
            )
            .issues(vec![issue(
                Issue::LocalCodeConflict { local_slot: 9 },
                minutes(1),
            )]),
        ]);
    }

    #[test]
    fn code_changed_at_the_keypad() {
        use SlotStatus::*;
        let drift = |finding| {
            with(applied(facts(DeviceKind::Lock)), |f| {
                f.read_back = Some(ReadBack {
                    finding,
                    since: minutes(30),
                });
                f.now = minutes(31);
                f.device_last_seen = Some(minutes(30));
            })
        };
        run(vec![
            case("another code", drift(SlotFinding::Drifted), Unset).issues(vec![issue(
                Issue::CodeModifiedAtDevice {
                    slot: 2,
                    cleared: false,
                },
                minutes(30),
            )]),
            case("cleared", drift(SlotFinding::Missing), Unset).issues(vec![issue(
                Issue::CodeModifiedAtDevice {
                    slot: 2,
                    cleared: true,
                },
                minutes(30),
            )]),
            // Re-written (ResolveDrift bumps the write generation): in flight, then set.
            case(
                "re-writing",
                with(drift(SlotFinding::Drifted), |f| {
                    f.desired = Some(value(2));
                    f.changed_revision = REV + 1;
                    f.changed_at = minutes(31);
                }),
                Setting,
            )
            .pending(vec![PendingChange::UpdatingCode]),
            case(
                "re-written and read back",
                with(drift(SlotFinding::Managed), |f| f.now = minutes(32)),
                Set,
            ),
        ]);
        let slot = slot_state(&drift(SlotFinding::Drifted));
        let detail = slot.issues[0].detail(DeviceKind::Panel);
        assert_eq!(detail, "slot 002 was given another code at the panel");
    }

    #[test]
    fn offline_device_delays_then_recovers() {
        use SlotStatus::*;
        // The lock went silent just before the commit.
        let offline = |now: i64| {
            with(facts(DeviceKind::Lock), |f| {
                f.device_last_seen = Some(minutes(-1));
                f.agent.last_seen = Some(minutes(now));
                f.now = minutes(now);
            })
        };
        run(vec![
            case("within the threshold", offline(4), Setting)
                .pending(vec![PendingChange::Creating]),
            case("delay first", offline(5), Setting)
                .pending(vec![PendingChange::Creating])
                .issues(vec![issue(Issue::DelayInSetting, minutes(5))]),
            case("then offline", offline(14), Setting)
                .pending(vec![PendingChange::Creating])
                .issues(vec![
                    issue(Issue::DeviceOffline, minutes(-1)),
                    issue(Issue::DelayInSetting, minutes(5)),
                ]),
            case(
                "back and applied: both cleared",
                with(applied(offline(40)), |f| {
                    f.device_last_seen = Some(minutes(40))
                }),
                Set,
            ),
            case(
                "a site that waits longer",
                with(offline(14), |f| {
                    f.thresholds = SiteThresholds {
                        lock: ThresholdOverride {
                            setting: Some(Duration::minutes(30)),
                            ..ThresholdOverride::default()
                        },
                        ..SiteThresholds::default()
                    }
                    .for_kind(DeviceKind::Lock);
                }),
                Setting,
            )
            .pending(vec![PendingChange::Creating])
            .issues(vec![issue(Issue::DeviceOffline, minutes(-1))]),
            case(
                "offline with the code set",
                with(applied(offline(20)), |f| {
                    f.device_last_seen = Some(minutes(2))
                }),
                Set,
            )
            .issues(vec![issue(Issue::DeviceOffline, minutes(2))]),
            case(
                "never seen",
                with(offline(20), |f| f.device_last_seen = None),
                Setting,
            )
            .pending(vec![PendingChange::Creating])
            .issues(vec![
                issue(Issue::DeviceOffline, committed()),
                issue(Issue::DelayInSetting, minutes(5)),
            ]),
            case(
                "agent gone: in flight",
                with(offline(3), |f| {
                    f.agent = AgentLink {
                        connected: false,
                        last_seen: Some(minutes(-10)),
                    }
                }),
                Setting,
            )
            .pending(vec![PendingChange::Creating])
            .issues(vec![issue(Issue::AgentDisconnected, minutes(-10))]),
            case(
                "agent gone: nothing in flight, nothing to say",
                with(applied(offline(3)), |f| f.agent.connected = false),
                Set,
            ),
        ]);
    }

    #[test]
    fn removal() {
        use SlotStatus::*;
        let removed = |f: SlotFacts| {
            with(applied(f), |f| {
                f.desired = None;
                f.changed_revision = REV + 1;
                f.changed_at = minutes(1);
            })
        };
        let lock = || removed(facts(DeviceKind::Lock));
        run(vec![
            case("in flight", lock(), Removing).pending(vec![PendingChange::Removing]),
            case(
                "cleared",
                with(lock(), |f| f.applied_revision = REV + 1),
                Unset,
            ),
            case(
                "never reached the device",
                with(lock(), |f| f.applied_value = None),
                Unset,
            ),
            case(
                "slow",
                with(lock(), |f| {
                    f.now = minutes(6);
                    f.device_last_seen = Some(minutes(6));
                }),
                Removing,
            )
            .pending(vec![PendingChange::Removing])
            .issues(vec![issue(Issue::DelayInRemoving, minutes(6))]),
            case(
                "refused",
                with(lock(), |f| {
                    f.last_write = Some(WriteReport {
                        revision: REV + 1,
                        at: minutes(1),
                        outcome: WriteOutcome::Refused(Refusal::Other("jammed".into())),
                    });
                }),
                Removing,
            )
            .pending(vec![PendingChange::Removing])
            .issues(vec![issue(
                Issue::FailedToRemoveFromDevice {
                    reason: "jammed".into(),
                },
                minutes(1),
            )]),
            case(
                "clear unconfirmed",
                with(lock(), |f| {
                    f.last_write = Some(WriteReport {
                        revision: REV + 1,
                        at: minutes(1),
                        outcome: WriteOutcome::Unconfirmed,
                    });
                }),
                Unknown,
            )
            .issues(vec![issue(Issue::RevocationUnconfirmed, minutes(1))]),
            case(
                "acked but still occupied (masked)",
                with(lock(), |f| {
                    f.applied_revision = REV + 1;
                    f.read_back = Some(ReadBack {
                        finding: SlotFinding::Unverifiable,
                        since: minutes(1),
                    });
                }),
                Unknown,
            )
            .issues(vec![issue(Issue::RevocationUnconfirmed, minutes(1))]),
            case(
                "a hand-programmed copy still opens the lock",
                with(lock(), |f| {
                    f.applied_revision = REV + 1;
                    f.local_conflict = Some((12, minutes(1)));
                }),
                Unset,
            )
            .issues(vec![issue(
                Issue::LocalCodeConflict { local_slot: 12 },
                minutes(1),
            )]),
        ]);
    }

    #[test]
    fn withheld_reasons() {
        use DeviceKind::*;
        use SlotStatus::*;
        let scheduled = |kind| {
            with(applied(facts(kind)), |f| {
                f.desired = Some(SlotValue {
                    schedules: Some(office()),
                    ..value(1)
                });
                f.applied_value = f.desired.clone();
            })
        };
        // 19:00 Paris on Monday: the office window opens again Tuesday 08:00 (07:00Z).
        let tuesday_8 = utc("2026-11-24T07:00:00Z");
        let evening = |kind| {
            with(scheduled(kind), |f| {
                f.now = utc("2026-11-23T18:00:00Z");
                f.device_last_seen = Some(f.now);
            })
        };
        let not_access_point = |f: SlotFacts| with(f, |f| f.presence.access_point = false);
        run(vec![
            case(
                "plan without the panel",
                not_access_point(facts(Panel)),
                Withheld,
            )
            .withheld(WithheldReason::NotAnAccessPoint),
            case(
                "plan drops a panel holding the code: removing",
                with(not_access_point(applied(facts(Panel))), |f| {
                    f.changed_revision = REV + 1;
                }),
                Removing,
            )
            .withheld(WithheldReason::NotAnAccessPoint)
            .pending(vec![PendingChange::Removing]),
            case(
                "plan drop applied",
                not_access_point(applied(facts(Panel))),
                Withheld,
            )
            .withheld(WithheldReason::NotAnAccessPoint),
            case("inside the window", scheduled(Panel), Set),
            case("outside the window, panel", evening(Panel), Withheld)
                .withheld(WithheldReason::OutsideSchedule {
                    next_set_at: Some(tuesday_8),
                })
                .pending(vec![PendingChange::DeferredCreation { at: tuesday_8 }]),
            case("outside the window, the lock keeps it", evening(Lock), Set),
            case(
                "outside the window, no window before the validity ends",
                with(evening(Panel), |f| {
                    f.presence.valid_until = Some(utc("2026-11-24T06:00:00Z"));
                }),
                Withheld,
            )
            .withheld(WithheldReason::OutsideSchedule { next_set_at: None }),
            case(
                "created outside the window",
                with(facts(Panel), |f| {
                    f.desired = Some(SlotValue {
                        schedules: Some(office()),
                        ..value(1)
                    });
                    f.now = utc("2026-11-23T18:00:00Z");
                    f.device_last_seen = Some(f.now);
                }),
                Withheld,
            )
            .withheld(WithheldReason::OutsideSchedule {
                next_set_at: Some(tuesday_8),
            })
            .pending(vec![PendingChange::DeferredCreation { at: tuesday_8 }]),
            case(
                "code changed outside the window",
                with(evening(Panel), |f| {
                    f.desired = Some(SlotValue {
                        schedules: Some(office()),
                        ..value(2)
                    });
                    f.changed_revision = REV + 1;
                }),
                Withheld,
            )
            .withheld(WithheldReason::OutsideSchedule {
                next_set_at: Some(tuesday_8),
            })
            .pending(vec![
                PendingChange::UpdatingCode,
                PendingChange::DeferredCreation { at: tuesday_8 },
            ]),
            case(
                "before validity",
                with(facts(Lock), |f| f.presence.valid_from = Some(minutes(120))),
                Withheld,
            )
            .withheld(WithheldReason::BeforeValidity {
                starts_at: minutes(120),
            })
            .pending(vec![PendingChange::DeferredCreation { at: minutes(120) }]),
            case(
                "before validity, evening start on a scheduled panel",
                with(scheduled(Panel), |f| {
                    f.presence.valid_from = Some(utc("2026-11-23T20:00:00Z"));
                }),
                Withheld,
            )
            .withheld(WithheldReason::BeforeValidity {
                starts_at: utc("2026-11-23T20:00:00Z"),
            })
            .pending(vec![PendingChange::DeferredCreation { at: tuesday_8 }]),
            case(
                "after validity",
                with(applied(facts(Lock)), |f| {
                    f.presence.valid_until = Some(minutes(-1));
                }),
                Withheld,
            )
            .withheld(WithheldReason::AfterValidity),
            case(
                "lockdown, door",
                with(applied(facts(Door)), |f| f.presence.lockdown = true),
                Withheld,
            )
            .withheld(WithheldReason::Lockdown),
            case(
                "lockdown leaves locks alone",
                with(applied(facts(Lock)), |f| f.presence.lockdown = true),
                Set,
            ),
            case(
                "a plan outlasts a lockdown",
                with(not_access_point(applied(facts(Door))), |f| {
                    f.presence.lockdown = true;
                }),
                Withheld,
            )
            .withheld(WithheldReason::NotAnAccessPoint),
        ]);
    }

    #[test]
    fn pending_updates() {
        let base = || applied(facts(DeviceKind::Lock));
        let update = |to: SlotValue| {
            with(base(), move |f| {
                f.desired = Some(to);
                f.changed_revision = REV + 1;
            })
        };
        let cases: Vec<(&str, SlotFacts, Vec<PendingChange>)> = vec![
            ("code", update(value(2)), vec![PendingChange::UpdatingCode]),
            (
                "schedule",
                update(SlotValue {
                    schedules: Some(office()),
                    ..value(1)
                }),
                vec![PendingChange::UpdatingSchedule {
                    from: None,
                    to: Some(office()),
                }],
            ),
            (
                "levels",
                update(SlotValue {
                    settings_version: 2,
                    ..value(1)
                }),
                vec![PendingChange::UpdatingSettings],
            ),
            (
                "code and schedule",
                update(SlotValue {
                    schedules: Some(office()),
                    ..value(3)
                }),
                vec![
                    PendingChange::UpdatingCode,
                    PendingChange::UpdatingSchedule {
                        from: None,
                        to: Some(office()),
                    },
                ],
            ),
        ];
        for (what, f, want) in cases {
            let got = slot_state(&f);
            assert_eq!(got.status, SlotStatus::Setting, "{what}");
            assert_eq!(got.pending, want, "{what}");
        }
    }

    #[test]
    fn vocabulary_is_closed_and_documented() {
        let mut names: Vec<&str> = IssueCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), IssueCode::ALL.len());
        for code in IssueCode::ALL {
            let name = code.as_str();
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(
                code.doc().ends_with('.') && !code.doc().contains('\n'),
                "{name}"
            );
        }
        let warnings = [
            IssueCode::StateUnconfirmed,
            IssueCode::DeviceOffline,
            IssueCode::AgentDisconnected,
            IssueCode::PanelArmedProgrammingDeferred,
            IssueCode::DelayInSetting,
            IssueCode::DelayInRemoving,
        ];
        for code in IssueCode::ALL {
            let want = if warnings.contains(&code) {
                Severity::Warning
            } else {
                Severity::Error
            };
            assert_eq!(code.severity(), want, "{code}");
        }
        let statuses: Vec<&str> = SlotStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            statuses,
            ["SETTING", "SET", "REMOVING", "UNSET", "WITHHELD", "UNKNOWN"]
        );
    }

    #[test]
    fn details_never_carry_more_than_the_device_said() {
        let cases = [
            (
                Issue::FailedToSetOnDevice {
                    reason: "code too short".into(),
                },
                DeviceKind::Lock,
                "the lock refused the code: code too short",
            ),
            (
                Issue::LocalCodeConflict { local_slot: 4 },
                DeviceKind::Panel,
                "slot 004 holds the same code, programmed at the panel",
            ),
            (
                Issue::DelayInSetting,
                DeviceKind::Door,
                "Setting has taken longer than the device kind's threshold since the commit",
            ),
        ];
        for (i, kind, want) in cases {
            assert_eq!(
                SlotIssue {
                    issue: i,
                    since: committed()
                }
                .detail(kind),
                want
            );
        }
    }

    #[test]
    fn thresholds_per_kind_and_site() {
        for kind in [DeviceKind::Panel, DeviceKind::Lock, DeviceKind::Door] {
            let t = Thresholds::default_for(kind);
            // A silent device is late before it is called offline.
            assert!(t.setting < t.offline && t.removing < t.offline, "{kind}");
            assert_eq!(SiteThresholds::default().for_kind(kind), t, "{kind}");
        }
        let site = SiteThresholds {
            door: ThresholdOverride {
                offline: Some(Duration::minutes(1)),
                ..ThresholdOverride::default()
            },
            ..SiteThresholds::default()
        };
        assert_eq!(
            site.for_kind(DeviceKind::Door).offline,
            Duration::minutes(1)
        );
        assert_eq!(
            site.for_kind(DeviceKind::Door).setting,
            Duration::minutes(2)
        );
        assert_eq!(
            site.for_kind(DeviceKind::Lock).offline,
            Duration::minutes(15)
        );
    }

    #[test]
    fn transitions_for_events() {
        let lock = facts(DeviceKind::Lock);
        let offline_late = with(facts(DeviceKind::Lock), |f| {
            f.device_last_seen = Some(minutes(-1));
            f.now = minutes(20);
        });
        let back = with(applied(offline_late.clone()), |f| {
            f.device_last_seen = Some(minutes(20));
        });
        let refused = with(facts(DeviceKind::Lock), |f| {
            write(f, WriteOutcome::Refused(Refusal::Other("full".into())));
        });
        let removing = with(applied(facts(DeviceKind::Lock)), |f| {
            f.desired = None;
            f.changed_revision = REV + 1;
        });
        let removed = with(removing.clone(), |f| f.applied_revision = REV + 1);
        let panel_off = with(facts(DeviceKind::Panel), |f| {
            f.presence.access_point = false
        });
        let drifted = with(applied(facts(DeviceKind::Lock)), |f| {
            f.read_back = Some(ReadBack {
                finding: SlotFinding::Drifted,
                since: minutes(1),
            });
        });
        let cases: Vec<(&str, Option<SlotFacts>, SlotFacts, Vec<&str>)> = vec![
            ("new, in flight", None, lock.clone(), vec![]),
            (
                "set",
                Some(lock.clone()),
                applied(lock.clone()),
                vec!["set_on_device"],
            ),
            (
                "unchanged",
                Some(applied(lock.clone())),
                applied(lock.clone()),
                vec![],
            ),
            (
                "late and offline",
                Some(lock.clone()),
                offline_late.clone(),
                vec!["slot_issue_raised", "delay_in_setting_on_device"],
            ),
            (
                "back: set, both cleared",
                Some(offline_late),
                back,
                vec!["set_on_device", "slot_issue_cleared", "slot_issue_cleared"],
            ),
            (
                "refused",
                Some(lock.clone()),
                refused,
                vec!["failed_to_set_on_device"],
            ),
            (
                "removed",
                Some(removing),
                removed,
                vec!["removed_from_device"],
            ),
            ("withheld", None, panel_off, vec!["withheld_on_device"]),
            (
                "keypad change",
                Some(applied(lock.clone())),
                drifted,
                vec!["modified_at_device"],
            ),
        ];
        for (what, before, after, want) in cases {
            let before = before.map(|f| slot_state(&f));
            let got: Vec<&str> = transitions(before.as_ref(), &slot_state(&after))
                .iter()
                .map(Transition::event_name)
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn rollups() {
        let states: Vec<SlotState> = vec![
            slot_state(&applied(facts(DeviceKind::Panel))),
            slot_state(&facts(DeviceKind::Lock)),
            slot_state(&with(facts(DeviceKind::Door), |f| {
                f.presence.access_point = false;
            })),
            slot_state(&with(facts(DeviceKind::Lock), |f| {
                write(f, WriteOutcome::Refused(Refusal::NoSpace));
            })),
            slot_state(&with(applied(facts(DeviceKind::Lock)), |f| {
                f.read_back = Some(ReadBack {
                    finding: SlotFinding::Unverifiable,
                    since: minutes(1),
                });
            })),
        ];
        let credential = Rollup::of(&states);
        assert_eq!(
            credential,
            Rollup {
                total: 5,
                set: 2,
                pending: 1,
                withheld: 1,
                failed: 1,
                unset: 0,
                unknown: 0,
            }
        );
        let site = SiteRollup::of(&states);
        assert_eq!(site.slots, credential);
        assert_eq!(
            site.issues.into_iter().collect::<Vec<_>>(),
            vec![
                (IssueCode::NoSpaceOnDevice, 1),
                (IssueCode::StateUnconfirmed, 1)
            ]
        );
    }

    #[test]
    fn each_transition_has_its_event_kind_and_issue() {
        use crate::EventKind as K;
        let table = [
            (Transition::SetOnDevice, K::SetOnDevice, None),
            (Transition::RemovedFromDevice, K::RemovedFromDevice, None),
            (
                Transition::Withheld(WithheldReason::Lockdown),
                K::WithheldOnDevice,
                None,
            ),
            (
                Transition::Raised(IssueCode::DuplicateCodeOnDevice),
                K::FailedToSetOnDevice,
                Some(IssueCode::DuplicateCodeOnDevice),
            ),
            (
                Transition::Raised(IssueCode::FailedToRemoveFromDevice),
                K::FailedToRemoveFromDevice,
                Some(IssueCode::FailedToRemoveFromDevice),
            ),
            (
                Transition::Raised(IssueCode::DelayInSetting),
                K::DelayInSettingOnDevice,
                Some(IssueCode::DelayInSetting),
            ),
            (
                Transition::Raised(IssueCode::DelayInRemoving),
                K::DelayInRemovingFromDevice,
                Some(IssueCode::DelayInRemoving),
            ),
            (
                Transition::Raised(IssueCode::CodeModifiedAtDevice),
                K::ModifiedAtDevice,
                Some(IssueCode::CodeModifiedAtDevice),
            ),
            (
                Transition::Raised(IssueCode::DeviceOffline),
                K::SlotIssueRaised,
                Some(IssueCode::DeviceOffline),
            ),
            (
                Transition::Cleared(IssueCode::DelayInSetting),
                K::SlotIssueCleared,
                Some(IssueCode::DelayInSetting),
            ),
        ];
        for (t, kind, issue) in table {
            assert_eq!(t.event_kind(), kind, "{t:?}");
            assert_eq!(t.event_kind().as_str(), t.event_name(), "{t:?}");
            assert_eq!(t.issue(), issue, "{t:?}");
            assert!(!kind.device_logged(), "{kind}: raised by keyplaned only");
        }
    }

    #[test]
    fn a_stored_summary_yields_the_same_transitions_as_the_state() {
        let state = |status, issues: Vec<Issue>| SlotState {
            status,
            withheld: None,
            pending: Vec::new(),
            issues: issues
                .into_iter()
                .map(|issue| SlotIssue {
                    issue,
                    since: committed(),
                })
                .collect(),
        };
        let before = state(
            SlotStatus::Setting,
            vec![Issue::DelayInSetting, Issue::DeviceOffline],
        );
        let after = state(SlotStatus::Set, vec![Issue::StateUnconfirmed]);
        let from_summary = summary_transitions(Some(&SlotSummary::of(&before)), &after);
        assert_eq!(from_summary, transitions(Some(&before), &after));
        assert_eq!(
            from_summary,
            vec![
                Transition::SetOnDevice,
                Transition::Raised(IssueCode::StateUnconfirmed),
                Transition::Cleared(IssueCode::DeviceOffline),
                Transition::Cleared(IssueCode::DelayInSetting),
            ]
        );
        assert!(summary_transitions(Some(&SlotSummary::of(&after)), &after).is_empty());
    }
}
