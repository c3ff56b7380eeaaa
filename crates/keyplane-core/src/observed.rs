//! What an agent reports about a slot it read back: how what the device holds
//! compares with what keyplane wrote and wants there.

use crate::DeviceModel;
use std::collections::BTreeSet;

/// How one slot of a device compares with what keyplane wrote there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotFinding {
    /// Holds the code keyplane wrote.
    Managed,
    /// Occupied, but the device masks codes: whether it is keyplane's cannot be told.
    Unverifiable,
    /// Keyplane wrote a code here and the device now holds another.
    Drifted,
    /// Keyplane wrote a code here and the slot is now empty.
    Missing,
    /// A code keyplane never wrote (programmed at the device): a LOCAL code.
    Foreign,
    /// A code keyplane never wrote here, equal to one keyplane wants on the device.
    Conflict,
}

/// Classifies `slot` of a device of `model`. `written` is the code keyplane wrote
/// there, `observed` what the device reported (`None`: empty; `Some(None)`: occupied,
/// code masked), `wanted` every code keyplane wants on the device (a set: a device
/// with thousands of slots is classified in O(n log n)). `None` means the
/// slot is not reported at all: it is empty and keyplane wrote nothing there, or it
/// is a reserved slot (the installer's user 001), which is the device's own and
/// never a LOCAL code to claim or clear.
pub fn classify_slot(
    model: &DeviceModel,
    slot: u16,
    written: Option<&str>,
    observed: Option<Option<&str>>,
    wanted: &BTreeSet<&str>,
) -> Option<SlotFinding> {
    if model.is_reserved(slot) {
        return None;
    }
    Some(match (written, observed) {
        (None, None) => return None,
        (Some(_), None) => SlotFinding::Missing,
        (Some(_), Some(None)) => SlotFinding::Unverifiable,
        (Some(w), Some(Some(c))) if c == w => SlotFinding::Managed,
        (Some(_), Some(Some(_))) => SlotFinding::Drifted,
        (None, Some(Some(c))) if wanted.contains(c) => SlotFinding::Conflict,
        (None, Some(_)) => SlotFinding::Foreign,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotFinding::*;

    #[test]
    fn classification_table() {
        let panel = DeviceModel::find("vista-128bpt").expect("panel");
        let lock = DeviceModel::find("zwave-lock-30").expect("lock");
        let wanted = BTreeSet::from(["5931"]);
        type Case<'a> = (
            &'a str,
            &'a DeviceModel,
            u16,
            Option<&'a str>,
            Option<Option<&'a str>>,
            Option<SlotFinding>,
        );
        let cases: &[Case] = &[
            ("empty, never written", lock, 3, None, None, None),
            (
                "ours, intact",
                lock,
                3,
                Some("4821"),
                Some(Some("4821")),
                Some(Managed),
            ),
            (
                "ours, changed",
                lock,
                3,
                Some("4821"),
                Some(Some("1357")),
                Some(Drifted),
            ),
            ("ours, cleared", lock, 3, Some("4821"), None, Some(Missing)),
            (
                "ours, masked",
                lock,
                3,
                Some("4821"),
                Some(None),
                Some(Unverifiable),
            ),
            (
                "hand-programmed",
                lock,
                3,
                None,
                Some(Some("1357")),
                Some(Foreign),
            ),
            (
                "hand-programmed, masked",
                lock,
                3,
                None,
                Some(None),
                Some(Foreign),
            ),
            (
                "hand-programmed, a code we want",
                lock,
                3,
                None,
                Some(Some("5931")),
                Some(Conflict),
            ),
            (
                "panel user 002 by hand",
                panel,
                2,
                None,
                Some(Some("1357")),
                Some(Foreign),
            ),
            (
                "installer code 001",
                panel,
                1,
                None,
                Some(Some("4140")),
                None,
            ),
            (
                "installer code 001, masked",
                panel,
                1,
                None,
                Some(None),
                None,
            ),
            (
                "installer code 001, repeating a wanted code",
                panel,
                1,
                None,
                Some(Some("5931")),
                None,
            ),
            (
                "installer slot gone empty",
                panel,
                1,
                Some("4140"),
                None,
                None,
            ),
            (
                "installer slot changed",
                panel,
                1,
                Some("4140"),
                Some(Some("1357")),
                None,
            ),
            (
                "slot 1 of a lock is not reserved",
                lock,
                1,
                None,
                Some(Some("1357")),
                Some(Foreign),
            ),
        ];
        for (what, model, slot, written, observed, want) in cases {
            assert_eq!(
                classify_slot(model, *slot, *written, *observed, &wanted),
                *want,
                "{what}"
            );
        }
    }
}
