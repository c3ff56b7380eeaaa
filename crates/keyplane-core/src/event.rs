//! What happened at a device or a site: the one list of event kinds, shared by the
//! device drivers, the agent, the store and the API.

use std::fmt;

/// What happened. Devices log the first seven; keyplaned raises the rest itself.
///
/// Serialized (agent journal) by variant name; stored (database) by [`EventKind::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum EventKind {
    /// A partition was armed.
    Armed,
    /// A partition was disarmed.
    Disarmed,
    /// A code was refused for arming.
    ArmRefused,
    /// A code was refused for disarming (e.g. operator C, not the arming code).
    DisarmRefused,
    /// A duress code was used: a silent alarm.
    Duress,
    /// A door or lock let a credential in.
    AccessGranted,
    /// A door or lock refused a credential.
    AccessDenied,
    /// Doors locked down (by a person, through the API).
    Lockdown,
    /// Lockdown released.
    LockdownReleased,
    /// A managed slot was changed or cleared at the device.
    Drift,
    /// A local code was cleared under the AUTHORITATIVE policy.
    LocalCodeCleared,
    /// Slot status: A slot assignment became SET (the device confirmed the code).
    SetOnDevice,
    /// Slot status: A slot assignment became UNSET after a confirmed removal.
    RemovedFromDevice,
    /// Slot status: The device refused a code (also a duplicate or no-space refusal).
    FailedToSetOnDevice,
    /// Slot status: The device refused to clear a code.
    FailedToRemoveFromDevice,
    /// Slot status: Setting a code takes longer than the kind's threshold.
    DelayInSettingOnDevice,
    /// Slot status: Removing a code takes longer than the kind's threshold.
    DelayInRemovingFromDevice,
    /// Slot status: A managed slot was changed or cleared at the device.
    ModifiedAtDevice,
    /// Slot status: A slot assignment became WITHHELD.
    WithheldOnDevice,
    /// Slot status: A slot issue's condition ended.
    SlotIssueCleared,
    /// Slot status: Any other slot issue appeared.
    SlotIssueRaised,
    /// The site agent's clock differs from keyplaned's beyond the threshold.
    ClockSkew,
    /// The site agent's clock is back within the threshold (or no longer reported).
    ClockSkewCleared,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 23] = [
        EventKind::Armed,
        EventKind::Disarmed,
        EventKind::ArmRefused,
        EventKind::DisarmRefused,
        EventKind::Duress,
        EventKind::AccessGranted,
        EventKind::AccessDenied,
        EventKind::Lockdown,
        EventKind::LockdownReleased,
        EventKind::Drift,
        EventKind::LocalCodeCleared,
        EventKind::SetOnDevice,
        EventKind::RemovedFromDevice,
        EventKind::FailedToSetOnDevice,
        EventKind::FailedToRemoveFromDevice,
        EventKind::DelayInSettingOnDevice,
        EventKind::DelayInRemovingFromDevice,
        EventKind::ModifiedAtDevice,
        EventKind::WithheldOnDevice,
        EventKind::SlotIssueCleared,
        EventKind::SlotIssueRaised,
        EventKind::ClockSkew,
        EventKind::ClockSkewCleared,
    ];

    /// Stable lower-case name, as stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Armed => "armed",
            EventKind::Disarmed => "disarmed",
            EventKind::ArmRefused => "arm_refused",
            EventKind::DisarmRefused => "disarm_refused",
            EventKind::Duress => "duress",
            EventKind::AccessGranted => "access_granted",
            EventKind::AccessDenied => "access_denied",
            EventKind::Lockdown => "lockdown",
            EventKind::LockdownReleased => "lockdown_released",
            EventKind::Drift => "drift",
            EventKind::LocalCodeCleared => "local_code_cleared",
            EventKind::SetOnDevice => "set_on_device",
            EventKind::RemovedFromDevice => "removed_from_device",
            EventKind::FailedToSetOnDevice => "failed_to_set_on_device",
            EventKind::FailedToRemoveFromDevice => "failed_to_remove_from_device",
            EventKind::DelayInSettingOnDevice => "delay_in_setting_on_device",
            EventKind::DelayInRemovingFromDevice => "delay_in_removing_from_device",
            EventKind::ModifiedAtDevice => "modified_at_device",
            EventKind::WithheldOnDevice => "withheld_on_device",
            EventKind::SlotIssueCleared => "slot_issue_cleared",
            EventKind::SlotIssueRaised => "slot_issue_raised",
            EventKind::ClockSkew => "clock_skew",
            EventKind::ClockSkewCleared => "clock_skew_cleared",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether a device logs this kind (and so an agent may report it); the others
    /// are raised by keyplaned and never accepted from an agent.
    pub fn device_logged(self) -> bool {
        matches!(
            self,
            EventKind::Armed
                | EventKind::Disarmed
                | EventKind::ArmRefused
                | EventKind::DisarmRefused
                | EventKind::Duress
                | EventKind::AccessGranted
                | EventKind::AccessDenied
        )
    }

    /// Events only a panel logs: their device is a panel even once it is deleted.
    pub fn panel_only(self) -> bool {
        matches!(
            self,
            EventKind::Armed
                | EventKind::Disarmed
                | EventKind::ArmRefused
                | EventKind::DisarmRefused
                | EventKind::Duress
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kind_table() {
        use EventKind as K;
        // kind, stored name, logged by a device, panel only, journal (serde) name
        let table = [
            (K::Armed, "armed", true, true, "Armed"),
            (K::Disarmed, "disarmed", true, true, "Disarmed"),
            (K::ArmRefused, "arm_refused", true, true, "ArmRefused"),
            (
                K::DisarmRefused,
                "disarm_refused",
                true,
                true,
                "DisarmRefused",
            ),
            (K::Duress, "duress", true, true, "Duress"),
            (
                K::AccessGranted,
                "access_granted",
                true,
                false,
                "AccessGranted",
            ),
            (
                K::AccessDenied,
                "access_denied",
                true,
                false,
                "AccessDenied",
            ),
            (K::Lockdown, "lockdown", false, false, "Lockdown"),
            (
                K::LockdownReleased,
                "lockdown_released",
                false,
                false,
                "LockdownReleased",
            ),
            (K::Drift, "drift", false, false, "Drift"),
            (
                K::LocalCodeCleared,
                "local_code_cleared",
                false,
                false,
                "LocalCodeCleared",
            ),
            (K::SetOnDevice, "set_on_device", false, false, "SetOnDevice"),
            (
                K::RemovedFromDevice,
                "removed_from_device",
                false,
                false,
                "RemovedFromDevice",
            ),
            (
                K::FailedToSetOnDevice,
                "failed_to_set_on_device",
                false,
                false,
                "FailedToSetOnDevice",
            ),
            (
                K::FailedToRemoveFromDevice,
                "failed_to_remove_from_device",
                false,
                false,
                "FailedToRemoveFromDevice",
            ),
            (
                K::DelayInSettingOnDevice,
                "delay_in_setting_on_device",
                false,
                false,
                "DelayInSettingOnDevice",
            ),
            (
                K::DelayInRemovingFromDevice,
                "delay_in_removing_from_device",
                false,
                false,
                "DelayInRemovingFromDevice",
            ),
            (
                K::ModifiedAtDevice,
                "modified_at_device",
                false,
                false,
                "ModifiedAtDevice",
            ),
            (
                K::WithheldOnDevice,
                "withheld_on_device",
                false,
                false,
                "WithheldOnDevice",
            ),
            (
                K::SlotIssueCleared,
                "slot_issue_cleared",
                false,
                false,
                "SlotIssueCleared",
            ),
            (
                K::SlotIssueRaised,
                "slot_issue_raised",
                false,
                false,
                "SlotIssueRaised",
            ),
            (K::ClockSkew, "clock_skew", false, false, "ClockSkew"),
            (
                K::ClockSkewCleared,
                "clock_skew_cleared",
                false,
                false,
                "ClockSkewCleared",
            ),
        ];
        assert_eq!(
            table.len(),
            EventKind::ALL.len(),
            "every kind is in the table"
        );
        for (kind, stored, device, panel, journal) in table {
            assert_eq!(kind.as_str(), stored);
            assert_eq!(EventKind::parse(stored), Some(kind), "{stored}");
            assert_eq!(kind.device_logged(), device, "{stored}");
            assert_eq!(kind.panel_only(), panel, "{stored}");
            let json = serde_json::to_string(&kind).expect("serializes");
            assert_eq!(json, format!("\"{journal}\""));
            assert_eq!(
                serde_json::from_str::<EventKind>(&json).expect("deserializes"),
                kind
            );
        }
        for unknown in ["", "Armed", "ARMED", "armed ", "unlocked"] {
            assert_eq!(EventKind::parse(unknown), None, "{unknown:?}");
        }
    }
}
