//! Who may open what, when, at a site: personal plans (locks and panels), standard
//! plans (doors and locks) and holidays; and which code slots a change of them
//! touches, so only those are sent to the agent again.

use crate::config::SlotRef;
use crate::model::DeviceKind;
use crate::schedule::{DAY_MINUTES, Schedule, Window};
use chrono::NaiveDate;
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

/// A site's access rules, as they apply to the users they were built for.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AccessRules {
    /// Configured personal plans: user -> (access points, schedule).
    personal: HashMap<Uuid, (BTreeSet<Uuid>, Option<Schedule>)>,
    /// Standard plans: (user, device) -> the schedules of plans granting it.
    standard: HashMap<(Uuid, Uuid), Vec<Option<Schedule>>>,
}

/// A standard plan's grant: plan, its schedule (None: always), a member, a device.
pub type Grant = (Uuid, Option<Schedule>, Uuid, Uuid);

/// Applies holidays: a paused plan that had no schedule becomes 24/7 but for them.
fn paused(schedule: Option<Schedule>, days: &[NaiveDate]) -> Option<Schedule> {
    if days.is_empty() {
        return schedule;
    }
    let mut s = schedule.unwrap_or_else(|| Schedule {
        windows: vec![Window {
            days: 0x7f,
            start: 0,
            end: DAY_MINUTES,
        }],
        ..Schedule::default()
    });
    s.paused_dates.extend_from_slice(days);
    Some(s)
}

impl AccessRules {
    /// Builds the rules from the site's `holidays` (day, plans paused; none: every
    /// plan, personal ones included), configured personal plans (user, schedule), their
    /// access points (user, device) and standard plan grants.
    pub fn new(
        holidays: &[(NaiveDate, Vec<Uuid>)],
        personal: impl IntoIterator<Item = (Uuid, Option<Schedule>)>,
        points: impl IntoIterator<Item = (Uuid, Uuid)>,
        standard: impl IntoIterator<Item = Grant>,
    ) -> AccessRules {
        let days_for = |plan: Option<Uuid>| -> Vec<NaiveDate> {
            holidays
                .iter()
                .filter(|(_, plans)| plans.is_empty() || plan.is_some_and(|p| plans.contains(&p)))
                .map(|(d, _)| *d)
                .collect()
        };
        let mut rules = AccessRules::default();
        for (user, schedule) in personal {
            let schedule = paused(schedule, &days_for(None));
            rules.personal.insert(user, (BTreeSet::new(), schedule));
        }
        for (user, device) in points {
            if let Some((points, _)) = rules.personal.get_mut(&user) {
                points.insert(device);
            }
        }
        for (plan, schedule, user, device) in standard {
            let schedule = paused(schedule, &days_for(Some(plan)));
            rules
                .standard
                .entry((user, device))
                .or_default()
                .push(schedule);
        }
        rules
    }

    /// The schedules under which `user`'s code belongs on `device`: None always, an
    /// empty list never. A configured personal plan governs locks and panels; other
    /// devices follow the standard plans granting them, if any.
    pub fn schedules_for(
        &self,
        user: Uuid,
        device: Uuid,
        kind: Option<DeviceKind>,
    ) -> Option<Vec<Schedule>> {
        if let (Some(DeviceKind::Panel | DeviceKind::Lock), Some((points, schedule))) =
            (kind, self.personal.get(&user))
        {
            return Some(if points.contains(&device) {
                match schedule {
                    None => return None,
                    Some(s) => vec![s.clone()],
                }
            } else {
                Vec::new()
            });
        }
        let plans = self.standard.get(&(user, device))?;
        if plans.iter().any(Option::is_none) {
            return None;
        }
        Some(plans.iter().flatten().cloned().collect())
    }
}

/// A slot held by a code: where, whose, and the kind of its device.
pub type CodeSlot = (SlotRef, Uuid, Option<DeviceKind>);

/// The slots whose schedules differ between the rules `before` and `after` a change:
/// a rename, or a plan whose members hold no codes, changes nothing an agent must
/// hear of.
pub fn schedules_changed(
    slots: &[CodeSlot],
    before: &AccessRules,
    after: &AccessRules,
) -> Vec<SlotRef> {
    slots
        .iter()
        .filter(|((device, _), user, kind)| {
            before.schedules_for(*user, *device, *kind)
                != after.schedules_for(*user, *device, *kind)
        })
        .map(|(slot, _, _)| *slot)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn evenings() -> Schedule {
        Schedule {
            windows: vec![Window {
                days: 0x1f,
                start: 18 * 60,
                end: 22 * 60,
            }],
            ..Schedule::default()
        }
    }

    fn day(n: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2030, 1, n).expect("date")
    }

    fn always_but(days: &[NaiveDate]) -> Schedule {
        Schedule {
            windows: vec![Window {
                days: 0x7f,
                start: 0,
                end: DAY_MINUTES,
            }],
            paused_dates: days.to_vec(),
            ..Schedule::default()
        }
    }

    #[test]
    fn schedules_for_table() {
        let (ann, bob, cy) = (id(1), id(2), id(3));
        let (lock, door, panel, other) = (id(10), id(11), id(12), id(13));
        let (staff, night) = (id(20), id(21));
        let build = |holidays: &[(NaiveDate, Vec<Uuid>)]| {
            AccessRules::new(
                holidays,
                [(ann, None), (bob, Some(evenings()))],
                [(ann, lock), (bob, panel)],
                [
                    (staff, None, ann, door),
                    (staff, None, cy, door),
                    (night, Some(evenings()), cy, door),
                    (night, Some(evenings()), cy, lock),
                ],
            )
        };
        let plain = build(&[]);
        let paused_staff = build(&[(day(2), vec![staff])]);
        let paused_all = build(&[(day(3), vec![])]);
        use DeviceKind::{Door, Lock, Panel};
        // (rules, user, device, kind, schedules)
        type Case<'a> = (
            &'a AccessRules,
            Uuid,
            Uuid,
            Option<DeviceKind>,
            Option<Vec<Schedule>>,
        );
        let cases: Vec<Case> = vec![
            // A personal plan governs locks and panels: on its points, its schedule.
            (&plain, ann, lock, Some(Lock), None),
            (&plain, bob, panel, Some(Panel), Some(vec![evenings()])),
            // Not one of its points: never.
            (&plain, ann, panel, Some(Panel), Some(vec![])),
            // Doors follow standard plans; one without a schedule means always.
            (&plain, ann, door, Some(Door), None),
            (&plain, cy, door, Some(Door), None),
            (&plain, cy, lock, Some(Lock), Some(vec![evenings()])),
            // Under no plan: always.
            (&plain, bob, other, Some(Door), None),
            // A holiday pausing the staff plan makes it always-but-that-day.
            (
                &paused_staff,
                ann,
                door,
                Some(Door),
                Some(vec![always_but(&[day(2)])]),
            ),
            // One pausing every plan pauses personal ones too.
            (
                &paused_all,
                ann,
                lock,
                Some(Lock),
                Some(vec![always_but(&[day(3)])]),
            ),
        ];
        for (rules, user, device, kind, want) in cases {
            assert_eq!(
                rules.schedules_for(user, device, kind),
                want,
                "{user} {device} {kind:?}"
            );
        }
    }

    #[test]
    fn schedules_changed_table() {
        let (ann, bob) = (id(1), id(2));
        let (door, lock) = (id(11), id(10));
        let plan = id(20);
        let rules = |holidays: &[(NaiveDate, Vec<Uuid>)]| {
            AccessRules::new(holidays, [], [], [(plan, None, ann, door)])
        };
        let slots: Vec<CodeSlot> = vec![
            ((door, 4), ann, Some(DeviceKind::Door)),
            ((door, 5), bob, Some(DeviceKind::Door)),
            ((lock, 1), ann, Some(DeviceKind::Lock)),
        ];
        // (before, after, changed)
        type Case = (AccessRules, AccessRules, Vec<SlotRef>);
        let cases: Vec<Case> = vec![
            (rules(&[]), rules(&[]), vec![]),
            // A holiday on the plan: only its member's code on its door.
            (rules(&[]), rules(&[(day(2), vec![plan])]), vec![(door, 4)]),
            // Another plan's holiday changes nothing here.
            (rules(&[]), rules(&[(day(2), vec![id(99)])]), vec![]),
        ];
        for (before, after, want) in cases {
            assert_eq!(schedules_changed(&slots, &before, &after), want);
        }
    }
}
