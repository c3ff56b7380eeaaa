//! Request fields into domain values: every field is checked here, once, and a bad
//! one is a precise INVALID_ARGUMENT naming the field. Wire values with a core
//! counterpart (schedules, levels, kinds, instants) are read by the shared rules of
//! `keyplane_proto::convert`; this module only adds the field path.

use crate::error::{name_status, pin_status};
use chrono::{DateTime, Utc};
use keyplane_core::authority::Authorities;
use keyplane_core::names::{DeviceName, MAX_PARTITIONS};
use keyplane_core::pin::Pin;
use keyplane_core::schedule::{Schedule, parse_time_zone};
use keyplane_core::{DeviceKind, DeviceModel, EventKind};
use keyplane_proto::convert::{self as wire, AuthorityWireError, ScheduleWireError};
use keyplane_proto::v1 as pb;
use keyplane_store as store;
use tonic::Status;
use uuid::Uuid;

/// Checks a display name: required, at most 200 characters, no control characters.
pub fn display_name(field: &str, value: &str) -> Result<String, Status> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if value.chars().count() > 200 || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{field} must be at most 200 printable characters"
        )));
    }
    Ok(value.to_owned())
}

/// Checks an IANA time zone name (`Europe/Paris`, `UTC`); empty means UTC.
pub fn time_zone(value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Ok("UTC".into());
    }
    parse_time_zone(value)
        .map(|_| value.to_owned())
        .map_err(|_| {
            Status::invalid_argument(format!(
                "site.time_zone {value:?} is not an IANA time zone name such as Europe/Paris or UTC"
            ))
        })
}

/// Converts a plan's schedule, checking every window. `paused_dates` is output only
/// in plans (holidays are managed with PutHoliday), so it is ignored here.
pub fn schedule(field: &str, s: &pb::Schedule) -> Result<Schedule, Status> {
    let input = pb::Schedule {
        paused_dates: Vec::new(),
        ..s.clone()
    };
    Schedule::try_from(&input).map_err(|e| match e {
        ScheduleWireError::Invalid(_) => Status::invalid_argument(format!("{field}: {e}")),
        _ => Status::invalid_argument(format!("{field}.{e}")),
    })
}

/// Converts the policy enum; unspecified means PRESERVE.
pub fn policy(value: i32) -> Result<store::LocalCodePolicy, Status> {
    match pb::LocalCodePolicy::try_from(value) {
        Ok(pb::LocalCodePolicy::Unspecified | pb::LocalCodePolicy::Preserve) => {
            Ok(store::LocalCodePolicy::Preserve)
        }
        Ok(pb::LocalCodePolicy::Authoritative) => Ok(store::LocalCodePolicy::Authoritative),
        Err(_) => Err(Status::invalid_argument(format!(
            "site.local_code_policy {value} is not PRESERVE or AUTHORITATIVE"
        ))),
    }
}

/// Checks a partition number field (0 = none).
pub fn partition_opt(field: &str, value: i32) -> Result<Option<u8>, Status> {
    match value {
        0 => Ok(None),
        n => partition(field, n).map(Some),
    }
}

/// Checks a partition number 1..=8.
pub fn partition(field: &str, value: i32) -> Result<u8, Status> {
    wire::partition(value).ok_or_else(|| {
        Status::invalid_argument(format!("{field} must be 1..{MAX_PARTITIONS}, got {value}"))
    })
}

/// Resolves the model of a new device from `kind` and `model`.
pub fn device_model(kind: i32, model: &str) -> Result<&'static DeviceModel, Status> {
    let kind = match pb::DeviceKind::try_from(kind) {
        // Unspecified: the model alone says.
        Ok(pb::DeviceKind::Unspecified) => None,
        Ok(known) => DeviceKind::try_from(known).ok(),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "device.kind {kind} is not a device kind"
            )));
        }
    };
    let known = || {
        DeviceModel::all()
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (kind, model) {
        (None, "") => Err(Status::invalid_argument(format!(
            "device.kind or device.model is required (models: {})",
            known()
        ))),
        (Some(kind), "") => Ok(DeviceModel::default_for(kind)),
        (kind, id) => {
            let m = DeviceModel::find(id).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "device.model {id:?} is unknown; known models: {}",
                    known()
                ))
            })?;
            match kind {
                Some(k) if k != m.kind => Err(Status::invalid_argument(format!(
                    "device.model {id} is a {}, but device.kind says {k}",
                    m.kind
                ))),
                _ => Ok(m),
            }
        }
    }
}

/// Parses a PIN field and applies the policy every code must meet.
pub fn pin(field: &str, value: &str) -> Result<Pin, Status> {
    let pin = Pin::parse(value).map_err(|e| pin_status(field, e))?;
    pin.check_not_guessable()
        .map_err(|e| pin_status(field, e))?;
    Ok(pin)
}

/// Converts a credential scope; devices must belong to `site`.
pub fn scope(site: Uuid, scope: Option<&pb::CredentialScope>) -> Result<store::Scope, Status> {
    let Some(scope) = scope else {
        return Err(Status::invalid_argument(
            "credential.scope is required: name panel partitions, locks or doors",
        ));
    };
    let devices = |field: &str, names: &[String]| -> Result<Vec<Uuid>, Status> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let name = DeviceName::parse(n)
                    .map_err(|e| name_status(&format!("credential.scope.{field}[{i}]"), e))?;
                if name.site != site {
                    return Err(Status::invalid_argument(format!(
                        "credential.scope.{field}[{i}] names a device of another site"
                    )));
                }
                Ok(name.device)
            })
            .collect()
    };
    Ok(store::Scope {
        panel_partitions: scope
            .panel_partitions
            .iter()
            .map(|p| partition("credential.scope.panel_partitions", *p))
            .collect::<Result<_, _>>()?,
        locks: devices("locks", &scope.locks)?,
        doors: devices("doors", &scope.doors)?,
    })
}

/// Converts a user's levels: one per partition, each partition 1..8, level set.
pub fn authorities(field: &str, items: &[pb::PartitionAuthority]) -> Result<Authorities, Status> {
    wire::authorities(items).map_err(|e| {
        Status::invalid_argument(match e {
            AuthorityWireError::Partition { index, value } => {
                format!("{field}[{index}].partition must be 1..{MAX_PARTITIONS}, got {value}")
            }
            AuthorityWireError::Level { index, .. } => {
                format!("{field}[{index}].level must be set (LEVEL_MASTER .. LEVEL_DURESS)")
            }
            AuthorityWireError::Duplicate { partition } => format!(
                "{field} lists partition {partition} twice; a user has one level per partition"
            ),
        })
    })
}

/// A protobuf timestamp as a chrono instant.
pub fn timestamp(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Status> {
    wire::instant(t).map_err(|e| Status::invalid_argument(format!("{field} {e}")))
}

/// The kind of an event an agent reports: only kinds a device logs; the others are
/// keyplaned's own and never taken from an agent.
pub fn device_event_kind(kind: i32) -> Result<EventKind, Status> {
    wire::decode::<pb::EventKind, EventKind>(kind, "event kind")
        .ok()
        .filter(|k| k.device_logged())
        .ok_or_else(|| Status::invalid_argument(format!("event.kind {kind} is not an event kind")))
}

/// Converts slot-status threshold overrides: each set duration must be positive and
/// at most a week; unset fields keep the defaults.
pub fn status_thresholds(
    t: Option<&pb::SlotStatusThresholds>,
) -> Result<keyplane_core::status::SiteThresholds, Status> {
    use keyplane_core::status::{SiteThresholds, ThresholdOverride};
    let Some(t) = t else {
        return Ok(SiteThresholds::default());
    };
    let d = |field: &str,
             d: Option<&prost_types::Duration>|
     -> Result<Option<chrono::Duration>, Status> {
        let Some(d) = d else { return Ok(None) };
        let ms = d
            .seconds
            .checked_mul(1000)
            .and_then(|s| s.checked_add(i64::from(d.nanos) / 1_000_000))
            .filter(|ms| *ms > 0 && *ms <= 7 * 24 * 3600 * 1000)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "site.status_thresholds.{field} must be positive and at most 7 days"
                ))
            })?;
        Ok(Some(chrono::Duration::milliseconds(ms)))
    };
    let k = |kind: &str, o: Option<&pb::KindThresholds>| -> Result<ThresholdOverride, Status> {
        let Some(o) = o else {
            return Ok(ThresholdOverride::default());
        };
        Ok(ThresholdOverride {
            setting: d(
                &format!("{kind}.delay_in_setting"),
                o.delay_in_setting.as_ref(),
            )?,
            removing: d(
                &format!("{kind}.delay_in_removing"),
                o.delay_in_removing.as_ref(),
            )?,
            offline: d(&format!("{kind}.device_offline"), o.device_offline.as_ref())?,
        })
    };
    Ok(SiteThresholds {
        panel: k("panel", t.panel.as_ref())?,
        lock: k("lock", t.lock.as_ref())?,
        door: k("door", t.door.as_ref())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn time_zone_table() {
        for (tz, ok) in [
            ("", true),
            ("UTC", true),
            ("Europe/Paris", true),
            ("America/Argentina/Buenos_Aires", true),
            ("Etc/GMT+5", true),
            ("Mars/Olympus", false),
            ("Europe//Paris", false),
            ("Europe/Paris; DROP", false),
        ] {
            assert_eq!(time_zone(tz).is_ok(), ok, "{tz:?}");
        }
    }

    #[test]
    fn device_model_table() {
        let lock = pb::DeviceKind::Lock as i32;
        let panel = pb::DeviceKind::Panel as i32;
        assert_eq!(device_model(lock, "").expect("default").id, "zwave-lock-30");
        assert_eq!(
            device_model(0, "vista-128bpt").expect("by model").kind,
            DeviceKind::Panel
        );
        assert!(device_model(panel, "zwave-lock-30").is_err());
        assert!(device_model(0, "").is_err());
        assert!(device_model(0, "nope").is_err());
        assert!(device_model(99, "").is_err());
    }

    #[test]
    fn agent_reported_event_kinds_table() {
        // Every wire value: only the kinds a device logs are taken from an agent.
        for wire in -1..=12 {
            let got = device_event_kind(wire);
            let want = (1..=7).contains(&wire);
            assert_eq!(got.is_ok(), want, "{wire}");
            if let Err(status) = got {
                assert_eq!(status.code(), Code::InvalidArgument);
            }
        }
    }

    #[test]
    fn schedule_field_names_the_field_and_ignores_paused_dates() {
        let window = pb::TimeWindow {
            days: vec![1, 8],
            start_time: "08:00".into(),
            end_time: "18:00".into(),
        };
        let s = pb::Schedule {
            windows: vec![window.clone()],
            ..Default::default()
        };
        let err = schedule("plan.schedule", &s).expect_err("day 8");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message()
                .starts_with("plan.schedule.windows[0].days has an unknown day"),
            "{}",
            err.message()
        );
        let ok = pb::Schedule {
            windows: vec![pb::TimeWindow {
                days: vec![1],
                ..window
            }],
            paused_dates: vec!["not a date".into()],
            ..Default::default()
        };
        let read = schedule("plan.schedule", &ok).expect("paused dates are output only");
        assert!(read.paused_dates.is_empty());
    }
}
