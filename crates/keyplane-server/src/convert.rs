//! Protobuf <-> domain conversion. Protobuf is loose, domain types are strict: every
//! field is checked here, once, and a bad one is a precise INVALID_ARGUMENT.

use crate::error::{name_status, pin_status};
use chrono::{DateTime, NaiveDate, Utc, Weekday};
use keyplane_core::authority::{Authorities, Level};
use keyplane_core::names::{DeviceName, MAX_PARTITIONS};
use keyplane_core::pin::Pin;
use keyplane_core::schedule::{
    Schedule, ScheduleError, Window, day_bit, format_time, parse_time, parse_time_zone,
};
use keyplane_core::{DeviceKind, DeviceModel};
use keyplane_proto::v1 as pb;
use keyplane_store as store;
use std::time::SystemTime;
use tonic::Status;
use uuid::Uuid;

/// Default and maximum page sizes of List calls.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Largest page a List call returns.
pub const MAX_PAGE_SIZE: i64 = 500;

fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(t))
}

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

/// Converts a schedule, checking every window.
pub fn schedule(field: &str, s: &pb::Schedule) -> Result<Schedule, Status> {
    let bad = |e: ScheduleError| Status::invalid_argument(format!("{field}: {e}"));
    let date = |name: &str, v: &str| -> Result<Option<NaiveDate>, Status> {
        if v.is_empty() {
            return Ok(None);
        }
        NaiveDate::parse_from_str(v, "%Y-%m-%d")
            .map(Some)
            .map_err(|_| {
                Status::invalid_argument(format!("{field}.{name} {v:?} is not a date YYYY-MM-DD"))
            })
    };
    let mut windows = Vec::new();
    for (i, w) in s.windows.iter().enumerate() {
        let mut days = 0u8;
        for d in &w.days {
            let day = match pb::DayOfWeek::try_from(*d) {
                Ok(pb::DayOfWeek::Monday) => Weekday::Mon,
                Ok(pb::DayOfWeek::Tuesday) => Weekday::Tue,
                Ok(pb::DayOfWeek::Wednesday) => Weekday::Wed,
                Ok(pb::DayOfWeek::Thursday) => Weekday::Thu,
                Ok(pb::DayOfWeek::Friday) => Weekday::Fri,
                Ok(pb::DayOfWeek::Saturday) => Weekday::Sat,
                Ok(pb::DayOfWeek::Sunday) => Weekday::Sun,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "{field}.windows[{i}].days has an unknown day"
                    )));
                }
            };
            days |= day_bit(day);
        }
        windows.push(Window {
            days,
            start: parse_time(&w.start_time).map_err(bad)?,
            end: parse_time(&w.end_time).map_err(bad)?,
        });
    }
    let out = Schedule {
        windows,
        valid_from: date("valid_from", &s.valid_from)?,
        valid_until: date("valid_until", &s.valid_until)?,
        // Holidays are managed with PutHoliday, not per plan.
        paused_dates: Vec::new(),
    };
    out.validate().map_err(bad)?;
    Ok(out)
}

/// Schedule to protobuf.
pub fn schedule_pb(s: &Schedule) -> pb::Schedule {
    let all = [
        (Weekday::Mon, pb::DayOfWeek::Monday),
        (Weekday::Tue, pb::DayOfWeek::Tuesday),
        (Weekday::Wed, pb::DayOfWeek::Wednesday),
        (Weekday::Thu, pb::DayOfWeek::Thursday),
        (Weekday::Fri, pb::DayOfWeek::Friday),
        (Weekday::Sat, pb::DayOfWeek::Saturday),
        (Weekday::Sun, pb::DayOfWeek::Sunday),
    ];
    pb::Schedule {
        windows: s
            .windows
            .iter()
            .map(|w| pb::TimeWindow {
                days: all
                    .iter()
                    .filter(|(d, _)| w.days & day_bit(*d) != 0)
                    .map(|(_, p)| *p as i32)
                    .collect(),
                start_time: format_time(w.start),
                end_time: format_time(w.end),
            })
            .collect(),
        valid_from: s.valid_from.map(|d| d.to_string()).unwrap_or_default(),
        valid_until: s.valid_until.map(|d| d.to_string()).unwrap_or_default(),
        paused_dates: s.paused_dates.iter().map(|d| d.to_string()).collect(),
    }
}

/// Personal access plan to protobuf.
pub fn plan_pb(p: &store::PersonalPlan) -> pb::PersonalAccessPlan {
    pb::PersonalAccessPlan {
        name: format!("sites/{}/users/{}/personalAccessPlan", p.site, p.user),
        configured: p.configured,
        access_points: p
            .access_points
            .iter()
            .map(|d| format!("sites/{}/devices/{d}", p.site))
            .collect(),
        schedule: p.schedule.as_ref().map(schedule_pb),
        etag: p.version.to_string(),
        update_time: ts(p.update_time),
    }
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
    u8::try_from(value)
        .ok()
        .filter(|n| (1..=MAX_PARTITIONS).contains(n))
        .ok_or_else(|| {
            Status::invalid_argument(format!("{field} must be 1..{MAX_PARTITIONS}, got {value}"))
        })
}

/// Resolves the model of a new device from `kind` and `model`.
pub fn device_model(kind: i32, model: &str) -> Result<&'static DeviceModel, Status> {
    let kind = match pb::DeviceKind::try_from(kind) {
        Ok(pb::DeviceKind::Panel) => Some(DeviceKind::Panel),
        Ok(pb::DeviceKind::Lock) => Some(DeviceKind::Lock),
        Ok(pb::DeviceKind::Door) => Some(DeviceKind::Door),
        Ok(pb::DeviceKind::Unspecified) => None,
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

fn kind_pb(kind: DeviceKind) -> pb::DeviceKind {
    match kind {
        DeviceKind::Panel => pb::DeviceKind::Panel,
        DeviceKind::Lock => pb::DeviceKind::Lock,
        DeviceKind::Door => pb::DeviceKind::Door,
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

/// Page token encoding: opaque to clients, hex of `p2`, the list call it was issued
/// by (method and parent, e.g. `ListUsers sites/…`) and the last key returned, so a
/// token is only ever accepted by the call that issued it.
pub fn page_token_encode(list: &str, last_key: &str) -> String {
    hex::encode(format!("p2\n{list}\n{last_key}"))
}

fn malformed() -> Status {
    Status::invalid_argument("page_token is malformed: pass back next_page_token unchanged")
}

fn page_token_decode(list: &str, token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = hex::decode(token).map_err(|_| malformed())?;
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    let mut parts = text.splitn(3, '\n');
    let (Some("p2"), Some(issuer), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed());
    };
    if issuer != list {
        return Err(Status::invalid_argument(
            "page_token belongs to another list call (another collection or parent): pass back \
             the next_page_token of this same call, with the same parent, unchanged",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Checks page size and decodes a page token keyed by id, issued by `list`.
pub fn page(list: &str, page_size: i32, page_token: &str) -> Result<store::PageRequest, Status> {
    let limit = page_limit(page_size)?;
    let after = match page_token_decode(list, page_token)? {
        None => None,
        Some(k) => Some(Uuid::try_parse(&k).map_err(|_| malformed())?),
    };
    Ok(store::PageRequest { after, limit })
}

/// Checks page size and decodes a page token keyed by partition number.
pub fn page_partitions(list: &str, page_size: i32, page_token: &str) -> Result<(u8, i64), Status> {
    let limit = page_limit(page_size)?;
    let after = match page_token_decode(list, page_token)? {
        None => 0,
        Some(k) => k.parse().map_err(|_| malformed())?,
    };
    Ok((after, limit))
}

/// Checks page size and decodes a page token keyed by a numeric cursor.
pub fn page_cursor(list: &str, page_size: i32, page_token: &str) -> Result<(i64, i64), Status> {
    let limit = page_limit(page_size)?;
    let after = match page_token_decode(list, page_token)? {
        None => 0,
        Some(k) => k.parse().map_err(|_| malformed())?,
    };
    Ok((after, limit))
}

fn page_limit(page_size: i32) -> Result<i64, Status> {
    match i64::from(page_size) {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Status::invalid_argument("page_size must not be negative")),
        n => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// Splits a fetched page (fetched with limit + 1) into items and the next token,
/// issued for `list`.
pub fn page_split<T>(
    list: &str,
    mut items: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() > limit {
        items.truncate(limit);
        let next = items
            .last()
            .map(|i| page_token_encode(list, &key(i)))
            .unwrap_or_default();
        (items, next)
    } else {
        (items, String::new())
    }
}

/// The fields an Update call changes (AIP-134): those named in `update_mask`, or, with
/// no mask or an empty one, those the client set to a non-default value. `fields` lists
/// every updatable field with whether the request sets it.
pub fn mask_paths(
    mask: Option<&prost_types::FieldMask>,
    fields: &[(&str, bool)],
) -> Result<Vec<String>, Status> {
    let allowed = || {
        fields
            .iter()
            .map(|(p, _)| *p)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut paths: Vec<String> = Vec::new();
    // A comma-joined path is the JSON string form of a mask sent through a client that
    // did not split it; field names hold no commas, so splitting is unambiguous.
    let named = mask
        .iter()
        .flat_map(|m| m.paths.iter())
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty());
    for p in named {
        if !fields.iter().any(|(f, _)| *f == p) {
            return Err(Status::invalid_argument(format!(
                "update_mask path {p:?} cannot be updated; allowed: {}",
                allowed()
            )));
        }
        if !paths.iter().any(|q| q == p) {
            paths.push(p.to_owned());
        }
    }
    if paths.is_empty() {
        paths = fields
            .iter()
            .filter(|(_, set)| *set)
            .map(|(p, _)| (*p).to_owned())
            .collect();
    }
    if paths.is_empty() {
        return Err(Status::invalid_argument(format!(
            "nothing to update: set some of {} (to clear a field, name it in update_mask)",
            allowed()
        )));
    }
    Ok(paths)
}

/// Site to protobuf.
pub fn site_pb(s: &store::Site) -> pb::Site {
    pb::Site {
        name: format!("sites/{}", s.id),
        display_name: s.display_name.clone(),
        time_zone: s.time_zone.clone(),
        local_code_policy: match s.local_code_policy {
            store::LocalCodePolicy::Preserve => pb::LocalCodePolicy::Preserve,
            store::LocalCodePolicy::Authoritative => pb::LocalCodePolicy::Authoritative,
        } as i32,
        revision: s.revision,
        create_time: ts(s.create_time),
        update_time: ts(s.update_time),
        etag: s.version.to_string(),
    }
}

/// Partition to protobuf.
pub fn partition_pb(p: &store::Partition) -> pb::Partition {
    pb::Partition {
        name: format!("sites/{}/partitions/{}", p.site, p.number),
        number: i32::from(p.number),
        display_name: p.display_name.clone(),
        etag: p.version.to_string(),
    }
}

/// Model constraints to protobuf.
pub fn constraints_pb(m: &DeviceModel) -> pb::DeviceConstraints {
    pb::DeviceConstraints {
        kind: kind_pb(m.kind) as i32,
        first_slot: i32::from(m.first_slot),
        last_slot: i32::from(m.last_slot),
        reserved_slots: m.reserved_slots.iter().map(|s| i32::from(*s)).collect(),
        min_code_length: i32::from(m.min_code_length),
        max_code_length: i32::from(m.max_code_length),
        on_device_schedules: m.on_device_schedules,
        max_partitions: i32::from(m.max_partitions),
    }
}

/// Device to protobuf.
pub fn device_pb(d: &store::Device) -> pb::Device {
    pb::Device {
        name: d.name(),
        display_name: d.display_name.clone(),
        kind: kind_pb(d.kind()) as i32,
        model: d.model.id.to_owned(),
        partition: d.partition.map(i32::from).unwrap_or(0),
        perimeter: d.perimeter,
        constraints: Some(constraints_pb(d.model)),
        create_time: ts(d.create_time),
        update_time: ts(d.update_time),
        etag: d.version.to_string(),
    }
}

/// Level to protobuf.
pub fn level_pb(level: Level) -> pb::Level {
    match level {
        Level::Installer => pb::Level::Installer,
        Level::Master => pb::Level::Master,
        Level::Manager => pb::Level::Manager,
        Level::OperatorA => pb::Level::OperatorA,
        Level::OperatorB => pb::Level::OperatorB,
        Level::OperatorC => pb::Level::OperatorC,
        Level::Duress => pb::Level::Duress,
    }
}

/// Converts a user's levels: one per partition, each partition 1..8, level set.
pub fn authorities(field: &str, items: &[pb::PartitionAuthority]) -> Result<Authorities, Status> {
    let mut out = Authorities::new();
    for (i, a) in items.iter().enumerate() {
        let partition = partition(&format!("{field}[{i}].partition"), a.partition)?;
        let level = match pb::Level::try_from(a.level) {
            Ok(pb::Level::Unspecified) | Err(_) => None,
            Ok(l) => Level::from_number(l as i32 - 1),
        }
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{field}[{i}].level must be set (LEVEL_MASTER .. LEVEL_DURESS)"
            ))
        })?;
        if out.insert(partition, level).is_some() {
            return Err(Status::invalid_argument(format!(
                "{field} lists partition {partition} twice; a user has one level per partition"
            )));
        }
    }
    Ok(out)
}

/// User to protobuf.
pub fn user_pb(u: &store::User) -> pb::User {
    pb::User {
        name: format!("sites/{}/users/{}", u.site, u.id),
        display_name: u.display_name.clone(),
        create_time: ts(u.create_time),
        update_time: ts(u.update_time),
        etag: u.version.to_string(),
        authorities: u
            .authorities
            .iter()
            .map(|(p, l)| pb::PartitionAuthority {
                partition: i32::from(*p),
                level: level_pb(*l) as i32,
            })
            .collect(),
        open_close_reporting: u.open_close_reporting,
    }
}

/// Credential to protobuf; the PIN is never returned, only that one is set.
pub fn credential_pb(c: &store::Credential) -> pb::Credential {
    let device = |id: &Uuid| format!("sites/{}/devices/{id}", c.site);
    pb::Credential {
        name: format!("sites/{}/users/{}/credentials/{}", c.site, c.user, c.id),
        display_name: c.display_name.clone(),
        pin: String::new(),
        pin_set: true,
        scope: Some(pb::CredentialScope {
            panel_partitions: c
                .scope
                .panel_partitions
                .iter()
                .map(|p| i32::from(*p))
                .collect(),
            locks: c.scope.locks.iter().map(device).collect(),
            doors: c.scope.doors.iter().map(device).collect(),
        }),
        slots: c
            .slots
            .iter()
            .map(|s| pb::SlotAssignment {
                device: device(&s.device),
                slot: i32::from(s.slot),
                display_slot: s.display_slot.clone(),
            })
            .collect(),
        create_time: ts(c.create_time),
        update_time: ts(c.update_time),
        etag: c.version.to_string(),
        created_partition: c.created_partition.map(i32::from).unwrap_or(0),
        valid_from_time: c.valid_from.map(timestamp_pb),
        valid_until_time: c.valid_until.map(timestamp_pb),
        max_uses: c.max_uses.unwrap_or(0),
        uses: c.uses,
    }
}

fn count(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Local code to protobuf.
pub fn local_code_pb(l: &store::LocalCode) -> pb::LocalCode {
    pb::LocalCode {
        name: format!(
            "sites/{}/devices/{}/localCodes/{}",
            l.site, l.device, l.slot
        ),
        device: format!("sites/{}/devices/{}", l.site, l.device),
        slot: i32::from(l.slot),
        display_slot: l.model.display_slot(l.slot),
        pin_known: l.pin_known,
        removing: l.removing,
        observe_time: ts(l.observe_time),
    }
}

/// Sync status to protobuf.
pub fn sync_pb(s: &store::SiteSync) -> pb::SyncStatus {
    pb::SyncStatus {
        name: format!("sites/{}/syncStatus", s.site),
        desired_revision: s.revision,
        agent_connected: s.agent_connected,
        agent_last_seen_time: s.agent_last_seen.and_then(ts),
        setup_issues: s.setup_issues.clone(),
        devices: s
            .devices
            .iter()
            .map(|d| pb::DeviceSyncStatus {
                device: format!("sites/{}/devices/{}", s.site, d.device),
                desired_revision: d.desired_revision,
                applied_revision: d.applied_revision,
                pending_changes: i32::try_from(d.pending_changes).unwrap_or(i32::MAX),
                last_seen_time: d.last_seen.and_then(ts),
                in_sync: d.pending_changes == 0 && d.applied_revision >= d.desired_revision,
                managed_slots: count(d.managed_slots),
                local_slots: count(d.local_slots),
                drifted_slots: count(d.drifted_slots),
                conflicts: count(d.conflicts),
                unverifiable_slots: count(d.unverifiable_slots),
            })
            .collect(),
    }
}

/// A chrono instant as a protobuf timestamp.
pub fn timestamp_pb(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf timestamp as a chrono instant.
pub fn timestamp(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Status> {
    let nanos = u32::try_from(t.nanos)
        .map_err(|_| Status::invalid_argument(format!("{field} has negative nanos")))?;
    DateTime::from_timestamp(t.seconds, nanos)
        .ok_or_else(|| Status::invalid_argument(format!("{field} is out of range")))
}

/// Event kind to protobuf.
pub fn event_kind_pb(kind: store::EventKind) -> pb::EventKind {
    match kind {
        store::EventKind::Armed => pb::EventKind::Armed,
        store::EventKind::Disarmed => pb::EventKind::Disarmed,
        store::EventKind::ArmRefused => pb::EventKind::ArmRefused,
        store::EventKind::DisarmRefused => pb::EventKind::DisarmRefused,
        store::EventKind::Duress => pb::EventKind::Duress,
        store::EventKind::AccessGranted => pb::EventKind::AccessGranted,
        store::EventKind::AccessDenied => pb::EventKind::AccessDenied,
        store::EventKind::Lockdown => pb::EventKind::Lockdown,
        store::EventKind::LockdownReleased => pb::EventKind::LockdownReleased,
        store::EventKind::Drift => pb::EventKind::Drift,
        store::EventKind::LocalCodeCleared => pb::EventKind::LocalCodeCleared,
    }
}

/// Event kind from protobuf.
pub fn event_kind(kind: i32) -> Result<store::EventKind, Status> {
    match pb::EventKind::try_from(kind) {
        Ok(pb::EventKind::Armed) => Ok(store::EventKind::Armed),
        Ok(pb::EventKind::Disarmed) => Ok(store::EventKind::Disarmed),
        Ok(pb::EventKind::ArmRefused) => Ok(store::EventKind::ArmRefused),
        Ok(pb::EventKind::DisarmRefused) => Ok(store::EventKind::DisarmRefused),
        Ok(pb::EventKind::Duress) => Ok(store::EventKind::Duress),
        Ok(pb::EventKind::AccessGranted) => Ok(store::EventKind::AccessGranted),
        Ok(pb::EventKind::AccessDenied) => Ok(store::EventKind::AccessDenied),
        _ => Err(Status::invalid_argument(format!(
            "event.kind {kind} is not an event kind"
        ))),
    }
}

/// Event to protobuf.
pub fn event_pb(e: &store::Event) -> pb::Event {
    pb::Event {
        name: format!("sites/{}/events/{}", e.site, e.id),
        cursor: e.id,
        device: e
            .device
            .map(|d| format!("sites/{}/devices/{d}", e.site))
            .unwrap_or_default(),
        kind: event_kind_pb(e.kind) as i32,
        partition: e.partition.map(i32::from).unwrap_or(0),
        user_number: e.user_number.map(i32::from).unwrap_or(0),
        display_user_number: e
            .user_number
            .map(|n| match e.device_kind {
                Some(kind) => kind.display_slot(n),
                None => n.to_string(),
            })
            .unwrap_or_default(),
        user: e
            .user
            .map(|u| format!("sites/{}/users/{u}", e.site))
            .unwrap_or_default(),
        silent_alarm: e.silent_alarm,
        occur_time: ts(e.occur_time),
        create_time: ts(e.create_time),
        actor: e.actor.clone().unwrap_or_default(),
    }
}

/// Standard access plan to protobuf.
pub fn access_plan_pb(p: &store::AccessPlan) -> pb::StandardAccessPlan {
    pb::StandardAccessPlan {
        name: format!("sites/{}/accessPlans/{}", p.site, p.id),
        display_name: p.display_name.clone(),
        devices: p
            .devices
            .iter()
            .map(|d| format!("sites/{}/devices/{d}", p.site))
            .collect(),
        members: p
            .members
            .iter()
            .map(|u| format!("sites/{}/users/{u}", p.site))
            .collect(),
        schedule: p.schedule.as_ref().map(schedule_pb),
        etag: p.version.to_string(),
        update_time: ts(p.update_time),
    }
}

/// Holiday to protobuf.
pub fn holiday_pb(h: &store::Holiday) -> pb::Holiday {
    pb::Holiday {
        name: format!("sites/{}/holidays/{}", h.site, h.day),
        display_name: h.display_name.clone(),
        plans: h
            .plans
            .iter()
            .map(|p| format!("sites/{}/accessPlans/{p}", h.site))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let list = "ListUsers sites/a";
        let id = Uuid::new_v4();
        let token = page_token_encode(list, &id.to_string());
        assert_eq!(page(list, 10, &token).expect("valid").after, Some(id));
        for bad in [
            "zz",
            "00",
            &hex::encode("p1:x"),
            &hex::encode("p2\nListUsers sites/a"),
            &hex::encode("p2\nListUsers sites/a\nnot-a-uuid"),
        ] {
            let err = page(list, 10, bad).expect_err(bad);
            assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
            assert!(
                err.message().contains("malformed"),
                "{bad}: {}",
                err.message()
            );
        }
        assert_eq!(
            page(list, -1, "").expect_err("negative").code(),
            Code::InvalidArgument
        );
        assert_eq!(page(list, 0, "").expect("default").limit, DEFAULT_PAGE_SIZE);
        assert_eq!(
            page(list, 100_000, "").expect("capped").limit,
            MAX_PAGE_SIZE
        );
    }

    #[test]
    fn page_tokens_are_accepted_only_by_the_call_that_issued_them() {
        let issuer = "ListUsers sites/a";
        let token = page_token_encode(issuer, &Uuid::new_v4().to_string());
        let cursor = page_token_encode(issuer, "7");
        for other in [
            "ListSites",
            "ListUsers sites/b",
            "ListDevices sites/a",
            "ListUsers",
        ] {
            for err in [
                page(other, 10, &token).expect_err(other),
                page_partitions(other, 10, &cursor).expect_err(other),
                page_cursor(other, 10, &cursor).expect_err(other),
            ] {
                assert_eq!(err.code(), Code::InvalidArgument, "{other}");
                assert!(
                    err.message().contains("another list call"),
                    "{other}: {}",
                    err.message()
                );
            }
        }
        assert_eq!(page_cursor(issuer, 10, &cursor).expect("same call").0, 7);
        let (items, next) = page_split(issuer, vec![1, 2, 3], 2, |i| i.to_string());
        assert_eq!(items, vec![1, 2]);
        assert_eq!(page_cursor(issuer, 10, &next).expect("own token").0, 2);
        assert!(page_cursor("ListEvents sites/a", 10, &next).is_err());
    }

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
    fn mask_paths_table() {
        let fields = [("display_name", true), ("pin", false), ("scope", true)];
        let mask = |p: &[&str]| prost_types::FieldMask {
            paths: p.iter().map(|s| (*s).to_owned()).collect(),
        };
        type Want<'a> = Result<&'a [&'a str], &'a str>;
        let cases: &[(Option<prost_types::FieldMask>, Want)] = &[
            // No mask, or an empty one: the fields set.
            (None, Ok(&["display_name", "scope"])),
            (Some(mask(&[])), Ok(&["display_name", "scope"])),
            // A mask: exactly its paths, set or not (naming an unset field clears it).
            (Some(mask(&["pin"])), Ok(&["pin"])),
            (Some(mask(&["pin", "scope", "pin"])), Ok(&["pin", "scope"])),
            (Some(mask(&["pin,scope"])), Ok(&["pin", "scope"])),
            (Some(mask(&["valid"])), Err("\"valid\" cannot be updated")),
        ];
        for (m, want) in cases {
            let got = mask_paths(m.as_ref(), &fields).map_err(|s| s.message().to_owned());
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g, *w, "{m:?}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{m:?}: {g}"),
                (w, g) => panic!("{m:?}: want {w:?}, got {g:?}"),
            }
        }
        let none = mask_paths(None, &[("display_name", false)]).expect_err("nothing set");
        assert!(none.message().contains("nothing to update"));
    }
}
