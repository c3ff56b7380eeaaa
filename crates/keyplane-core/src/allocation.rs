//! Slot allocation: each device allocates independently, and a slot stays put while
//! its credential lives.

use crate::model::DeviceModel;
use std::collections::BTreeSet;

/// The lowest slot of `model` that is assignable and not in `occupied`, if any.
///
/// Lowest-first keeps panel user numbers compact and predictable for people reading
/// them at a keypad; existing assignments are never moved to make room.
pub fn lowest_free_slot(model: &DeviceModel, occupied: &BTreeSet<u16>) -> Option<u16> {
    (model.first_slot..=model.last_slot).find(|s| model.is_assignable(*s) && !occupied.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_table() {
        let panel = DeviceModel::find("vista-128bpt").expect("panel");
        let lock = DeviceModel::find("zwave-lock-30").expect("lock");
        let full_lock: BTreeSet<u16> = (1..=30).collect();
        let all_but_17: BTreeSet<u16> = (1..=30).filter(|s| *s != 17).collect();
        let cases: Vec<(&DeviceModel, BTreeSet<u16>, Option<u16>)> = vec![
            // The installer's user number 001 is never handed out.
            (panel, BTreeSet::new(), Some(2)),
            (panel, [2, 3].into(), Some(4)),
            // A hole left by a deleted credential is reused; others do not move.
            (panel, [2, 4, 5].into(), Some(3)),
            (panel, (2..=150).collect(), None),
            (lock, BTreeSet::new(), Some(1)),
            (lock, full_lock, None),
            (lock, all_but_17, Some(17)),
        ];
        for (model, occupied, want) in cases {
            assert_eq!(
                lowest_free_slot(model, &occupied),
                want,
                "{} {occupied:?}",
                model.id
            );
        }
    }
}
