//! Rows the store returns and the inputs it takes.

use keyplane_core::authority::{Authorities, Level};
use keyplane_core::pin::Pin;
use keyplane_core::{DeviceKind, DeviceModel};
use std::time::SystemTime;
use uuid::Uuid;

/// What happens to codes found on a device that keyplane did not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalCodePolicy {
    /// Never overwrite or clear them (default).
    Preserve,
    /// Clear them, auditing each clearing.
    Authoritative,
}

impl LocalCodePolicy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LocalCodePolicy::Preserve => "preserve",
            LocalCodePolicy::Authoritative => "authoritative",
        }
    }

    pub(crate) fn parse(s: &str) -> LocalCodePolicy {
        if s == "authoritative" {
            LocalCodePolicy::Authoritative
        } else {
            LocalCodePolicy::Preserve
        }
    }
}

/// Who made a change and from where, for the audit log and authority checks.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The dealer whose token authenticated the call.
    pub dealer: Uuid,
    /// Principal description, e.g. `dealer:<id>`.
    pub principal: String,
    /// Peer address, when known.
    pub peer: Option<String>,
    /// A site user acting through the back office (site, user); None: the dealer.
    pub acting_user: Option<(Uuid, Uuid)>,
    /// The partition the actor acts from, when named.
    pub acting_partition: Option<u8>,
    /// The acting user's resource name (`sites/{site}/users/{user}`), for the audit log.
    pub acting_as: Option<String>,
    /// The call's request id (the client's `x-request-id`, or one keyplaned made).
    pub request_id: Option<String>,
}

/// An idempotency key of a create request.
#[derive(Debug, Clone)]
pub struct RequestKey {
    /// Client-chosen request id.
    pub request_id: String,
    /// RPC method name.
    pub method: &'static str,
    /// Keyed fingerprint of the request body.
    pub fingerprint: Vec<u8>,
}

/// A page of a list: items after `after` (exclusive), at most `limit` of them.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    /// Last id of the previous page.
    pub after: Option<Uuid>,
    /// Page size.
    pub limit: i64,
}

/// A site row.
#[derive(Debug, Clone)]
pub struct Site {
    /// Site id.
    pub id: Uuid,
    /// Display name.
    pub display_name: String,
    /// IANA time zone.
    pub time_zone: String,
    /// Local code policy.
    pub local_code_policy: LocalCodePolicy,
    /// Head revision of the change log.
    pub revision: i64,
    /// Row version (the etag).
    pub version: i64,
    /// Created at.
    pub create_time: SystemTime,
    /// Last updated at.
    pub update_time: SystemTime,
    /// Per-kind overrides of the slot status thresholds (docs/STATUS.md).
    pub status_thresholds: keyplane_core::status::SiteThresholds,
}

/// Fields of a new site.
#[derive(Debug, Clone)]
pub struct NewSite {
    /// Display name.
    pub display_name: String,
    /// IANA time zone.
    pub time_zone: String,
    /// Local code policy.
    pub local_code_policy: LocalCodePolicy,
}

/// Changes to a site; `None` leaves a field as is.
#[derive(Debug, Clone, Default)]
pub struct SitePatch {
    /// New display name.
    pub display_name: Option<String>,
    /// New time zone.
    pub time_zone: Option<String>,
    /// New policy.
    pub local_code_policy: Option<LocalCodePolicy>,
}

/// A partition row.
#[derive(Debug, Clone)]
pub struct Partition {
    /// Site id.
    pub site: Uuid,
    /// 1..=8.
    pub number: u8,
    /// Display name.
    pub display_name: String,
    /// Row version.
    pub version: i64,
}

/// A device row.
#[derive(Debug, Clone)]
pub struct Device {
    /// Site id.
    pub site: Uuid,
    /// Device id.
    pub id: Uuid,
    /// Display name.
    pub display_name: String,
    /// Model profile.
    pub model: &'static DeviceModel,
    /// Partition, if any.
    pub partition: Option<u8>,
    /// Secures a perimeter entrance.
    pub perimeter: bool,
    /// Row version.
    pub version: i64,
    /// Created at.
    pub create_time: SystemTime,
    /// Last updated at.
    pub update_time: SystemTime,
    /// What the device reported about itself in the agent's inventory.
    pub reported: Option<keyplane_core::constraints::ReportedConstraints>,
}

impl Device {
    /// The device's constraints: its model profile's, with what it reported laid over
    /// them (a report that makes no sense leaves the profile in force).
    pub fn constraints(&self) -> keyplane_core::constraints::DeviceConstraints {
        let profile = keyplane_core::constraints::DeviceConstraints::from_model(self.model);
        match &self.reported {
            Some(r) => profile.with_reported(r).unwrap_or(profile),
            None => profile,
        }
    }

    /// The device kind.
    pub fn kind(&self) -> DeviceKind {
        self.model.kind
    }

    /// `sites/{site}/devices/{device}`.
    pub fn name(&self) -> String {
        format!("sites/{}/devices/{}", self.site, self.id)
    }
}

/// Fields of a new device.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Display name.
    pub display_name: String,
    /// Model profile.
    pub model: &'static DeviceModel,
    /// Partition, if any.
    pub partition: Option<u8>,
    /// Perimeter entrance.
    pub perimeter: bool,
}

/// Changes to a device.
#[derive(Debug, Clone, Default)]
pub struct DevicePatch {
    /// New display name.
    pub display_name: Option<String>,
    /// New partition (`Some(None)` clears it).
    pub partition: Option<Option<u8>>,
    /// New perimeter flag.
    pub perimeter: Option<bool>,
}

/// A user row.
#[derive(Debug, Clone)]
pub struct User {
    /// Site id.
    pub site: Uuid,
    /// User id.
    pub id: Uuid,
    /// Display name.
    pub display_name: String,
    /// Level per partition.
    pub authorities: Authorities,
    /// Open/close reporting.
    pub open_close_reporting: bool,
    /// Row version.
    pub version: i64,
    /// Created at.
    pub create_time: SystemTime,
    /// Last updated at.
    pub update_time: SystemTime,
    /// Kept by keyplane itself (the backup code pool's holder), not a person: hidden
    /// from the user API.
    pub system: bool,
}

/// Fields of a new user.
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    /// Display name.
    pub display_name: String,
    /// Level per partition.
    pub authorities: Authorities,
    /// Requested open/close reporting (a master or manager adder's own setting wins).
    pub open_close_reporting: bool,
    /// A user keyplane keeps for itself (see [`User::system`]).
    pub system: bool,
}

/// Changes to a user.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    /// New display name.
    pub display_name: Option<String>,
    /// New levels (replacing all).
    pub authorities: Option<Authorities>,
    /// New open/close reporting (installer only).
    pub open_close_reporting: Option<bool>,
}

pub use keyplane_core::credential::Scope;

/// A credential's slot on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Device id.
    pub device: Uuid,
    /// Slot number.
    pub slot: u16,
    /// How people see it (`002` on panels).
    pub display_slot: String,
}

/// A credential row (the PIN stays sealed).
#[derive(Debug, Clone)]
pub struct Credential {
    /// Site id.
    pub site: Uuid,
    /// User id.
    pub user: Uuid,
    /// Credential id.
    pub id: Uuid,
    /// Display name.
    pub display_name: String,
    /// Scope.
    pub scope: Scope,
    /// Slots it occupies.
    pub slots: Vec<Slot>,
    /// Partition it was created in.
    pub created_partition: Option<u8>,
    /// Temporary code: valid from.
    pub valid_from: Option<chrono::DateTime<chrono::Utc>>,
    /// Temporary code: valid until.
    pub valid_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Limited-use code: removed after this many granted uses.
    pub max_uses: Option<i32>,
    /// Granted uses counted so far.
    pub uses: i32,
    /// Row version.
    pub version: i64,
    /// Created at.
    pub create_time: SystemTime,
    /// Last updated at.
    pub update_time: SystemTime,
}

/// Fields of a new credential.
#[derive(Debug, Clone)]
pub struct NewCredential {
    /// Display name.
    pub display_name: String,
    /// The code.
    pub pin: Pin,
    /// Scope.
    pub scope: Scope,
    /// Temporary code: valid from.
    pub valid_from: Option<chrono::DateTime<chrono::Utc>>,
    /// Temporary code: valid until.
    pub valid_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Limited-use code: removed after this many granted uses.
    pub max_uses: Option<i32>,
    /// keyplane's own code (the backup pool), whose owner is a system user; the
    /// user API never reaches system users, so every dealer request sets false.
    pub system_owner: bool,
}

/// Changes to a credential.
#[derive(Debug, Clone, Default)]
pub struct CredentialPatch {
    /// New display name.
    pub display_name: Option<String>,
    /// New code.
    pub pin: Option<Pin>,
    /// New scope.
    pub scope: Option<Scope>,
}

/// Sync state of one device.
#[derive(Debug, Clone)]
pub struct DeviceSync {
    /// Device id.
    pub device: Uuid,
    /// Highest revision that changed this device.
    pub desired_revision: i64,
    /// Revision the agent applied.
    pub applied_revision: i64,
    /// Slots changed after the applied revision.
    pub pending_changes: i64,
    /// Last report from the agent about this device.
    pub last_seen: Option<SystemTime>,
    /// Slots keyplane manages.
    pub managed_slots: i64,
    /// Codes programmed at the device.
    pub local_slots: i64,
    /// Managed slots changed or cleared by hand.
    pub drifted_slots: i64,
    /// Hand-programmed codes equal to managed ones.
    pub conflicts: i64,
    /// Managed slots the device masks.
    pub unverifiable_slots: i64,
}

/// Sync state of a site.
#[derive(Debug, Clone)]
pub struct SiteSync {
    /// Site id.
    pub site: Uuid,
    /// Head revision.
    pub revision: i64,
    /// Whether an agent stream is open (and heard from recently).
    pub agent_connected: bool,
    /// Last time the agent was heard from.
    pub agent_last_seen: Option<SystemTime>,
    /// Per device.
    pub devices: Vec<DeviceSync>,
    /// Why set-up is incomplete.
    pub setup_issues: Vec<String>,
}

/// The code one slot should hold.
#[derive(Clone)]
pub struct DesiredCode {
    /// Credential id.
    pub credential: Uuid,
    /// Its user.
    pub user: Uuid,
    /// The PIN.
    pub pin: Pin,
    /// Panels: the user's level in each partition the code is scoped to.
    pub authorities: Vec<(u8, Level)>,
    /// Panels: open/close reporting.
    pub open_close_reporting: bool,
    /// When the code belongs on the device: None always, else while any is open.
    pub schedules: Option<Vec<keyplane_core::schedule::Schedule>>,
    /// Temporary codes: valid from.
    pub valid_from: Option<chrono::DateTime<chrono::Utc>>,
    /// Temporary codes: valid until.
    pub valid_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Bumped to have the agent write the code again (drift re-applied).
    pub write_generation: i64,
}

/// What one slot of one device should hold (`code` None: clear it).
#[derive(Clone)]
pub struct DesiredSlot {
    /// Device id.
    pub device: Uuid,
    /// Slot.
    pub slot: u16,
    /// The code, or None when the slot must be cleared.
    pub code: Option<DesiredCode>,
    /// Clear the slot although keyplane did not write it (a local code removed).
    pub remove_local: bool,
}

impl std::fmt::Debug for DesiredSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DesiredSlot({}/{} {})",
            self.device,
            self.slot,
            if self.code.is_some() { "set" } else { "clear" }
        )
    }
}

/// What an agent must apply to catch up.
#[derive(Debug, Clone)]
pub enum AgentUpdate {
    /// The whole desired table at `revision`.
    Snapshot {
        /// Site revision.
        revision: i64,
        /// Every device of the site and its model.
        devices: Vec<(Uuid, &'static DeviceModel)>,
        /// The site's time zone.
        time_zone: String,
        /// Doors locked down.
        lockdown: bool,
        /// Every assigned slot.
        slots: Vec<DesiredSlot>,
        /// The W3C trace context of the change that made `revision` (traces exported).
        traceparent: Option<String>,
    },
    /// Slots changed after `from` as of `revision`.
    Changes {
        /// The revision the agent had.
        from: i64,
        /// Site revision now.
        revision: i64,
        /// Every device of the site and its model.
        devices: Vec<(Uuid, &'static DeviceModel)>,
        /// The site's time zone.
        time_zone: String,
        /// Doors locked down.
        lockdown: bool,
        /// Current desired value of every changed slot.
        slots: Vec<DesiredSlot>,
        /// The W3C trace context of the newest traced change after `from` (traces
        /// exported): the agent's apply joins that change's trace.
        traceparent: Option<String>,
    },
}
