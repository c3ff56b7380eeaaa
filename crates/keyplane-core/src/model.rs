//! Device model profiles: what each supported device can hold.

use std::fmt;

/// The kind of a device at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// An alarm panel (VISTA-style): slots are user numbers.
    Panel,
    /// A Z-Wave door lock: slots are user code slots.
    Lock,
    /// An access-control door: slots are credential records.
    Door,
}

impl DeviceKind {
    /// Stable lower-case name, as stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Panel => "panel",
            DeviceKind::Lock => "lock",
            DeviceKind::Door => "door",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<DeviceKind> {
        match s {
            "panel" => Some(DeviceKind::Panel),
            "lock" => Some(DeviceKind::Lock),
            "door" => Some(DeviceKind::Door),
            _ => None,
        }
    }

    /// Whether a device of this kind belongs to one partition. A panel spans the
    /// site's partitions (each code names its own), so it has none.
    pub fn has_partition(self) -> bool {
        self != DeviceKind::Panel
    }

    /// A slot as shown to people, one way per kind everywhere (API, events, logs):
    /// panel user numbers always have 3 digits (`003`), lock and door slots are plain
    /// numbers (`3`).
    pub fn display_slot(self, slot: u16) -> String {
        match self {
            DeviceKind::Panel => format!("{slot:03}"),
            DeviceKind::Lock | DeviceKind::Door => slot.to_string(),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device model profile: capacity, reserved slots and code lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceModel {
    /// Profile id used in the API, e.g. `vista-128bpt`.
    pub id: &'static str,
    /// Human name of the model.
    pub title: &'static str,
    /// Device kind this model is.
    pub kind: DeviceKind,
    /// Lowest slot number.
    pub first_slot: u16,
    /// Highest slot number.
    pub last_slot: u16,
    /// Slots keyplane never assigns (user 001 is the panel installer).
    pub reserved_slots: &'static [u16],
    /// Shortest code the device accepts.
    pub min_code_length: u8,
    /// Longest code the device accepts.
    pub max_code_length: u8,
    /// Whether the device keeps schedules itself.
    pub on_device_schedules: bool,
    /// Partitions a panel supports (0 for locks and doors).
    pub max_partitions: u8,
}

impl DeviceModel {
    /// Whether a code of `len` digits fits this model.
    pub fn accepts_length(&self, len: usize) -> bool {
        len >= usize::from(self.min_code_length) && len <= usize::from(self.max_code_length)
    }

    /// Human description of the accepted code length, e.g. `4 digits` or `4..8 digits`.
    pub fn length_range(&self) -> String {
        if self.min_code_length == self.max_code_length {
            format!("{} digits", self.min_code_length)
        } else {
            format!("{}..{} digits", self.min_code_length, self.max_code_length)
        }
    }

    /// Whether `slot` is a slot of this model that keyplane may assign.
    pub fn is_assignable(&self, slot: u16) -> bool {
        slot >= self.first_slot && slot <= self.last_slot && !self.reserved_slots.contains(&slot)
    }

    /// Whether `slot` is reserved (user 001, the panel installer): keyplane never
    /// writes, clears nor reports it as a code of its own or a LOCAL one.
    pub fn is_reserved(&self, slot: u16) -> bool {
        self.reserved_slots.contains(&slot)
    }

    /// Number of slots keyplane may assign.
    pub fn assignable_count(&self) -> usize {
        (self.first_slot..=self.last_slot)
            .filter(|s| !self.reserved_slots.contains(s))
            .count()
    }

    /// The slot as shown to people: panel user numbers are always 3 digits (`002`).
    pub fn display_slot(&self, slot: u16) -> String {
        self.kind.display_slot(slot)
    }

    /// Looks a profile up by id.
    pub fn find(id: &str) -> Option<&'static DeviceModel> {
        MODELS.iter().find(|m| m.id == id)
    }

    /// The default profile for a kind, used when a create request names none.
    pub fn default_for(kind: DeviceKind) -> &'static DeviceModel {
        match kind {
            DeviceKind::Panel => &MODELS[0],
            DeviceKind::Lock => &MODELS[1],
            DeviceKind::Door => &MODELS[3],
        }
    }

    /// Every supported profile.
    pub fn all() -> &'static [DeviceModel] {
        MODELS
    }
}

static MODELS: &[DeviceModel] = &[
    DeviceModel {
        id: "vista-128bpt",
        title: "VISTA-128BPT-style alarm panel",
        kind: DeviceKind::Panel,
        first_slot: 1,
        last_slot: 150,
        reserved_slots: &[1],
        min_code_length: 4,
        max_code_length: 4,
        on_device_schedules: false,
        max_partitions: 8,
    },
    DeviceModel {
        id: "zwave-lock-30",
        title: "Generic Z-Wave keypad lock (30 slots)",
        kind: DeviceKind::Lock,
        first_slot: 1,
        last_slot: 30,
        reserved_slots: &[],
        min_code_length: 4,
        max_code_length: 8,
        on_device_schedules: true,
        max_partitions: 0,
    },
    DeviceModel {
        id: "zwave-lock-30-fixed4",
        title: "Z-Wave keypad lock requiring 4-digit codes in every slot (30 slots)",
        kind: DeviceKind::Lock,
        first_slot: 1,
        last_slot: 30,
        reserved_slots: &[],
        min_code_length: 4,
        max_code_length: 4,
        on_device_schedules: true,
        max_partitions: 0,
    },
    DeviceModel {
        id: "door-1000",
        title: "Access-control door controller (1000 credentials)",
        kind: DeviceKind::Door,
        first_slot: 1,
        last_slot: 1000,
        reserved_slots: &[],
        min_code_length: 4,
        max_code_length: 8,
        on_device_schedules: true,
        max_partitions: 0,
    },
    // Any lock with the User Code CC, driven through a Z-Wave JS server. The range is
    // what the CC allows (up to 250 user ids, codes of 4..10 digits); the agent's
    // driver reads the lock's own count and lengths and refuses what it lacks. The
    // agent installs and removes scheduled codes on time itself: keyplane does not
    // use the Schedule Entry Lock CC.
    DeviceModel {
        id: "zwave-js-lock",
        title: "Z-Wave keypad lock through Z-Wave JS (agent-kept schedules)",
        kind: DeviceKind::Lock,
        first_slot: 1,
        last_slot: 250,
        reserved_slots: &[],
        min_code_length: 4,
        max_code_length: 10,
        on_device_schedules: false,
        max_partitions: 0,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_consistent() {
        for m in DeviceModel::all() {
            assert!(m.first_slot <= m.last_slot, "{}", m.id);
            assert!(m.min_code_length <= m.max_code_length, "{}", m.id);
            assert!(
                m.reserved_slots
                    .iter()
                    .all(|s| *s >= m.first_slot && *s <= m.last_slot)
            );
            assert_eq!(DeviceModel::find(m.id), Some(m));
        }
        for kind in [DeviceKind::Panel, DeviceKind::Lock, DeviceKind::Door] {
            assert_eq!(DeviceModel::default_for(kind).kind, kind);
            assert_eq!(DeviceKind::parse(kind.as_str()), Some(kind));
        }
    }

    #[test]
    fn slots_show_one_way_per_kind() {
        let cases = [
            (DeviceKind::Panel, 3, "003"),
            (DeviceKind::Panel, 150, "150"),
            (DeviceKind::Lock, 3, "3"),
            (DeviceKind::Lock, 30, "30"),
            (DeviceKind::Door, 7, "7"),
            (DeviceKind::Door, 1000, "1000"),
        ];
        for (kind, slot, want) in cases {
            assert_eq!(kind.display_slot(slot), want, "{kind} {slot}");
        }
        for m in DeviceModel::all() {
            assert_eq!(m.display_slot(3), m.kind.display_slot(3), "{}", m.id);
        }
    }

    #[test]
    fn panel_capacity_and_display() {
        let panel = DeviceModel::find("vista-128bpt").expect("panel profile");
        // 150 user numbers, 001 is the installer.
        assert_eq!(panel.assignable_count(), 149);
        assert!(!panel.is_assignable(1));
        assert!(panel.is_assignable(2));
        assert!(!panel.is_assignable(151));
        assert_eq!(panel.display_slot(3), "003");
        assert_eq!(panel.display_slot(150), "150");
        assert_eq!(panel.length_range(), "4 digits");
    }

    #[test]
    fn code_length_table() {
        let lock = DeviceModel::find("zwave-lock-30").expect("lock");
        let fixed = DeviceModel::find("zwave-lock-30-fixed4").expect("fixed lock");
        let cases: &[(&DeviceModel, usize, bool)] = &[
            (lock, 3, false),
            (lock, 4, true),
            (lock, 8, true),
            (lock, 9, false),
            (fixed, 4, true),
            (fixed, 5, false),
        ];
        for (model, len, ok) in cases {
            assert_eq!(model.accepts_length(*len), *ok, "{} len {len}", model.id);
        }
        assert_eq!(lock.display_slot(7), "7");
        assert_eq!(lock.length_range(), "4..8 digits");
    }
}
