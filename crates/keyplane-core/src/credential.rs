//! A credential's scope and the slot changes a write makes, decided from the rows the
//! store loaded: which devices a scope lands on, which partitions a change involves,
//! and which slots are freed, re-keyed or newly allocated. Slot numbers never move:
//! a device that stays in scope keeps its slot.

use crate::model::{DeviceKind, DeviceModel};
use std::collections::BTreeSet;
use uuid::Uuid;

/// Where a credential is valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Panel partitions.
    pub panel_partitions: Vec<u8>,
    /// Lock device ids.
    pub locks: Vec<Uuid>,
    /// Door device ids.
    pub doors: Vec<Uuid>,
}

impl Scope {
    /// Whether the scope names nothing.
    pub fn is_empty(&self) -> bool {
        self.panel_partitions.is_empty() && self.locks.is_empty() && self.doors.is_empty()
    }
}

/// What the scope rules need of one device of the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Device id.
    pub id: Uuid,
    /// Model profile.
    pub model: &'static DeviceModel,
    /// Partition, if any.
    pub partition: Option<u8>,
}

/// Why a scope cannot be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeError {
    /// The scope names nothing.
    Empty,
    /// A panel partition the site does not have.
    NoPartition(u8),
    /// Panel partitions named, but the site has no panel.
    NoPanel,
    /// A lock or door the site does not have.
    NoDevice(Uuid),
    /// A device listed under the wrong kind.
    WrongKind {
        /// `locks` or `doors`.
        field: &'static str,
        /// The device.
        device: Uuid,
        /// What it is.
        is: DeviceKind,
        /// What the field wants.
        want: DeviceKind,
    },
}

fn dedup<T: Ord + Copy>(items: &[T]) -> Vec<T> {
    items
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The devices `scope` lands on, in order: the site's panels (when it names panel
/// partitions), then its locks, then its doors. Checked in that order, so the first
/// problem found is the one reported.
pub fn resolve_targets(
    scope: &Scope,
    partitions: &BTreeSet<u8>,
    devices: &[DeviceFacts],
) -> Result<Vec<DeviceFacts>, ScopeError> {
    if scope.is_empty() {
        return Err(ScopeError::Empty);
    }
    let mut targets = Vec::new();
    if !scope.panel_partitions.is_empty() {
        if let Some(p) = dedup(&scope.panel_partitions)
            .into_iter()
            .find(|p| !partitions.contains(p))
        {
            return Err(ScopeError::NoPartition(p));
        }
        let mut panels: Vec<DeviceFacts> = devices
            .iter()
            .filter(|d| d.model.kind == DeviceKind::Panel)
            .copied()
            .collect();
        if panels.is_empty() {
            return Err(ScopeError::NoPanel);
        }
        panels.sort_by_key(|d| d.id);
        targets.extend(panels);
    }
    for (ids, want, field) in [
        (&scope.locks, DeviceKind::Lock, "locks"),
        (&scope.doors, DeviceKind::Door, "doors"),
    ] {
        for id in dedup(ids) {
            let device = devices
                .iter()
                .find(|d| d.id == id)
                .ok_or(ScopeError::NoDevice(id))?;
            if device.model.kind != want {
                return Err(ScopeError::WrongKind {
                    field,
                    device: id,
                    is: device.model.kind,
                    want,
                });
            }
            targets.push(*device);
        }
    }
    Ok(targets)
}

/// Partitions a change touches: the panel partitions of `scopes`, and the partitions
/// of the devices it lands on.
pub fn involved_partitions(scopes: &[&Scope], targets: &[DeviceFacts]) -> Vec<u8> {
    let mut p: Vec<u8> = scopes
        .iter()
        .flat_map(|s| s.panel_partitions.iter().copied())
        .chain(targets.iter().filter_map(|d| d.partition))
        .collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// The slot changes of a credential write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// Slots to clear: their device left the scope.
    pub freed: Vec<(Uuid, u16)>,
    /// Slots that stay where they are but hold a new PIN.
    pub rekeyed: Vec<(Uuid, u16)>,
    /// Devices that need a free slot (the lowest assignable one).
    pub allocate: Vec<Uuid>,
}

/// Plans the slots of a credential that holds `held` and must now sit on `targets`:
/// devices that stay keep their slot numbers (re-keyed when the PIN changes), devices
/// that left are freed, new devices get a slot.
pub fn slot_plan(held: &[(Uuid, u16)], targets: &[Uuid], pin_changed: bool) -> SlotPlan {
    let wanted: BTreeSet<Uuid> = targets.iter().copied().collect();
    let holding: BTreeSet<Uuid> = held.iter().map(|(d, _)| *d).collect();
    let mut plan = SlotPlan::default();
    for &(device, slot) in held {
        if !wanted.contains(&device) {
            plan.freed.push((device, slot));
        } else if pin_changed {
            plan.rekeyed.push((device, slot));
        }
    }
    let mut seen = BTreeSet::new();
    plan.allocate = targets
        .iter()
        .copied()
        .filter(|d| !holding.contains(d) && seen.insert(*d))
        .collect();
    plan
}

/// The slots a credential holds once `plan` (made from `held`) is written and the
/// allocator gave `allocated`: held slots that were not freed, and the new ones, by
/// device. What a read back after the write would find, so the write need not read.
pub fn slots_after(
    held: &[(Uuid, u16)],
    plan: &SlotPlan,
    allocated: &[(Uuid, u16)],
) -> Vec<(Uuid, u16)> {
    let freed: BTreeSet<Uuid> = plan.freed.iter().map(|(d, _)| *d).collect();
    let mut after: Vec<(Uuid, u16)> = held
        .iter()
        .copied()
        .filter(|(d, _)| !freed.contains(d))
        .chain(allocated.iter().copied())
        .collect();
    after.sort_unstable();
    after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn device(n: u128, model: &str, partition: Option<u8>) -> DeviceFacts {
        DeviceFacts {
            id: id(n),
            model: DeviceModel::find(model).expect("model"),
            partition,
        }
    }

    #[test]
    fn resolve_targets_table() {
        let panel = device(1, "vista-128bpt", None);
        let lock = device(2, "zwave-lock-30", Some(1));
        let door = device(3, "door-1000", Some(2));
        let site = vec![door, lock, panel];
        let partitions: BTreeSet<u8> = [1, 2].into();
        let scope = |p: &[u8], l: &[u128], d: &[u128]| Scope {
            panel_partitions: p.to_vec(),
            locks: l.iter().map(|n| id(*n)).collect(),
            doors: d.iter().map(|n| id(*n)).collect(),
        };
        let only_lock = [lock];
        type Case<'a> = (
            Scope,
            &'a [DeviceFacts],
            Result<Vec<DeviceFacts>, ScopeError>,
        );
        let cases: Vec<Case> = vec![
            (scope(&[], &[], &[]), &site, Err(ScopeError::Empty)),
            (scope(&[1], &[], &[]), &site, Ok(vec![panel])),
            // Duplicates land once; order is panels, locks, doors.
            (
                scope(&[2, 1, 1], &[2, 2], &[3]),
                &site,
                Ok(vec![panel, lock, door]),
            ),
            (
                scope(&[3], &[], &[]),
                &site,
                Err(ScopeError::NoPartition(3)),
            ),
            (scope(&[1], &[], &[]), &only_lock, Err(ScopeError::NoPanel)),
            (
                scope(&[], &[9], &[]),
                &site,
                Err(ScopeError::NoDevice(id(9))),
            ),
            (
                scope(&[], &[3], &[]),
                &site,
                Err(ScopeError::WrongKind {
                    field: "locks",
                    device: id(3),
                    is: DeviceKind::Door,
                    want: DeviceKind::Lock,
                }),
            ),
            // The partition is checked before the devices.
            (
                scope(&[5], &[9], &[]),
                &site,
                Err(ScopeError::NoPartition(5)),
            ),
        ];
        for (scope, devices, want) in cases {
            assert_eq!(
                resolve_targets(&scope, &partitions, devices),
                want,
                "{scope:?}"
            );
        }
    }

    #[test]
    fn involved_partitions_table() {
        let lock = device(2, "zwave-lock-30", Some(3));
        let door = device(3, "door-1000", None);
        let a = Scope {
            panel_partitions: vec![2, 1],
            ..Scope::default()
        };
        let b = Scope {
            panel_partitions: vec![1],
            ..Scope::default()
        };
        let cases: Vec<(Vec<&Scope>, Vec<DeviceFacts>, Vec<u8>)> = vec![
            (vec![&a], vec![], vec![1, 2]),
            (vec![&a, &b], vec![lock, door], vec![1, 2, 3]),
            (vec![], vec![door], vec![]),
        ];
        for (scopes, targets, want) in cases {
            assert_eq!(involved_partitions(&scopes, &targets), want);
        }
    }

    #[test]
    fn slots_after_table() {
        let (p, l, d) = (id(1), id(2), id(3));
        // (held, targets, PIN changed, allocated, slots after)
        #[allow(clippy::type_complexity)]
        let rows: &[(
            &[(Uuid, u16)],
            &[Uuid],
            bool,
            &[(Uuid, u16)],
            &[(Uuid, u16)],
        )] = &[
            // A new code: only what the allocator gave, by device.
            (&[], &[l, p], false, &[(l, 4), (p, 2)], &[(p, 2), (l, 4)]),
            // Nothing changes: the held slots, sorted.
            (&[(l, 4), (p, 2)], &[p, l], false, &[], &[(p, 2), (l, 4)]),
            // A new PIN: re-keyed slots keep their numbers.
            (&[(p, 2), (l, 4)], &[p, l], true, &[], &[(p, 2), (l, 4)]),
            // A device leaves, another joins.
            (
                &[(p, 2), (l, 4)],
                &[p, d],
                false,
                &[(d, 1)],
                &[(p, 2), (d, 1)],
            ),
            // Every device leaves (a delete).
            (&[(p, 2), (l, 4)], &[], false, &[], &[]),
        ];
        for (held, targets, pin, allocated, want) in rows {
            let plan = slot_plan(held, targets, *pin);
            assert_eq!(
                slots_after(held, &plan, allocated),
                want.to_vec(),
                "held {held:?} targets {targets:?}"
            );
        }
    }

    #[test]
    fn slot_plan_table() {
        let (p, l, d) = (id(1), id(2), id(3));
        // (held slots, targets, PIN changed, plan)
        type Case = (Vec<(Uuid, u16)>, Vec<Uuid>, bool, SlotPlan);
        let cases: Vec<Case> = vec![
            // A new credential: a slot on every target.
            (
                vec![],
                vec![p, d],
                false,
                SlotPlan {
                    allocate: vec![p, d],
                    ..SlotPlan::default()
                },
            ),
            // A name change: nothing moves.
            (vec![(p, 4)], vec![p], false, SlotPlan::default()),
            // A new PIN: the slot stays and is re-keyed.
            (
                vec![(p, 4), (l, 7)],
                vec![p, l],
                true,
                SlotPlan {
                    rekeyed: vec![(p, 4), (l, 7)],
                    ..SlotPlan::default()
                },
            ),
            // Narrowed and widened at once: the panel slot is freed, the lock keeps 7,
            // the door gets a new one.
            (
                vec![(p, 4), (l, 7)],
                vec![l, d, d],
                false,
                SlotPlan {
                    freed: vec![(p, 4)],
                    rekeyed: vec![],
                    allocate: vec![d],
                },
            ),
        ];
        for (held, targets, pin_changed, want) in cases {
            assert_eq!(slot_plan(&held, &targets, pin_changed), want, "{held:?}");
        }
    }
}
