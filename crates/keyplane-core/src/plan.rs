//! The planner: what a device should hold versus what keyplane last wrote to it,
//! turned into the writes that close the gap.

use crate::authority::Level;
use std::collections::{BTreeMap, BTreeSet};

/// What keyplane wants in one slot.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct DesiredCode {
    /// The credential the slot belongs to (its resource name).
    pub credential: String,
    /// The code, digits only.
    pub pin: String,
    /// Panels: the user's level per partition for this user number.
    pub authorities: Vec<(u8, Level)>,
    /// Panels: open/close reporting for this user number.
    pub open_close: bool,
    /// Devices that keep schedules: when the code opens (None: always).
    pub schedules: Option<Vec<crate::schedule::Schedule>>,
    /// Devices that keep schedules: the IANA zone `schedules` are read in (empty
    /// for a code without one). Part of what is written, so a new site zone
    /// re-times every scheduled code.
    pub time_zone: String,
    /// Bumped by keyplaned to have the code written again (drift re-applied).
    pub generation: i64,
}

impl std::fmt::Debug for DesiredCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesiredCode")
            .field("credential", &self.credential)
            .field("pin", &"<redacted>")
            .field("authorities", &self.authorities)
            .field("open_close", &self.open_close)
            .field("schedules", &self.schedules)
            .field("time_zone", &self.time_zone)
            .finish()
    }
}

/// One write to a device.
#[derive(Clone, PartialEq, Eq)]
pub enum SlotAction {
    /// Write `pin` into `slot`.
    Set {
        /// Target slot.
        slot: u16,
        /// What the slot should hold afterwards.
        code: DesiredCode,
    },
    /// Clear `slot`, which keyplane wrote earlier.
    Clear {
        /// Target slot.
        slot: u16,
    },
}

impl std::fmt::Debug for SlotAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotAction::Set { slot, code } => write!(f, "Set(slot {slot}, {})", code.credential),
            SlotAction::Clear { slot } => write!(f, "Clear(slot {slot})"),
        }
    }
}

/// Plans the writes that make a device hold `desired`, given what keyplane `written`
/// to it before. Slots keyplane never wrote are not touched: codes programmed at the
/// device are not ours to clear. Clears come first so a code moving between slots
/// never collides with itself on devices that refuse duplicates. O(n log n) in the
/// slots: a full door is thousands of them.
pub fn plan_device(
    desired: &BTreeMap<u16, DesiredCode>,
    written: &BTreeMap<u16, DesiredCode>,
) -> Vec<SlotAction> {
    let clears = written
        .keys()
        .filter(|slot| !desired.contains_key(slot))
        .map(|slot| SlotAction::Clear { slot: *slot });
    // A slot whose old code is wanted in another slot is cleared first, or the device
    // would refuse the other slot's write as a duplicate. (A slot's old code differs
    // from its new one, so a desired slot holding it is another slot.)
    let desired_pins: BTreeSet<&str> = desired.values().map(|d| d.pin.as_str()).collect();
    let old_code_moves = |slot: &u16, code: &DesiredCode| {
        written
            .get(slot)
            .is_some_and(|w| w.pin != code.pin && desired_pins.contains(w.pin.as_str()))
    };
    let clears_before_change = desired
        .iter()
        .filter(|(slot, code)| old_code_moves(slot, code))
        .map(|(slot, _)| SlotAction::Clear { slot: *slot });
    let sets = desired
        .iter()
        .filter(|(slot, code)| written.get(slot) != Some(code))
        .map(|(slot, code)| SlotAction::Set {
            slot: *slot,
            code: code.clone(),
        });
    clears.chain(clears_before_change).chain(sets).collect()
}

/// Settles clears the device accepted against a read-back of its occupied slots:
/// (confirmed, unconfirmed). A slot still occupied is unconfirmed, and so is every
/// clear when the device could not be read back (`occupied` None): a revocation is
/// acked only once the device is seen without the code.
pub fn settle_clears(
    cleared: &[u16],
    occupied: Option<&std::collections::BTreeSet<u16>>,
) -> (Vec<u16>, Vec<u16>) {
    cleared
        .iter()
        .partition(|slot| occupied.is_some_and(|held| !held.contains(slot)))
}

/// What a read-back says of a code the device accepted (see [`settle_writes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCheck {
    /// The device holds the code: journaled as written, reported done, acked.
    Confirmed,
    /// The slot reads occupied but masked: whether it holds the code cannot be
    /// told, so it is journaled as written (the read-back says `state_unconfirmed`).
    Unverifiable,
    /// The slot reads empty or holds another code: the device answered the write
    /// and did not keep it (a lost write). Not journaled as written and not acked:
    /// reported unconfirmed, and the next pass writes it again.
    Lost,
    /// The device could not be read back: not journaled and not acked; the next
    /// pass reads the device before planning, so a write that landed is adopted
    /// and only a lost one is written again.
    Unread,
}

impl WriteCheck {
    /// Whether the write is journaled as written (the slot holds keyplane's code).
    pub fn journaled(self) -> bool {
        matches!(self, WriteCheck::Confirmed | WriteCheck::Unverifiable)
    }
}

/// Settles the codes a device accepted (slot, code) against a read-back of it
/// (`read`: slot -> code, None for a masked slot; None when it could not be read):
/// a write is acked only once the device is seen holding it, so a device that
/// acknowledges a write and drops it is written again on the next pass instead of
/// showing the code as drifted away.
pub fn settle_writes(
    written: &[(u16, &str)],
    read: Option<&BTreeMap<u16, Option<String>>>,
) -> Vec<(u16, WriteCheck)> {
    written
        .iter()
        .map(|(slot, pin)| {
            let check = match read.map(|r| r.get(slot)) {
                None => WriteCheck::Unread,
                Some(Some(Some(held))) if held == pin => WriteCheck::Confirmed,
                Some(Some(None)) => WriteCheck::Unverifiable,
                Some(_) => WriteCheck::Lost,
            };
            (*slot, check)
        })
        .collect()
}

/// When a code may be on a device, besides its schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Validity {
    /// Not before this instant (None: no start).
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// Not from this instant on (None: no end).
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

/// The form of `code` that belongs on a device at `now`, or None when it belongs
/// nowhere now: a temporary code only within its validity; a scheduled code only
/// while one of its schedules is open in `zone`, unless the device keeps schedules
/// itself (then it gets the code with its schedules and `zone`, so a new zone is a
/// change to write). An unknown zone fails closed: a scheduled code is kept off.
pub fn code_due(
    code: &DesiredCode,
    validity: Validity,
    zone: &str,
    now: chrono::DateTime<chrono::Utc>,
    device_keeps_schedules: bool,
) -> Option<DesiredCode> {
    if validity.from.is_some_and(|f| now < f) || validity.until.is_some_and(|u| now >= u) {
        return None;
    }
    let open = match &code.schedules {
        None => true,
        Some(_) if device_keeps_schedules => true,
        Some(s) => crate::schedule::parse_time_zone(zone)
            .is_ok_and(|tz| crate::schedule::any_open(s, tz, now)),
    };
    if !open {
        return None;
    }
    let mut due = code.clone();
    if !device_keeps_schedules {
        due.schedules = None;
    }
    due.time_zone = if due.schedules.is_some() {
        zone.to_owned()
    } else {
        String::new()
    };
    Some(due)
}

/// Whether a device already holds `code` in a slot that reads back `observed`
/// (None: not read; `Some(None)`: occupied, code masked), so writing it again is
/// not needed (a hand-programmed code claimed, a drift adopted, or a write that
/// landed just before a crash). Only a code the read-back can show whole counts:
/// never a panel's (its levels are not read back) nor one with schedules.
pub fn already_held(is_panel: bool, code: &DesiredCode, observed: Option<&Option<String>>) -> bool {
    !is_panel && code.schedules.is_none() && matches!(observed, Some(Some(p)) if *p == code.pin)
}

/// Splits the slots keyplaned asked to clear although keyplane never wrote them
/// (codes programmed at the device) into (clear on the device, forget at once):
/// a slot the last read-back shows empty needs no write; with no read-back yet,
/// every one is cleared. Slots keyplane wrote are left to the planner.
pub fn local_clears(
    remove_local: &std::collections::BTreeSet<u16>,
    written: &BTreeMap<u16, DesiredCode>,
    observed: Option<&BTreeMap<u16, Option<String>>>,
) -> (Vec<u16>, Vec<u16>) {
    remove_local
        .iter()
        .filter(|s| !written.contains_key(s))
        .partition(|s| observed.is_none_or(|o| o.contains_key(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(cred: &str, pin: &str) -> DesiredCode {
        DesiredCode {
            credential: cred.into(),
            pin: pin.into(),
            ..DesiredCode::default()
        }
    }

    type Table = BTreeMap<u16, DesiredCode>;

    #[test]
    fn clears_settle_only_when_the_read_back_shows_the_slot_empty() {
        use std::collections::BTreeSet;
        let held = |s: &[u16]| s.iter().copied().collect::<BTreeSet<u16>>();
        type Case = (
            &'static [u16],
            Option<&'static [u16]>,
            &'static [u16],
            &'static [u16],
        );
        let cases: &[Case] = &[
            (&[1, 2], Some(&[]), &[1, 2], &[]),
            (&[1, 2], Some(&[2, 7]), &[1], &[2]),
            (&[1, 2], None, &[], &[1, 2]),
            (&[], Some(&[3]), &[], &[]),
        ];
        for (cleared, occupied, confirmed, unconfirmed) in cases {
            let occupied = occupied.map(held);
            let got = settle_clears(cleared, occupied.as_ref());
            assert_eq!(
                got,
                (confirmed.to_vec(), unconfirmed.to_vec()),
                "{cleared:?} {occupied:?}"
            );
        }
    }

    #[test]
    fn writes_settle_only_when_the_read_back_shows_the_code() {
        use WriteCheck::*;
        let table = |e: &[(u16, Option<&str>)]| -> BTreeMap<u16, Option<String>> {
            e.iter().map(|(s, c)| (*s, c.map(str::to_owned))).collect()
        };
        type Case = (
            &'static str,
            Option<BTreeMap<u16, Option<String>>>,
            Vec<(u16, WriteCheck)>,
        );
        let cases: Vec<Case> = vec![
            (
                "both held",
                Some(table(&[(2, Some("4821")), (3, Some("5930"))])),
                vec![(2, Confirmed), (3, Confirmed)],
            ),
            (
                "one dropped: the slot reads empty",
                Some(table(&[(3, Some("5930"))])),
                vec![(2, Lost), (3, Confirmed)],
            ),
            (
                "the old code stayed",
                Some(table(&[(2, Some("1111")), (3, Some("5930"))])),
                vec![(2, Lost), (3, Confirmed)],
            ),
            (
                "masked: occupied is all that shows",
                Some(table(&[(2, None), (3, None)])),
                vec![(2, Unverifiable), (3, Unverifiable)],
            ),
            (
                "masked and empty is still lost",
                Some(table(&[(3, None)])),
                vec![(2, Lost), (3, Unverifiable)],
            ),
            ("not read back", None, vec![(2, Unread), (3, Unread)]),
        ];
        let written = [(2, "4821"), (3, "5930")];
        for (what, read, want) in cases {
            assert_eq!(settle_writes(&written, read.as_ref()), want, "{what}");
        }
        let journaled: Vec<bool> = [Confirmed, Unverifiable, Lost, Unread]
            .iter()
            .map(|c| c.journaled())
            .collect();
        assert_eq!(journaled, vec![true, true, false, false]);
    }

    /// A code open on weekday mornings, in `zone`.
    fn in_zone(zone: &str) -> DesiredCode {
        DesiredCode {
            schedules: Some(vec![crate::schedule::Schedule {
                windows: vec![crate::schedule::Window {
                    days: 0b0011111,
                    start: 8 * 60,
                    end: 12 * 60,
                }],
                valid_from: None,
                valid_until: None,
                paused_dates: vec![],
            }]),
            time_zone: zone.into(),
            ..code("a", "4821")
        }
    }

    fn table(entries: &[(u16, &str, &str)]) -> Table {
        entries.iter().map(|(s, c, p)| (*s, code(c, p))).collect()
    }

    #[test]
    fn plan_table() {
        let set = |slot, c: &str, p: &str| SlotAction::Set {
            slot,
            code: code(c, p),
        };
        let clear = |slot| SlotAction::Clear { slot };
        type Case = (&'static str, Table, Table, Vec<SlotAction>);
        let cases: Vec<Case> = vec![
            ("nothing to do", table(&[]), table(&[]), vec![]),
            (
                "in sync",
                table(&[(2, "a", "4821")]),
                table(&[(2, "a", "4821")]),
                vec![],
            ),
            (
                "new code",
                table(&[(2, "a", "4821")]),
                table(&[]),
                vec![set(2, "a", "4821")],
            ),
            (
                "removed code",
                table(&[]),
                table(&[(2, "a", "4821")]),
                vec![clear(2)],
            ),
            (
                "changed pin is one write",
                table(&[(2, "a", "1111")]),
                table(&[(2, "a", "4821")]),
                vec![set(2, "a", "1111")],
            ),
            (
                "a changed level is rewritten",
                BTreeMap::from([(
                    2,
                    DesiredCode {
                        authorities: vec![(1, Level::Manager)],
                        ..code("a", "4821")
                    },
                )]),
                BTreeMap::from([(
                    2,
                    DesiredCode {
                        authorities: vec![(1, Level::Master)],
                        ..code("a", "4821")
                    },
                )]),
                vec![SlotAction::Set {
                    slot: 2,
                    code: DesiredCode {
                        authorities: vec![(1, Level::Manager)],
                        ..code("a", "4821")
                    },
                }],
            ),
            (
                "a scheduled code in a new time zone is rewritten",
                BTreeMap::from([(2, in_zone("Asia/Tokyo"))]),
                BTreeMap::from([(2, in_zone("UTC"))]),
                vec![SlotAction::Set {
                    slot: 2,
                    code: in_zone("Asia/Tokyo"),
                }],
            ),
            (
                "same schedule, same zone: in sync",
                BTreeMap::from([(2, in_zone("Asia/Tokyo"))]),
                BTreeMap::from([(2, in_zone("Asia/Tokyo"))]),
                vec![],
            ),
            (
                "codes swapped between slots clear first",
                table(&[(2, "a", "1111"), (3, "b", "4821")]),
                table(&[(2, "a", "4821"), (3, "b", "1111")]),
                vec![clear(2), clear(3), set(2, "a", "1111"), set(3, "b", "4821")],
            ),
            (
                "slot handed to another credential",
                table(&[(2, "b", "4821")]),
                table(&[(2, "a", "4821")]),
                vec![set(2, "b", "4821")],
            ),
            (
                "code moves between slots",
                table(&[(3, "b", "4821")]),
                table(&[(2, "a", "4821")]),
                vec![clear(2), set(3, "b", "4821")],
            ),
        ];
        for (what, desired, written, want) in cases {
            assert_eq!(plan_device(&desired, &written), want, "{what}");
        }
    }

    #[test]
    fn codes_due_by_validity_schedule_and_device() {
        use chrono::TimeZone;
        // A Monday, 09:00 and 13:00 in UTC.
        let morning = chrono::Utc
            .with_ymd_and_hms(2026, 3, 2, 9, 0, 0)
            .single()
            .expect("time");
        let afternoon = chrono::Utc
            .with_ymd_and_hms(2026, 3, 2, 13, 0, 0)
            .single()
            .expect("time");
        let plain = code("a", "4821");
        let scheduled = in_zone("UTC");
        let unzoned = DesiredCode {
            time_zone: String::new(),
            ..in_zone("UTC")
        };
        let window = |from: Option<chrono::DateTime<chrono::Utc>>, until| Validity { from, until };
        let stripped = DesiredCode {
            schedules: None,
            time_zone: String::new(),
            ..scheduled.clone()
        };
        type Case = (
            &'static str,
            DesiredCode,
            Validity,
            &'static str,
            chrono::DateTime<chrono::Utc>,
            bool,
            Option<DesiredCode>,
        );
        let cases: Vec<Case> = vec![
            (
                "always",
                plain.clone(),
                Validity::default(),
                "UTC",
                morning,
                false,
                Some(plain.clone()),
            ),
            (
                "not yet valid",
                plain.clone(),
                window(Some(afternoon), None),
                "UTC",
                morning,
                false,
                None,
            ),
            (
                "valid from now on",
                plain.clone(),
                window(Some(morning), None),
                "UTC",
                morning,
                false,
                Some(plain.clone()),
            ),
            (
                "expired at its end",
                plain.clone(),
                window(None, Some(morning)),
                "UTC",
                morning,
                false,
                None,
            ),
            (
                "open window, agent enforces",
                scheduled.clone(),
                Validity::default(),
                "UTC",
                morning,
                false,
                Some(stripped.clone()),
            ),
            (
                "closed window, agent enforces",
                scheduled.clone(),
                Validity::default(),
                "UTC",
                afternoon,
                false,
                None,
            ),
            (
                "closed window, device enforces",
                unzoned.clone(),
                Validity::default(),
                "UTC",
                afternoon,
                true,
                Some(scheduled.clone()),
            ),
            (
                "the device gets the site zone",
                unzoned,
                Validity::default(),
                "Asia/Tokyo",
                morning,
                true,
                Some(in_zone("Asia/Tokyo")),
            ),
            (
                "an unknown zone fails closed",
                scheduled,
                Validity::default(),
                "Mars/Olympus",
                morning,
                false,
                None,
            ),
        ];
        for (what, c, validity, zone, now, keeps, want) in cases {
            assert!(code_due(&c, validity, zone, now, keeps) == want, "{what}");
        }
    }

    #[test]
    fn held_codes_need_no_write() {
        let plain = code("a", "4821");
        let same = Some("4821".to_owned());
        let other = Some("1111".to_owned());
        type Case<'a> = (&'a str, bool, DesiredCode, Option<&'a Option<String>>, bool);
        let cases: Vec<Case> = vec![
            (
                "the device holds it",
                false,
                plain.clone(),
                Some(&same),
                true,
            ),
            (
                "another code there",
                false,
                plain.clone(),
                Some(&other),
                false,
            ),
            ("masked", false, plain.clone(), Some(&None), false),
            ("not read", false, plain.clone(), None, false),
            (
                "a panel's levels are not read back",
                true,
                plain.clone(),
                Some(&same),
                false,
            ),
            (
                "schedules are not read back",
                false,
                in_zone("UTC"),
                Some(&same),
                false,
            ),
        ];
        for (what, panel, c, observed, want) in cases {
            assert_eq!(already_held(panel, &c, observed), want, "{what}");
        }
    }

    #[test]
    fn local_clears_skip_what_is_known_empty_and_what_keyplane_wrote() {
        let asked: std::collections::BTreeSet<u16> = [2, 3, 4].into();
        let written = table(&[(4, "a", "4821")]);
        let seen: BTreeMap<u16, Option<String>> = [(2, Some("1111".to_owned()))].into();
        type Case = (
            &'static str,
            Option<BTreeMap<u16, Option<String>>>,
            Vec<u16>,
            Vec<u16>,
        );
        let cases: Vec<Case> = vec![
            (
                "read back: clear the occupied, forget the empty",
                Some(seen),
                vec![2],
                vec![3],
            ),
            ("never read back: clear them all", None, vec![2, 3], vec![]),
        ];
        for (what, observed, clear, forget) in cases {
            assert_eq!(
                local_clears(&asked, &written, observed.as_ref()),
                (clear, forget),
                "{what}"
            );
        }
    }

    #[test]
    fn debug_hides_pins() {
        let action = SlotAction::Set {
            slot: 2,
            code: code("c", "9930"),
        };
        assert!(!format!("{action:?}").contains("9930"));
        assert!(!format!("{:?}", code("c", "9930")).contains("9930"));
    }
}
