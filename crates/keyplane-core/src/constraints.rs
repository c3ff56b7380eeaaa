//! Device constraints: what a device accepts (slots, code lengths, code rules, whether
//! it reads codes back and keeps schedules), the check that names the failing
//! constraint, and a PIN generator that satisfies every device in a scope.
//!
//! A device's constraints start from its model profile; what the device reports about
//! itself in the agent's inventory overrides the profile field by field (a real lock
//! knows its slot count and code lengths better than a catalogue does).

use crate::model::{DeviceKind, DeviceModel};
use crate::pin::{MAX_PIN_LENGTH, Pin};
use std::collections::BTreeSet;
use std::fmt;

/// A rule some devices apply to codes, beyond keyplane's own guessability policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CodeRule {
    /// No digit appears twice anywhere in the code (`4841` is refused).
    NoRepeatedDigit,
    /// No three digits in a straight run up or down anywhere (`5123`, `9870`).
    NoStraightRun,
    /// No digit twice in a row (`4481`).
    NoAdjacentRepeat,
}

impl CodeRule {
    /// Every rule, in API order.
    pub const ALL: [CodeRule; 3] = [
        CodeRule::NoRepeatedDigit,
        CodeRule::NoStraightRun,
        CodeRule::NoAdjacentRepeat,
    ];

    /// Stable snake_case name, as in the API and in refusals.
    pub fn as_str(self) -> &'static str {
        match self {
            CodeRule::NoRepeatedDigit => "no_repeated_digit",
            CodeRule::NoStraightRun => "no_straight_run",
            CodeRule::NoAdjacentRepeat => "no_adjacent_repeat",
        }
    }

    /// What the rule refuses, for people (never the code itself).
    pub fn describe(self) -> &'static str {
        match self {
            CodeRule::NoRepeatedDigit => "a digit may appear only once",
            CodeRule::NoStraightRun => "no three digits may run straight up or down",
            CodeRule::NoAdjacentRepeat => "no digit may follow itself",
        }
    }

    /// Whether `digits` (values 0-9) satisfy the rule.
    fn allows(self, digits: &[u8]) -> bool {
        match self {
            CodeRule::NoRepeatedDigit => {
                let mut seen = [false; 10];
                digits.iter().all(|d| {
                    let first = !seen[usize::from(*d)];
                    seen[usize::from(*d)] = true;
                    first
                })
            }
            CodeRule::NoStraightRun => digits.windows(3).all(|w| {
                let (a, b, c) = (i16::from(w[0]), i16::from(w[1]), i16::from(w[2]));
                let (s1, s2) = (b - a, c - b);
                !(s1 == s2 && s1.abs() == 1)
            }),
            CodeRule::NoAdjacentRepeat => digits.windows(2).all(|w| w[0] != w[1]),
        }
    }

    /// Whether any code of `len` digits can satisfy the rule.
    fn possible_at(self, len: u8) -> bool {
        self != CodeRule::NoRepeatedDigit || len <= 10
    }
}

impl fmt::Display for CodeRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one device accepts, as published in the API and checked on every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConstraints {
    /// The device's kind.
    pub kind: DeviceKind,
    /// Lowest slot number.
    pub first_slot: u16,
    /// Highest slot number.
    pub last_slot: u16,
    /// Slots keyplane never assigns (user 001, the panel installer).
    pub reserved_slots: BTreeSet<u16>,
    /// Shortest code accepted.
    pub min_code_length: u8,
    /// Longest code accepted.
    pub max_code_length: u8,
    /// Whether the device reports codes in clear when read (false: masked).
    pub reads_back: bool,
    /// Whether the device keeps schedules itself.
    pub keeps_schedules: bool,
    /// Code rules of the device.
    pub rules: BTreeSet<CodeRule>,
    /// Whether any value came from the device's own report.
    pub reported: bool,
}

/// What a device reported about itself in the agent's inventory; None keeps the profile's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportedConstraints {
    /// Lowest slot number.
    pub first_slot: Option<u16>,
    /// Highest slot number.
    pub last_slot: Option<u16>,
    /// Slots the device keeps for itself.
    pub reserved_slots: Option<Vec<u16>>,
    /// Shortest code accepted.
    pub min_code_length: Option<u8>,
    /// Longest code accepted.
    pub max_code_length: Option<u8>,
    /// Whether codes read back in clear.
    pub reads_back: Option<bool>,
    /// Whether the device keeps schedules.
    pub keeps_schedules: Option<bool>,
    /// The device's code rules (replaces the profile's list).
    pub rules: Option<Vec<CodeRule>>,
}

/// Why a device's report was not taken; the profile's constraints stay in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The slot range is empty.
    #[error("reported slot range {first}..{last} is empty")]
    SlotRange {
        /// Reported or kept first slot.
        first: u16,
        /// Reported or kept last slot.
        last: u16,
    },
    /// The code length range is empty or beyond what keyplane handles.
    #[error("reported code lengths {min}..{max} are not within 1..{MAX_PIN_LENGTH}")]
    LengthRange {
        /// Reported or kept shortest length.
        min: u8,
        /// Reported or kept longest length.
        max: u8,
    },
    /// A reserved slot outside the slot range.
    #[error("reported reserved slot {0} is outside the slot range")]
    Reserved(u16),
}

/// The constraint a code or a request breaks, named as in the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// The code's length is outside the device's range.
    CodeLength {
        /// Length of the refused code.
        len: usize,
        /// Shortest accepted.
        min: u8,
        /// Longest accepted.
        max: u8,
    },
    /// The code breaks one of the device's code rules.
    Rule(CodeRule),
    /// Every assignable slot is taken.
    NoFreeSlot {
        /// Assignable slots of the device.
        total: usize,
    },
}

impl Violation {
    /// The constraint's API name (`code_length`, `no_straight_run`, `slots_free`).
    pub fn constraint(&self) -> &'static str {
        match self {
            Violation::CodeLength { .. } => "code_length",
            Violation::Rule(rule) => rule.as_str(),
            Violation::NoFreeSlot { .. } => "slots_free",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::CodeLength { len, min, max } if min == max => {
                write!(
                    f,
                    "code_length: a {len}-digit code does not fit; it accepts {min} digits"
                )
            }
            Violation::CodeLength { len, min, max } => write!(
                f,
                "code_length: a {len}-digit code does not fit; it accepts {min}..{max} digits"
            ),
            Violation::Rule(rule) => write!(f, "{rule}: {}", rule.describe()),
            Violation::NoFreeSlot { total } => {
                write!(f, "slots_free: all {total} assignable slots are in use")
            }
        }
    }
}

/// A request refused by a device's constraint; names the device and the constraint,
/// never the code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device} refuses it: {violation}")]
pub struct ConstraintError {
    /// The device, as its resource name or display name.
    pub device: String,
    /// The broken constraint.
    pub violation: Violation,
}

/// Slots of a device as published: total assignable, in use, free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCapacity {
    /// Slots keyplane may assign (the range minus reserved slots).
    pub total: usize,
    /// Assignable slots occupied (keyplane's codes and codes programmed at the device).
    pub used: usize,
    /// Assignable slots free.
    pub free: usize,
}

impl DeviceConstraints {
    /// The constraints of a model profile.
    pub fn from_model(model: &DeviceModel) -> DeviceConstraints {
        DeviceConstraints {
            kind: model.kind,
            first_slot: model.first_slot,
            last_slot: model.last_slot,
            reserved_slots: model.reserved_slots.iter().copied().collect(),
            min_code_length: model.min_code_length,
            max_code_length: model.max_code_length,
            // The profiles' devices report codes in clear; a masking device says so
            // in its inventory.
            reads_back: true,
            keeps_schedules: model.on_device_schedules,
            rules: BTreeSet::new(),
            reported: false,
        }
    }

    /// These constraints with what the device reported laid over them, field by field.
    /// A report that makes no sense is refused whole.
    pub fn with_reported(&self, r: &ReportedConstraints) -> Result<DeviceConstraints, ReportError> {
        let mut c = self.clone();
        c.first_slot = r.first_slot.unwrap_or(c.first_slot);
        c.last_slot = r.last_slot.unwrap_or(c.last_slot);
        if let Some(reserved) = &r.reserved_slots {
            c.reserved_slots = reserved.iter().copied().collect();
        }
        c.min_code_length = r.min_code_length.unwrap_or(c.min_code_length);
        c.max_code_length = r.max_code_length.unwrap_or(c.max_code_length);
        c.reads_back = r.reads_back.unwrap_or(c.reads_back);
        c.keeps_schedules = r.keeps_schedules.unwrap_or(c.keeps_schedules);
        if let Some(rules) = &r.rules {
            c.rules = rules.iter().copied().collect();
        }
        c.reported = *r != ReportedConstraints::default();
        if c.first_slot > c.last_slot {
            return Err(ReportError::SlotRange {
                first: c.first_slot,
                last: c.last_slot,
            });
        }
        if c.min_code_length == 0
            || c.min_code_length > c.max_code_length
            || usize::from(c.max_code_length) > MAX_PIN_LENGTH
        {
            return Err(ReportError::LengthRange {
                min: c.min_code_length,
                max: c.max_code_length,
            });
        }
        if let Some(s) = c
            .reserved_slots
            .iter()
            .find(|s| **s < c.first_slot || **s > c.last_slot)
        {
            return Err(ReportError::Reserved(*s));
        }
        Ok(c)
    }

    /// Whether keyplane may assign `slot`.
    pub fn is_assignable(&self, slot: u16) -> bool {
        slot >= self.first_slot && slot <= self.last_slot && !self.reserved_slots.contains(&slot)
    }

    /// The lowest assignable slot not in `occupied`: the allocator, on these constraints.
    pub fn lowest_free_slot(&self, occupied: &BTreeSet<u16>) -> Option<u16> {
        (self.first_slot..=self.last_slot).find(|s| self.is_assignable(*s) && !occupied.contains(s))
    }

    /// Total, used and free assignable slots, given the occupied slots.
    pub fn capacity(&self, occupied: &BTreeSet<u16>) -> SlotCapacity {
        let total = (self.first_slot..=self.last_slot)
            .filter(|s| !self.reserved_slots.contains(s))
            .count();
        let used = occupied.iter().filter(|s| self.is_assignable(**s)).count();
        SlotCapacity {
            total,
            used,
            free: total - used,
        }
    }

    /// Whether a code of `len` digits fits.
    pub fn accepts_length(&self, len: usize) -> bool {
        len >= usize::from(self.min_code_length) && len <= usize::from(self.max_code_length)
    }

    /// Checks `pin` against the length range and every code rule.
    pub fn check_pin(&self, pin: &Pin) -> Result<(), Violation> {
        if !self.accepts_length(pin.len()) {
            return Err(Violation::CodeLength {
                len: pin.len(),
                min: self.min_code_length,
                max: self.max_code_length,
            });
        }
        let digits = digits(pin);
        match self.rules.iter().find(|r| !r.allows(&digits)) {
            Some(rule) => Err(Violation::Rule(*rule)),
            None => Ok(()),
        }
    }

    /// Checks a new code can get a slot, given the occupied slots.
    pub fn check_space(&self, occupied: &BTreeSet<u16>) -> Result<(), Violation> {
        let capacity = self.capacity(occupied);
        if capacity.free == 0 {
            Err(Violation::NoFreeSlot {
                total: capacity.total,
            })
        } else {
            Ok(())
        }
    }
}

fn digits(pin: &Pin) -> Vec<u8> {
    pin.expose().bytes().map(|b| b - b'0').collect()
}

/// Checks `pin` against every device in scope; the first refusal names its device.
pub fn check_scope(scope: &[(&str, &DeviceConstraints)], pin: &Pin) -> Result<(), ConstraintError> {
    for (device, c) in scope {
        c.check_pin(pin).map_err(|violation| ConstraintError {
            device: (*device).to_owned(),
            violation,
        })?;
    }
    Ok(())
}

/// A source of uniform random numbers; a closure `FnMut(u32) -> u32` is one.
pub trait RandomSource {
    /// A number uniformly drawn from `0..n` (n >= 1).
    fn below(&mut self, n: u32) -> u32;
}

impl<F: FnMut(u32) -> u32> RandomSource for F {
    fn below(&mut self, n: u32) -> u32 {
        self(n)
    }
}

/// Generated codes have this many digits when the scope allows and the request names none.
pub const DEFAULT_GENERATED_LENGTH: u8 = 6;

/// Draws before the generator gives up; with the rules keyplane knows, a fitting code
/// is found within a handful of draws, so reaching this means the space is nearly empty.
pub const MAX_GENERATION_DRAWS: usize = 10_000;

/// Why no code could be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    /// Nothing in scope.
    #[error("a generated code needs at least one device in scope")]
    NoDevices,
    /// The devices in scope share no code length.
    #[error("the devices in scope share no code length ({0}); narrow the scope")]
    NoCommonLength(String),
    /// The requested length does not fit a device.
    #[error(transparent)]
    Length(ConstraintError),
    /// A rule cannot be met at the length (e.g. ten digits each used once at most).
    #[error("device {device} refuses every {len}-digit code: {rule}: {}", rule.describe())]
    Impossible {
        /// The device.
        device: String,
        /// The rule no code of that length meets.
        rule: CodeRule,
        /// The length.
        len: u8,
    },
    /// No fitting, unused code was drawn.
    #[error("no unused {len}-digit code fits every device in scope; try another length")]
    Exhausted {
        /// The length tried.
        len: u8,
    },
}

/// Generates a code that fits every device in `scope` (length, code rules), passes
/// keyplane's guessability policy and `is_free` (unused on those devices). Uniform over
/// the allowed codes of the chosen length: digits are drawn uniformly and a code that
/// breaks anything is drawn again. `length` None picks [`DEFAULT_GENERATED_LENGTH`],
/// clamped to the lengths every device accepts.
pub fn generate_pin(
    scope: &[(&str, &DeviceConstraints)],
    length: Option<u8>,
    is_free: impl Fn(&Pin) -> bool,
    rng: &mut impl RandomSource,
) -> Result<Pin, GenerateError> {
    let (Some(min), Some(max)) = (
        scope.iter().map(|(_, c)| c.min_code_length).max(),
        scope.iter().map(|(_, c)| c.max_code_length).min(),
    ) else {
        return Err(GenerateError::NoDevices);
    };
    let len = match length {
        Some(len) => {
            for (device, c) in scope {
                if !c.accepts_length(usize::from(len)) {
                    return Err(GenerateError::Length(ConstraintError {
                        device: (*device).to_owned(),
                        violation: Violation::CodeLength {
                            len: usize::from(len),
                            min: c.min_code_length,
                            max: c.max_code_length,
                        },
                    }));
                }
            }
            len
        }
        None if min <= max => DEFAULT_GENERATED_LENGTH.clamp(min, max),
        None => {
            let ranges: Vec<String> = scope
                .iter()
                .map(|(d, c)| format!("{d}: {}..{}", c.min_code_length, c.max_code_length))
                .collect();
            return Err(GenerateError::NoCommonLength(ranges.join(", ")));
        }
    };
    for (device, c) in scope {
        if let Some(rule) = c.rules.iter().find(|r| !r.possible_at(len)) {
            return Err(GenerateError::Impossible {
                device: (*device).to_owned(),
                rule: *rule,
                len,
            });
        }
    }
    for _ in 0..MAX_GENERATION_DRAWS {
        let raw: String = (0..len).map(|_| char::from(b'0' + digit(rng))).collect();
        let Ok(pin) = Pin::parse(&raw) else {
            continue;
        };
        if pin.check_not_guessable().is_ok() && check_scope(scope, &pin).is_ok() && is_free(&pin) {
            return Ok(pin);
        }
    }
    Err(GenerateError::Exhausted { len })
}

/// One uniform digit; a source answering out of range is folded back, never trusted.
fn digit(rng: &mut impl RandomSource) -> u8 {
    u8::try_from(rng.below(10) % 10).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type Scope<'a> = Vec<(&'a str, &'a DeviceConstraints)>;

    fn profile(id: &str) -> DeviceConstraints {
        DeviceConstraints::from_model(DeviceModel::find(id).expect("profile"))
    }

    fn pin(raw: &str) -> Pin {
        Pin::parse(raw).expect("digits")
    }

    /// A deterministic xorshift source.
    fn seeded(mut state: u64) -> impl FnMut(u32) -> u32 {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            u32::try_from(state % u64::from(n)).unwrap_or(0)
        }
    }

    /// Replays the digits of `codes`, in order.
    fn scripted(codes: &[&str]) -> impl FnMut(u32) -> u32 {
        let mut digits: Vec<u32> = codes
            .iter()
            .flat_map(|c| c.bytes().map(|b| u32::from(b - b'0')))
            .collect();
        digits.reverse();
        move |_| digits.pop().expect("script long enough")
    }

    #[test]
    fn profiles_and_reports() {
        let lock = profile("zwave-lock-30");
        assert_eq!((lock.first_slot, lock.last_slot), (1, 30));
        assert!(lock.keeps_schedules && lock.reads_back && !lock.reported);
        let panel = profile("vista-128bpt");
        assert_eq!(panel.reserved_slots, [1].into());

        let real = ReportedConstraints {
            last_slot: Some(250),
            min_code_length: Some(6),
            reads_back: Some(false),
            rules: Some(vec![CodeRule::NoStraightRun]),
            ..ReportedConstraints::default()
        };
        let merged = lock.with_reported(&real).expect("sane");
        assert_eq!(merged.last_slot, 250);
        assert_eq!((merged.min_code_length, merged.max_code_length), (6, 8));
        assert!(!merged.reads_back && merged.keeps_schedules && merged.reported);
        assert_eq!(merged.rules, [CodeRule::NoStraightRun].into());
        assert_eq!(
            lock.with_reported(&ReportedConstraints::default()),
            Ok(lock.clone())
        );

        let bad: &[(ReportedConstraints, ReportError)] = &[
            (
                ReportedConstraints {
                    first_slot: Some(40),
                    ..ReportedConstraints::default()
                },
                ReportError::SlotRange {
                    first: 40,
                    last: 30,
                },
            ),
            (
                ReportedConstraints {
                    min_code_length: Some(9),
                    ..ReportedConstraints::default()
                },
                ReportError::LengthRange { min: 9, max: 8 },
            ),
            (
                ReportedConstraints {
                    max_code_length: Some(13),
                    ..ReportedConstraints::default()
                },
                ReportError::LengthRange { min: 4, max: 13 },
            ),
            (
                ReportedConstraints {
                    min_code_length: Some(0),
                    ..ReportedConstraints::default()
                },
                ReportError::LengthRange { min: 0, max: 8 },
            ),
            (
                ReportedConstraints {
                    reserved_slots: Some(vec![31]),
                    ..ReportedConstraints::default()
                },
                ReportError::Reserved(31),
            ),
        ];
        for (report, want) in bad {
            assert_eq!(lock.with_reported(report).as_ref(), Err(want), "{report:?}");
        }
    }

    #[test]
    fn capacity_and_allocation_follow_reports() {
        let panel = profile("vista-128bpt");
        let used: BTreeSet<u16> = [1, 2, 3].into();
        assert_eq!(
            panel.capacity(&used),
            SlotCapacity {
                total: 149,
                used: 2,
                free: 147
            }
        );
        assert_eq!(panel.lowest_free_slot(&used), Some(4));
        let small = profile("zwave-lock-30")
            .with_reported(&ReportedConstraints {
                last_slot: Some(4),
                reserved_slots: Some(vec![1]),
                ..ReportedConstraints::default()
            })
            .expect("sane");
        let full: BTreeSet<u16> = [2, 3, 4].into();
        assert_eq!(small.lowest_free_slot(&[2].into()), Some(3));
        assert_eq!(small.lowest_free_slot(&full), None);
        assert_eq!(
            small.check_space(&full),
            Err(Violation::NoFreeSlot { total: 3 })
        );
        assert_eq!(small.check_space(&[2].into()), Ok(()));
    }

    #[test]
    fn rules_table() {
        let cases: &[(&str, CodeRule, bool)] = &[
            ("4821", CodeRule::NoRepeatedDigit, true),
            ("4841", CodeRule::NoRepeatedDigit, false),
            ("0123456789", CodeRule::NoRepeatedDigit, true),
            ("5123", CodeRule::NoStraightRun, false),
            ("9870", CodeRule::NoStraightRun, false),
            ("1357", CodeRule::NoStraightRun, true),
            ("9012", CodeRule::NoStraightRun, false),
            ("8902", CodeRule::NoStraightRun, true),
            ("1213", CodeRule::NoStraightRun, true),
            ("4481", CodeRule::NoAdjacentRepeat, false),
            ("4841", CodeRule::NoAdjacentRepeat, true),
        ];
        for (raw, rule, ok) in cases {
            assert_eq!(rule.allows(&digits(&pin(raw))), *ok, "{raw} {rule}");
        }
        let names: BTreeSet<&str> = CodeRule::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), CodeRule::ALL.len());
    }

    #[test]
    fn check_names_the_constraint_never_the_code() {
        let lock = profile("zwave-lock-30")
            .with_reported(&ReportedConstraints {
                rules: Some(vec![CodeRule::NoStraightRun, CodeRule::NoRepeatedDigit]),
                ..ReportedConstraints::default()
            })
            .expect("sane");
        let panel = profile("vista-128bpt");
        let scope = [("front door", &lock), ("panel", &panel)];
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("4821", None),
            ("482", Some(("front door", "code_length"))),
            ("48217", Some(("panel", "code_length"))),
            ("5123", Some(("front door", "no_straight_run"))),
            ("4841", Some(("front door", "no_repeated_digit"))),
        ];
        for (raw, want) in cases {
            let got = check_scope(&scope, &pin(raw));
            match (got, want) {
                (Ok(()), None) => {}
                (Err(e), Some((device, constraint))) => {
                    assert_eq!(e.device, *device, "{raw}");
                    assert_eq!(e.violation.constraint(), *constraint, "{raw}");
                    let msg = e.to_string();
                    assert!(msg.contains(device) && msg.contains(constraint), "{msg}");
                    assert!(!msg.contains(raw), "{msg}");
                }
                (got, want) => panic!("{raw}: got {got:?}, want {want:?}"),
            }
        }
        let msg = check_scope(&scope, &pin("48217"))
            .expect_err("too long")
            .to_string();
        assert_eq!(
            msg,
            "device panel refuses it: code_length: a 5-digit code does not fit; it accepts 4 digits"
        );
    }

    #[test]
    fn generator_table() {
        let panel = profile("vista-128bpt");
        let lock = profile("zwave-lock-30");
        let door = profile("door-1000");
        let picky = lock
            .with_reported(&ReportedConstraints {
                rules: Some(vec![CodeRule::NoRepeatedDigit, CodeRule::NoStraightRun]),
                ..ReportedConstraints::default()
            })
            .expect("sane");
        let six = lock
            .with_reported(&ReportedConstraints {
                min_code_length: Some(6),
                ..ReportedConstraints::default()
            })
            .expect("sane");
        let free = |_: &Pin| true;

        // Draws that break something are drawn again, in order.
        let cases: &[(&str, Scope, &[&str], &str)] = &[
            (
                "panel and lock: 4 digits",
                vec![("p", &panel), ("l", &lock)],
                &["4821"],
                "4821",
            ),
            (
                "lock alone: 6 digits",
                vec![("l", &lock)],
                &["482193"],
                "482193",
            ),
            (
                "guessable drawn again",
                vec![("p", &panel)],
                &["1234", "0000", "4140", "9930"],
                "9930",
            ),
            (
                "device rules drawn again",
                vec![("p", &panel), ("l", &picky)],
                &["4841", "5123", "4821"],
                "4821",
            ),
            (
                "door and a six-digit lock",
                vec![("d", &door), ("l", &six)],
                &["918273"],
                "918273",
            ),
        ];
        for (what, scope, script, want) in cases {
            let got = generate_pin(scope, None, free, &mut scripted(script)).expect(what);
            assert_eq!(got.expose(), *want, "{what}");
        }

        let taken = |p: &Pin| p.expose() != "4821";
        let got = generate_pin(
            &[("p", &panel)],
            None,
            taken,
            &mut scripted(&["4821", "5931"]),
        );
        assert_eq!(got.map(|p| p.expose().to_owned()), Ok("5931".to_owned()));

        let refusals: Vec<(&str, Scope, Option<u8>, &str)> = vec![
            ("empty", vec![], None, "at least one device"),
            (
                "no common length",
                vec![("panel", &panel), ("lock", &six)],
                None,
                "share no code length",
            ),
            (
                "length refused",
                vec![("panel", &panel)],
                Some(6),
                "device panel refuses it: code_length",
            ),
        ];
        for (what, scope, len, want) in refusals {
            let err = generate_pin(&scope, len, free, &mut seeded(1)).expect_err(what);
            assert!(err.to_string().contains(want), "{what}: {err}");
        }
        let long = lock
            .with_reported(&ReportedConstraints {
                max_code_length: Some(12),
                rules: Some(vec![CodeRule::NoRepeatedDigit]),
                ..ReportedConstraints::default()
            })
            .expect("sane");
        assert_eq!(
            generate_pin(&[("l", &long)], Some(11), free, &mut seeded(1)),
            Err(GenerateError::Impossible {
                device: "l".into(),
                rule: CodeRule::NoRepeatedDigit,
                len: 11
            })
        );
        assert_eq!(
            generate_pin(&[("p", &panel)], None, free, &mut |_| 7),
            Err(GenerateError::Exhausted { len: 4 })
        );
    }

    #[test]
    fn generated_codes_fit_every_device_and_spread_evenly() {
        let lock = profile("zwave-lock-30");
        let picky = lock
            .with_reported(&ReportedConstraints {
                rules: Some(CodeRule::ALL.to_vec()),
                ..ReportedConstraints::default()
            })
            .expect("sane");
        let panel = profile("vista-128bpt");
        let scope = [("panel", &panel), ("lock", &picky)];
        let mut rng = seeded(0x9e37_79b9_7f4a_7c15);
        for _ in 0..500 {
            let pin = generate_pin(&scope, None, |_| true, &mut rng).expect("fits");
            assert!(check_scope(&scope, &pin).is_ok());
            assert!(pin.check_not_guessable().is_ok());
        }

        // Two-digit codes, no digit twice in a row: 90 codes, minus the 18 straight
        // runs keyplane refuses, leave 72. Each should come up about as often.
        let tiny = DeviceConstraints {
            min_code_length: 2,
            max_code_length: 2,
            rules: [CodeRule::NoAdjacentRepeat].into(),
            ..lock.clone()
        };
        let draws = 72 * 200;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..draws {
            let pin = generate_pin(&[("t", &tiny)], None, |_| true, &mut rng).expect("fits");
            *counts.entry(pin.expose().to_owned()).or_default() += 1;
        }
        assert_eq!(counts.len(), 72);
        for (code, n) in &counts {
            assert!((120..=280).contains(n), "{code} drawn {n} times");
        }
    }
}
