//! Site configuration writes (the site, its partitions and devices, holidays,
//! lockdown, codes programmed at a device, drift), decided from the rows the store
//! loaded under the site lock: what is refused, which slots an agent must hear of
//! again, and whether the site's revision advances. The store writes the result in
//! one batched step.

use crate::credential::Scope;
use crate::model::DeviceKind;
use chrono::NaiveDate;
use std::collections::BTreeSet;
use uuid::Uuid;

/// A (device, slot) pair.
pub type SlotRef = (Uuid, u16);

/// An entry of the site's change log: the revision the site moves to and the slots
/// recorded under it (none: only the site's settings or device list changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeLog {
    /// The site's revision after the write.
    pub revision: i64,
    /// Changed slots, each once, in order.
    pub slots: Vec<SlotRef>,
}

/// The change-log entry of a write on a site at `revision`: the revision advances
/// when a slot changed or when `always` (the agent must hear of something that is
/// not a slot, such as a device list, a lockdown or a time zone); otherwise nothing
/// is logged and agents are not woken.
pub fn change_log(revision: i64, changed: &[SlotRef], always: bool) -> Option<ChangeLog> {
    if changed.is_empty() && !always {
        return None;
    }
    Some(logged(revision, changed))
}

/// The entry that advances `revision` and logs `changed`, each slot once.
fn logged(revision: i64, changed: &[SlotRef]) -> ChangeLog {
    let mut seen = BTreeSet::new();
    let slots = changed
        .iter()
        .copied()
        .filter(|s| seen.insert(*s))
        .collect();
    ChangeLog {
        revision: revision + 1,
        slots,
    }
}

/// Why a configuration write is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A panel was given a partition.
    PanelPartition,
    /// A partition the site does not have.
    NoPartition(u8),
    /// A second panel.
    SecondPanel,
    /// The partition number is taken.
    PartitionExists(u8),
    /// Devices or credentials still use the partition.
    PartitionInUse(u8),
    /// The site still has devices.
    SiteHasDevices(i64),
    /// What still names a device that is to be deleted.
    DeviceInUse {
        /// The device.
        device: Uuid,
        /// Credentials scoped to it or holding a slot on it.
        credentials: i64,
        /// Users whose personal plan lists it.
        personal: Vec<Uuid>,
        /// Standard plans that list it.
        plans: Vec<Uuid>,
    },
    /// A plan a holiday names does not exist.
    NoPlan(Uuid),
    /// The holiday to delete does not exist.
    NoHoliday(NaiveDate),
}

/// Checks a device's partition: a panel spans partitions and takes none; any other
/// device's partition must exist.
pub fn device_partition_check(
    kind: DeviceKind,
    partition: Option<u8>,
    partitions: &BTreeSet<u8>,
) -> Result<(), ConfigError> {
    if partition.is_some() && !kind.has_partition() {
        return Err(ConfigError::PanelPartition);
    }
    match partition {
        Some(p) if !partitions.contains(&p) => Err(ConfigError::NoPartition(p)),
        _ => Ok(()),
    }
}

/// Checks a new device: its partition, then that a site has one panel at most.
pub fn device_create_check(
    kind: DeviceKind,
    partition: Option<u8>,
    partitions: &BTreeSet<u8>,
    panels: i64,
) -> Result<(), ConfigError> {
    device_partition_check(kind, partition, partitions)?;
    if kind == DeviceKind::Panel && panels > 0 {
        return Err(ConfigError::SecondPanel);
    }
    Ok(())
}

/// Nothing that names a device is removed behind the dealer's back: a shared plan
/// names its doors on purpose, and a code must leave the device first.
pub fn device_delete_check(
    device: Uuid,
    credentials: i64,
    personal: &[Uuid],
    plans: &[Uuid],
) -> Result<(), ConfigError> {
    if credentials > 0 || !personal.is_empty() || !plans.is_empty() {
        return Err(ConfigError::DeviceInUse {
            device,
            credentials,
            personal: personal.to_vec(),
            plans: plans.to_vec(),
        });
    }
    Ok(())
}

/// A partition number may be taken once.
pub fn partition_create_check(number: u8, exists: bool) -> Result<(), ConfigError> {
    if exists {
        return Err(ConfigError::PartitionExists(number));
    }
    Ok(())
}

/// A partition is deleted only when no device or credential uses it.
pub fn partition_delete_check(number: u8, uses: i64) -> Result<(), ConfigError> {
    if uses > 0 {
        return Err(ConfigError::PartitionInUse(number));
    }
    Ok(())
}

/// A site is deleted only without devices, so no code is left orphaned on one.
pub fn site_delete_check(devices: i64) -> Result<(), ConfigError> {
    if devices > 0 {
        return Err(ConfigError::SiteHasDevices(devices));
    }
    Ok(())
}

/// A slot an agent reported that the AUTHORITATIVE policy acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    /// Where.
    pub slot: SlotRef,
    /// A code keyplane did not write (foreign or conflict), not yet being removed;
    /// otherwise a managed slot found drifted or missing.
    pub local: bool,
}

/// What a site change does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteUpdatePlan {
    /// Local codes to clear (each audited and logged as an event).
    pub clear: Vec<SlotRef>,
    /// Managed slots to write again.
    pub rewrite: Vec<SlotRef>,
    /// The change-log entry, when agents must hear of the change.
    pub log: Option<ChangeLog>,
}

/// Plans a site change. Switching to AUTHORITATIVE applies the policy to what agents
/// already reported: every local code not yet being removed is cleared and every
/// drifted or missing managed slot is written again. The agent runs schedules in the
/// site's time zone, so a new zone reaches it now, not with the next unrelated change.
pub fn site_update_plan(
    revision: i64,
    zone_changed: bool,
    becomes_authoritative: bool,
    reported: &[Reported],
) -> SiteUpdatePlan {
    let mut plan = SiteUpdatePlan::default();
    if becomes_authoritative {
        for r in reported {
            if r.local {
                plan.clear.push(r.slot);
            } else {
                plan.rewrite.push(r.slot);
            }
        }
    }
    let changed: Vec<SlotRef> = reported
        .iter()
        .filter(|_| becomes_authoritative)
        .map(|r| r.slot)
        .collect();
    plan.log = change_log(revision, &changed, zone_changed);
    plan
}

/// The site's holidays once `day` is set to pause `plans` (None: the holiday on `day`
/// removed).
pub fn holidays_after(
    holidays: &[(NaiveDate, Vec<Uuid>)],
    day: NaiveDate,
    plans: Option<&[Uuid]>,
) -> Vec<(NaiveDate, Vec<Uuid>)> {
    let mut after: Vec<(NaiveDate, Vec<Uuid>)> = holidays
        .iter()
        .filter(|(d, _)| *d != day)
        .cloned()
        .collect();
    if let Some(plans) = plans {
        after.push((day, plans.to_vec()));
    }
    after.sort_by_key(|(d, _)| *d);
    after
}

/// Checks a holiday: every plan it names exists (the first missing one, in the
/// order named, is reported).
pub fn holiday_check(plans: &[Uuid], existing: &BTreeSet<Uuid>) -> Result<(), ConfigError> {
    match plans.iter().find(|p| !existing.contains(p)) {
        Some(p) => Err(ConfigError::NoPlan(*p)),
        None => Ok(()),
    }
}

/// The holiday to delete must exist.
pub fn holiday_delete_check(day: NaiveDate, exists: bool) -> Result<(), ConfigError> {
    if !exists {
        return Err(ConfigError::NoHoliday(day));
    }
    Ok(())
}

/// Why a local code or drift cannot be acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalError {
    /// The local code is already being removed.
    Removing,
    /// The device masks its codes.
    Masked,
    /// A panel user number is claimed without partitions.
    NoPartitions,
    /// The credential holds no slot on the device.
    NoSlot,
    /// The slot has not drifted.
    NotDrifted,
    /// Adopting, but the device reported no code.
    NothingToAdopt,
}

/// The scope of the credential a claimed local code becomes: the device it sits on,
/// or for a panel the partitions named.
pub fn claim_scope(
    kind: DeviceKind,
    device: Uuid,
    removing: bool,
    pin_known: bool,
    panel_partitions: &[u8],
) -> Result<Scope, LocalError> {
    if removing {
        return Err(LocalError::Removing);
    }
    if !pin_known {
        return Err(LocalError::Masked);
    }
    let mut scope = Scope::default();
    match kind {
        DeviceKind::Lock => scope.locks.push(device),
        DeviceKind::Door => scope.doors.push(device),
        DeviceKind::Panel => {
            if panel_partitions.is_empty() {
                return Err(LocalError::NoPartitions);
            }
            scope.panel_partitions = panel_partitions.to_vec();
        }
    }
    Ok(scope)
}

/// What resolving drift writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftPlan {
    /// Write keyplane's code into the slot again.
    Reapply {
        /// The drifted slot.
        slot: SlotRef,
        /// Its change-log entry.
        log: ChangeLog,
    },
    /// Make the device's code the credential's everywhere it sits: every slot of the
    /// credential is re-keyed.
    Adopt {
        /// Every slot of the credential.
        slots: Vec<SlotRef>,
        /// Their change-log entry.
        log: ChangeLog,
    },
}

/// Plans resolving drift of a credential holding `held` on `device`, where the agent
/// reported the slot `drifted` (`reported_code`: whether it reported the code found).
pub fn drift_plan(
    revision: i64,
    held: &[SlotRef],
    device: Uuid,
    drifted: bool,
    reported_code: bool,
    adopt: bool,
) -> Result<DriftPlan, LocalError> {
    let slot = held
        .iter()
        .copied()
        .find(|(d, _)| *d == device)
        .ok_or(LocalError::NoSlot)?;
    if !drifted {
        return Err(LocalError::NotDrifted);
    }
    if !adopt {
        let log = logged(revision, &[slot]);
        return Ok(DriftPlan::Reapply { slot, log });
    }
    if !reported_code {
        return Err(LocalError::NothingToAdopt);
    }
    let log = logged(revision, held);
    Ok(DriftPlan::Adopt {
        slots: held.to_vec(),
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn change_log_table() {
        let (a, b) = ((id(1), 3), (id(2), 4));
        // (revision, changed, always, entry)
        type Case = (i64, Vec<SlotRef>, bool, Option<ChangeLog>);
        let cases: Vec<Case> = vec![
            // Nothing changed: no entry, no wake-up.
            (7, vec![], false, None),
            // A device list or lockdown: the revision moves with no slot.
            (
                7,
                vec![],
                true,
                Some(ChangeLog {
                    revision: 8,
                    slots: vec![],
                }),
            ),
            // Slots are logged once each, in order.
            (
                0,
                vec![b, a, b],
                false,
                Some(ChangeLog {
                    revision: 1,
                    slots: vec![b, a],
                }),
            ),
        ];
        for (revision, changed, always, want) in cases {
            assert_eq!(change_log(revision, &changed, always), want, "{changed:?}");
        }
    }

    #[test]
    fn device_checks_table() {
        let partitions: BTreeSet<u8> = [1, 2].into();
        // (kind, partition, panels already there, result)
        let cases = [
            (DeviceKind::Lock, Some(1), 0, Ok(())),
            (DeviceKind::Door, None, 1, Ok(())),
            (
                DeviceKind::Lock,
                Some(3),
                0,
                Err(ConfigError::NoPartition(3)),
            ),
            (DeviceKind::Panel, None, 0, Ok(())),
            (DeviceKind::Panel, None, 1, Err(ConfigError::SecondPanel)),
            // The partition is checked first.
            (
                DeviceKind::Panel,
                Some(1),
                1,
                Err(ConfigError::PanelPartition),
            ),
        ];
        for (kind, partition, panels, want) in cases {
            assert_eq!(
                device_create_check(kind, partition, &partitions, panels),
                want,
                "{kind:?} {partition:?} {panels}"
            );
        }
        let dev = id(9);
        assert_eq!(device_delete_check(dev, 0, &[], &[]), Ok(()));
        assert_eq!(
            device_delete_check(dev, 2, &[], &[id(5)]),
            Err(ConfigError::DeviceInUse {
                device: dev,
                credentials: 2,
                personal: vec![],
                plans: vec![id(5)],
            })
        );
        assert_eq!(
            device_delete_check(dev, 0, &[id(4)], &[]),
            Err(ConfigError::DeviceInUse {
                device: dev,
                credentials: 0,
                personal: vec![id(4)],
                plans: vec![],
            })
        );
    }

    #[test]
    fn partition_and_site_checks_table() {
        assert_eq!(partition_create_check(2, false), Ok(()));
        assert_eq!(
            partition_create_check(2, true),
            Err(ConfigError::PartitionExists(2))
        );
        assert_eq!(partition_delete_check(2, 0), Ok(()));
        assert_eq!(
            partition_delete_check(2, 3),
            Err(ConfigError::PartitionInUse(2))
        );
        assert_eq!(site_delete_check(0), Ok(()));
        assert_eq!(site_delete_check(1), Err(ConfigError::SiteHasDevices(1)));
    }

    #[test]
    fn site_update_plan_table() {
        let local = Reported {
            slot: (id(1), 5),
            local: true,
        };
        let drifted = Reported {
            slot: (id(2), 6),
            local: false,
        };
        // (zone changed, becomes AUTHORITATIVE, reported, plan)
        type Case = (bool, bool, Vec<Reported>, SiteUpdatePlan);
        let cases: Vec<Case> = vec![
            // A rename: nothing for the agent.
            (false, false, vec![local], SiteUpdatePlan::default()),
            // A new zone: the revision moves, no slot.
            (
                true,
                false,
                vec![],
                SiteUpdatePlan {
                    log: Some(ChangeLog {
                        revision: 11,
                        slots: vec![],
                    }),
                    ..SiteUpdatePlan::default()
                },
            ),
            // AUTHORITATIVE: local codes cleared, drifted slots written again.
            (
                false,
                true,
                vec![local, drifted],
                SiteUpdatePlan {
                    clear: vec![local.slot],
                    rewrite: vec![drifted.slot],
                    log: Some(ChangeLog {
                        revision: 11,
                        slots: vec![local.slot, drifted.slot],
                    }),
                },
            ),
            // AUTHORITATIVE with nothing reported: no change.
            (false, true, vec![], SiteUpdatePlan::default()),
        ];
        for (zone, authoritative, reported, want) in cases {
            assert_eq!(
                site_update_plan(10, zone, authoritative, &reported),
                want,
                "{zone} {authoritative} {reported:?}"
            );
        }
    }

    #[test]
    fn holidays_table() {
        let d = |n: u32| NaiveDate::from_ymd_opt(2030, 1, n).expect("date");
        let held = vec![(d(1), vec![]), (d(3), vec![id(7)])];
        // (day, plans, after)
        type Case = (NaiveDate, Option<Vec<Uuid>>, Vec<(NaiveDate, Vec<Uuid>)>);
        let cases: Vec<Case> = vec![
            (
                d(2),
                Some(vec![id(8)]),
                vec![(d(1), vec![]), (d(2), vec![id(8)]), (d(3), vec![id(7)])],
            ),
            // Replaced, not added twice.
            (d(3), Some(vec![]), vec![(d(1), vec![]), (d(3), vec![])]),
            (d(1), None, vec![(d(3), vec![id(7)])]),
        ];
        for (day, plans, want) in cases {
            assert_eq!(holidays_after(&held, day, plans.as_deref()), want, "{day}");
        }
        let existing: BTreeSet<Uuid> = [id(1), id(2)].into();
        assert_eq!(holiday_check(&[id(2), id(1)], &existing), Ok(()));
        assert_eq!(
            holiday_check(&[id(1), id(9), id(8)], &existing),
            Err(ConfigError::NoPlan(id(9)))
        );
        assert_eq!(holiday_delete_check(d(1), true), Ok(()));
        assert_eq!(
            holiday_delete_check(d(2), false),
            Err(ConfigError::NoHoliday(d(2)))
        );
    }

    #[test]
    fn claim_scope_table() {
        let dev = id(3);
        // (kind, removing, code known, partitions, result)
        type Case = (DeviceKind, bool, bool, Vec<u8>, Result<Scope, LocalError>);
        let cases: Vec<Case> = vec![
            (
                DeviceKind::Lock,
                false,
                true,
                vec![],
                Ok(Scope {
                    locks: vec![dev],
                    ..Scope::default()
                }),
            ),
            (
                DeviceKind::Door,
                false,
                true,
                vec![1],
                Ok(Scope {
                    doors: vec![dev],
                    ..Scope::default()
                }),
            ),
            (
                DeviceKind::Panel,
                false,
                true,
                vec![2],
                Ok(Scope {
                    panel_partitions: vec![2],
                    ..Scope::default()
                }),
            ),
            (
                DeviceKind::Panel,
                false,
                true,
                vec![],
                Err(LocalError::NoPartitions),
            ),
            // Removal and masking are refused first.
            (
                DeviceKind::Panel,
                true,
                false,
                vec![],
                Err(LocalError::Removing),
            ),
            (
                DeviceKind::Lock,
                false,
                false,
                vec![],
                Err(LocalError::Masked),
            ),
        ];
        for (kind, removing, known, partitions, want) in cases {
            assert_eq!(
                claim_scope(kind, dev, removing, known, &partitions),
                want,
                "{kind:?} {removing} {known} {partitions:?}"
            );
        }
    }

    #[test]
    fn drift_plan_table() {
        let (p, d, other) = (id(1), id(2), id(3));
        let held = vec![(p, 4), (d, 9)];
        // (device, drifted, code reported, adopt, plan)
        type Case = (Uuid, bool, bool, bool, Result<DriftPlan, LocalError>);
        let cases: Vec<Case> = vec![
            (
                d,
                true,
                false,
                false,
                Ok(DriftPlan::Reapply {
                    slot: (d, 9),
                    log: ChangeLog {
                        revision: 6,
                        slots: vec![(d, 9)],
                    },
                }),
            ),
            // Adopting re-keys every slot of the code.
            (
                d,
                true,
                true,
                true,
                Ok(DriftPlan::Adopt {
                    slots: held.clone(),
                    log: ChangeLog {
                        revision: 6,
                        slots: held.clone(),
                    },
                }),
            ),
            (d, true, false, true, Err(LocalError::NothingToAdopt)),
            (d, false, true, true, Err(LocalError::NotDrifted)),
            (other, true, true, false, Err(LocalError::NoSlot)),
        ];
        for (device, drifted, reported, adopt, want) in cases {
            assert_eq!(
                drift_plan(5, &held, device, drifted, reported, adopt),
                want,
                "{device} {drifted} {reported} {adopt}"
            );
        }
    }
}
