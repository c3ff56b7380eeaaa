//! How values are laid out in stored JSON: the jsonb columns (a site's status
//! thresholds, a device's reported constraints) and the audit form of a local code.
//!
//! A leaf on purpose: `site.rs`, which every other store module builds on, reads these
//! layouts too, so they cannot live in a module that itself imports `site`.

use keyplane_core::constraints::{CodeRule, ReportedConstraints};
use keyplane_core::status::{SiteThresholds, ThresholdOverride};
use uuid::Uuid;

/// A local code as the audit log records it before or after a change (never its PIN).
pub(crate) fn local_code_audit_json(device: Uuid, slot: u16, removing: bool) -> serde_json::Value {
    serde_json::json!({ "device": device, "slot": slot, "removing": removing })
}

fn override_json(o: &ThresholdOverride) -> serde_json::Value {
    let ms = |d: Option<chrono::Duration>| d.map(|d| d.num_milliseconds());
    serde_json::json!({
        "setting_ms": ms(o.setting),
        "removing_ms": ms(o.removing),
        "offline_ms": ms(o.offline),
    })
}

fn override_from(v: Option<&serde_json::Value>) -> ThresholdOverride {
    let ms = |k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(serde_json::Value::as_i64)
            .map(chrono::Duration::milliseconds)
    };
    ThresholdOverride {
        setting: ms("setting_ms"),
        removing: ms("removing_ms"),
        offline: ms("offline_ms"),
    }
}

/// A site's stored threshold overrides (none: the defaults).
pub(crate) fn thresholds_from_json(v: Option<serde_json::Value>) -> SiteThresholds {
    let Some(v) = v else {
        return SiteThresholds::default();
    };
    SiteThresholds {
        panel: override_from(v.get("panel")),
        lock: override_from(v.get("lock")),
        door: override_from(v.get("door")),
    }
}

/// The stored form of a site's thresholds; None when all are defaults, so nothing is stored.
pub(crate) fn thresholds_to_json(t: &SiteThresholds) -> Option<serde_json::Value> {
    (*t != SiteThresholds::default()).then(|| {
        serde_json::json!({
            "panel": override_json(&t.panel),
            "lock": override_json(&t.lock),
            "door": override_json(&t.door),
        })
    })
}

/// A stored report (`device.reported_constraints`); None when absent or unreadable.
pub(crate) fn reported_from_json(v: Option<serde_json::Value>) -> Option<ReportedConstraints> {
    let v = v?;
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    let flag = |k: &str| v.get(k).and_then(serde_json::Value::as_bool);
    let list = |k: &str| -> Option<Vec<u64>> {
        v.get(k)?
            .as_array()?
            .iter()
            .map(serde_json::Value::as_u64)
            .collect()
    };
    Some(ReportedConstraints {
        first_slot: num("first_slot").and_then(|n| u16::try_from(n).ok()),
        last_slot: num("last_slot").and_then(|n| u16::try_from(n).ok()),
        reserved_slots: list("reserved_slots").map(|l| {
            l.into_iter()
                .filter_map(|n| u16::try_from(n).ok())
                .collect()
        }),
        min_code_length: num("min_code_length").and_then(|n| u8::try_from(n).ok()),
        max_code_length: num("max_code_length").and_then(|n| u8::try_from(n).ok()),
        reads_back: flag("reads_back"),
        keeps_schedules: flag("keeps_schedules"),
        rules: v.get("rules").and_then(|r| {
            r.as_array()?
                .iter()
                .map(|x| {
                    let name = x.as_str()?;
                    CodeRule::ALL.into_iter().find(|c| c.as_str() == name)
                })
                .collect()
        }),
    })
}

/// The stored form of a device's report (`device.reported_constraints`).
pub(crate) fn reported_to_json(r: &ReportedConstraints) -> serde_json::Value {
    serde_json::json!({
        "first_slot": r.first_slot,
        "last_slot": r.last_slot,
        "reserved_slots": r.reserved_slots,
        "min_code_length": r.min_code_length,
        "max_code_length": r.max_code_length,
        "reads_back": r.reads_back,
        "keeps_schedules": r.keeps_schedules,
        "rules": r.rules.as_ref().map(|l| l.iter().map(|c| c.as_str()).collect::<Vec<_>>()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_constraints_round_trip_through_their_stored_form() {
        let reports = [
            ReportedConstraints::default(),
            ReportedConstraints {
                first_slot: Some(1),
                last_slot: Some(250),
                reserved_slots: Some(vec![]),
                min_code_length: Some(4),
                max_code_length: Some(10),
                reads_back: Some(false),
                keeps_schedules: Some(true),
                rules: Some(vec![CodeRule::NoStraightRun, CodeRule::NoRepeatedDigit]),
            },
            ReportedConstraints {
                rules: Some(vec![]),
                ..Default::default()
            },
        ];
        for r in reports {
            assert_eq!(
                reported_from_json(Some(reported_to_json(&r))),
                Some(r.clone())
            );
        }
        assert_eq!(reported_from_json(None), None);
    }

    #[test]
    fn thresholds_round_trip_and_defaults_store_nothing() {
        assert_eq!(thresholds_to_json(&SiteThresholds::default()), None);
        assert_eq!(thresholds_from_json(None), SiteThresholds::default());
        let t = SiteThresholds {
            lock: ThresholdOverride {
                setting: Some(chrono::Duration::milliseconds(1500)),
                removing: None,
                offline: Some(chrono::Duration::seconds(2)),
            },
            ..Default::default()
        };
        assert_eq!(thresholds_from_json(thresholds_to_json(&t)), t);
    }
}
