//! Store records into wire resources (the responses of AdminService). Core values
//! inside them (schedules, levels, kinds, instants) go through the shared rules of
//! `keyplane_proto::convert`; names through keyplane-core's name types.

use keyplane_core::DeviceKind;
use keyplane_core::DeviceModel;
use keyplane_core::names::{
    AccessPlanName, CredentialName, DeviceName, EventName, HolidayName, LocalCodeName,
    PartitionName, PersonalPlanName, SiteName, SyncStatusName, UserName,
};
use keyplane_core::status::{Rollup, SiteRollup, SlotState, WithheldReason, slot_state};
use keyplane_proto::convert as wire;
use keyplane_proto::v1 as pb;
use keyplane_store as store;
use std::collections::HashMap;
use std::time::SystemTime;
use uuid::Uuid;

/// The decided status of each slot assignment, by (credential, device).
pub type SlotStates = HashMap<(Uuid, Uuid), (DeviceKind, u16, SlotState)>;

/// Decides the status of every assignment in `facts` (keyplane-core's rule).
pub fn slot_states(facts: &store::SlotStatusFacts) -> SlotStates {
    facts
        .assignments
        .iter()
        .map(|a| {
            (
                (a.credential, a.device),
                (a.model.kind, a.facts.slot, slot_state(&a.facts)),
            )
        })
        .collect()
}

fn ts(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(t))
}

fn device(site: Uuid, device: Uuid) -> String {
    DeviceName { site, device }.to_string()
}

fn user(site: Uuid, user: Uuid) -> String {
    UserName { site, user }.to_string()
}

/// Personal access plan to protobuf.
pub fn plan_pb(p: &store::PersonalPlan) -> pb::PersonalAccessPlan {
    pb::PersonalAccessPlan {
        name: PersonalPlanName {
            site: p.site,
            user: p.user,
        }
        .to_string(),
        configured: p.configured,
        access_points: p.access_points.iter().map(|d| device(p.site, *d)).collect(),
        schedule: p.schedule.as_ref().map(pb::Schedule::from),
        etag: p.version.to_string(),
        update_time: ts(p.update_time),
    }
}

/// Site to protobuf.
pub fn site_pb(s: &store::Site) -> pb::Site {
    pb::Site {
        name: SiteName { site: s.id }.to_string(),
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
        status_thresholds: Some(thresholds_pb(&s.status_thresholds)),
    }
}

fn thresholds_pb(t: &keyplane_core::status::SiteThresholds) -> pb::SlotStatusThresholds {
    let d = |d: Option<chrono::Duration>| {
        d.map(|d| prost_types::Duration {
            seconds: d.num_seconds(),
            nanos: d.subsec_nanos(),
        })
    };
    let k = |o: &keyplane_core::status::ThresholdOverride| pb::KindThresholds {
        delay_in_setting: d(o.setting),
        delay_in_removing: d(o.removing),
        device_offline: d(o.offline),
    };
    pb::SlotStatusThresholds {
        panel: Some(k(&t.panel)),
        lock: Some(k(&t.lock)),
        door: Some(k(&t.door)),
    }
}

/// Partition to protobuf.
pub fn partition_pb(p: &store::Partition) -> pb::Partition {
    pb::Partition {
        name: PartitionName {
            site: p.site,
            number: p.number,
        }
        .to_string(),
        number: i32::from(p.number),
        display_name: p.display_name.clone(),
        etag: p.version.to_string(),
    }
}

/// Model constraints to protobuf.
pub fn constraints_pb(m: &DeviceModel) -> pb::DeviceConstraints {
    let c = keyplane_core::constraints::DeviceConstraints::from_model(m);
    device_constraints_pb(m, &c, None)
}

/// A device's constraints in force (the profile's, with what it reported laid over
/// them), with its capacity given the occupied slots when known.
fn device_constraints_pb(
    m: &DeviceModel,
    c: &keyplane_core::constraints::DeviceConstraints,
    occupied: Option<&std::collections::BTreeSet<u16>>,
) -> pb::DeviceConstraints {
    pb::DeviceConstraints {
        kind: pb::DeviceKind::from(m.kind) as i32,
        first_slot: i32::from(c.first_slot),
        last_slot: i32::from(c.last_slot),
        reserved_slots: c.reserved_slots.iter().map(|s| i32::from(*s)).collect(),
        min_code_length: i32::from(c.min_code_length),
        max_code_length: i32::from(c.max_code_length),
        on_device_schedules: c.keeps_schedules,
        max_partitions: i32::from(m.max_partitions),
        capacity: occupied.map(|o| wire::capacity_pb(c, &c.capacity(o))),
    }
}

/// Device to protobuf with its published capacity (reads), given its occupied slots.
pub fn device_capacity_pb(
    d: &store::Device,
    occupied: Option<&std::collections::BTreeSet<u16>>,
) -> pb::Device {
    let mut out = device_pb(d);
    out.constraints = Some(device_constraints_pb(
        d.model,
        &d.constraints(),
        Some(occupied.unwrap_or(&std::collections::BTreeSet::new())),
    ));
    out
}

/// Device to protobuf.
pub fn device_pb(d: &store::Device) -> pb::Device {
    pb::Device {
        name: d.name(),
        display_name: d.display_name.clone(),
        kind: pb::DeviceKind::from(d.kind()) as i32,
        model: d.model.id.to_owned(),
        partition: d.partition.map(i32::from).unwrap_or(0),
        perimeter: d.perimeter,
        constraints: Some(device_constraints_pb(d.model, &d.constraints(), None)),
        create_time: ts(d.create_time),
        update_time: ts(d.update_time),
        etag: d.version.to_string(),
    }
}

/// User to protobuf.
pub fn user_pb(u: &store::User) -> pb::User {
    pb::User {
        name: user(u.site, u.id),
        display_name: u.display_name.clone(),
        create_time: ts(u.create_time),
        update_time: ts(u.update_time),
        etag: u.version.to_string(),
        authorities: wire::authorities_pb(&u.authorities),
        open_close_reporting: u.open_close_reporting,
    }
}

/// Credential to protobuf; the PIN is never returned, only that one is set.
pub fn credential_pb(c: &store::Credential) -> pb::Credential {
    credential_status_pb(c, None)
}

/// Credential to protobuf with the status of each of its slot assignments (reads).
/// A code kept off a device by the user's plan shows no slot there: no slot of the
/// device holds it.
pub fn credential_status_pb(c: &store::Credential, states: Option<&SlotStates>) -> pb::Credential {
    let name_of = |id: &Uuid| device(c.site, *id);
    let state_of = |d: &Uuid| states.and_then(|m| m.get(&(c.id, *d)));
    pb::Credential {
        name: CredentialName {
            site: c.site,
            user: c.user,
            credential: c.id,
        }
        .to_string(),
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
            locks: c.scope.locks.iter().map(name_of).collect(),
            doors: c.scope.doors.iter().map(name_of).collect(),
        }),
        slots: c
            .slots
            .iter()
            .map(|s| {
                let state = state_of(&s.device);
                let off = state.is_some_and(|(_, _, st)| {
                    st.withheld == Some(WithheldReason::NotAnAccessPoint)
                });
                pb::SlotAssignment {
                    device: name_of(&s.device),
                    slot: if off { 0 } else { i32::from(s.slot) },
                    display_slot: if off {
                        String::new()
                    } else {
                        s.display_slot.clone()
                    },
                    state: state.map(|(kind, slot, st)| {
                        wire::slot_state_pb(name_of(&s.device), *slot, *kind, st)
                    }),
                }
            })
            // Devices the code is leaving (out of scope), until they confirm it.
            .chain(
                states
                    .into_iter()
                    .flatten()
                    .filter(|((credential, d), _)| {
                        *credential == c.id && !c.slots.iter().any(|s| s.device == *d)
                    })
                    .map(|((_, d), (kind, slot, st))| pb::SlotAssignment {
                        device: name_of(d),
                        slot: i32::from(*slot),
                        display_slot: kind.display_slot(*slot),
                        state: Some(wire::slot_state_pb(name_of(d), *slot, *kind, st)),
                    }),
            )
            .collect(),
        slot_status: states.map(|m| {
            wire::rollup_pb(&Rollup::of(
                m.iter()
                    .filter(|((credential, _), _)| *credential == c.id)
                    .map(|(_, x)| &x.2),
            ))
        }),
        create_time: ts(c.create_time),
        update_time: ts(c.update_time),
        etag: c.version.to_string(),
        created_partition: c.created_partition.map(i32::from).unwrap_or(0),
        valid_from_time: c.valid_from.map(wire::timestamp),
        valid_until_time: c.valid_until.map(wire::timestamp),
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
        name: LocalCodeName {
            device: DeviceName {
                site: l.site,
                device: l.device,
            },
            slot: l.slot,
        }
        .to_string(),
        device: device(l.site, l.device),
        slot: i32::from(l.slot),
        display_slot: l.model.display_slot(l.slot),
        pin_known: l.pin_known,
        removing: l.removing,
        observe_time: ts(l.observe_time),
    }
}

/// Sync status to protobuf, with the site's roll-up, the assignments needing
/// attention and each device's named findings.
pub fn sync_pb(
    s: &store::SiteSync,
    facts: &store::SlotStatusFacts,
    states: &SlotStates,
) -> pb::SyncStatus {
    let rollup = SiteRollup::of(states.values().map(|x| &x.2));
    let findings: HashMap<Uuid, &store::DeviceFindings> =
        facts.findings.iter().map(|f| (f.device, f)).collect();
    let slots_pb = |v: &[u16]| v.iter().map(|n| i32::from(*n)).collect::<Vec<_>>();
    let mut attention: Vec<pb::SlotAssignmentStatus> = facts
        .assignments
        .iter()
        .filter_map(|a| {
            let (kind, slot, st) = states.get(&(a.credential, a.device))?;
            let quiet = st.issues.is_empty()
                && matches!(
                    st.status,
                    keyplane_core::status::SlotStatus::Set
                        | keyplane_core::status::SlotStatus::Withheld
                );
            if quiet {
                return None;
            }
            let mut out = wire::slot_state_pb(device(s.site, a.device), *slot, *kind, st);
            out.credential = CredentialName {
                site: s.site,
                user: a.user,
                credential: a.credential,
            }
            .to_string();
            Some(out)
        })
        .collect();
    attention.sort_by(|a, b| (&a.device, a.slot).cmp(&(&b.device, b.slot)));
    pb::SyncStatus {
        rollup: Some(wire::site_rollup_pb(&rollup)),
        slots: attention,
        name: SyncStatusName { site: s.site }.to_string(),
        desired_revision: s.revision,
        agent_connected: s.agent_connected,
        agent_last_seen_time: s.agent_last_seen.and_then(ts),
        setup_issues: s.setup_issues.clone(),
        // Filled by GetSyncStatus from the agent's last Hello.
        site_issues: Vec::new(),
        agent: None,
        // Filled by GetSyncStatus, which pages `slots`.
        next_page_token: String::new(),
        devices: s
            .devices
            .iter()
            .map(|d| pb::DeviceSyncStatus {
                device: device(s.site, d.device),
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
                findings: Some(match findings.get(&d.device) {
                    Some(f) => pb::DeviceSlotFindings {
                        device: device(s.site, d.device),
                        drifted_slots: slots_pb(&f.drifted),
                        conflicting_slots: slots_pb(&f.conflicting),
                        unverifiable_slots: slots_pb(&f.unverifiable),
                    },
                    None => pb::DeviceSlotFindings {
                        device: device(s.site, d.device),
                        ..Default::default()
                    },
                }),
            })
            .collect(),
    }
}

/// Event to protobuf; `after` is where the watch (or list) stands once it is delivered.
pub fn event_pb(e: &store::Event, after: &keyplane_core::event_cursor::WatchCursor) -> pb::Event {
    pb::Event {
        resume_token: after.encode(),
        site_sequence: e.site_seq,
        name: EventName {
            site: e.site,
            position: e.site_seq,
        }
        .to_string(),
        // Retired with event ids (docs/ARCHITECTURE.md, "Event order").
        cursor: 0,
        device: e.device.map(|d| device(e.site, d)).unwrap_or_default(),
        kind: pb::EventKind::from(e.kind) as i32,
        partition: e.partition.map(i32::from).unwrap_or(0),
        user_number: e.user_number.map(i32::from).unwrap_or(0),
        display_user_number: e
            .user_number
            .map(|n| match e.device_kind {
                Some(kind) => kind.display_slot(n),
                None => n.to_string(),
            })
            .unwrap_or_default(),
        user: e.user.map(|u| user(e.site, u)).unwrap_or_default(),
        silent_alarm: e.silent_alarm,
        occur_time: ts(e.occur_time),
        create_time: ts(e.create_time),
        actor: e.actor.clone().unwrap_or_default(),
        issue: e
            .issue
            .as_deref()
            .and_then(|i| {
                keyplane_core::status::IssueCode::ALL
                    .into_iter()
                    .find(|c| c.as_str() == i)
            })
            .map(|c| pb::SlotIssueCode::from(c) as i32)
            .unwrap_or(0),
        credential: match (e.credential, e.user) {
            (Some(credential), Some(user)) => CredentialName {
                site: e.site,
                user,
                credential,
            }
            .to_string(),
            _ => String::new(),
        },
    }
}

/// Standard access plan to protobuf.
pub fn access_plan_pb(p: &store::AccessPlan) -> pb::StandardAccessPlan {
    pb::StandardAccessPlan {
        name: AccessPlanName {
            site: p.site,
            plan: p.id,
        }
        .to_string(),
        display_name: p.display_name.clone(),
        devices: p.devices.iter().map(|d| device(p.site, *d)).collect(),
        members: p.members.iter().map(|u| user(p.site, *u)).collect(),
        schedule: p.schedule.as_ref().map(pb::Schedule::from),
        etag: p.version.to_string(),
        update_time: ts(p.update_time),
    }
}

/// Holiday to protobuf.
pub fn holiday_pb(h: &store::Holiday) -> pb::Holiday {
    pb::Holiday {
        name: HolidayName {
            site: h.site,
            day: h.day,
        }
        .to_string(),
        display_name: h.display_name.clone(),
        plans: h
            .plans
            .iter()
            .map(|p| {
                AccessPlanName {
                    site: h.site,
                    plan: *p,
                }
                .to_string()
            })
            .collect(),
    }
}

/// The site agent's last Hello for GetSyncStatus, and the site issues it raises
/// (`clock_skew`, docs/STATUS.md "Site issues").
pub fn agent_hello_pb(h: &store::AgentHelloInfo) -> (pb::AgentHelloInfo, Vec<pb::SiteIssue>) {
    let info = pb::AgentHelloInfo {
        agent_version: h.hello.agent_version.clone(),
        protocol_version: h.hello.protocol_version,
        tzdb_version: h.hello.tzdb_version.clone(),
        agent_time: h.hello.agent_time.and_then(ts),
        receive_time: ts(h.receive_time),
        clock_skew_millis: h.clock_skew_ms.unwrap_or(0),
        clock_skew_threshold_millis: h.clock_skew_threshold_ms,
    };
    let mut issues = Vec::new();
    if let (Some(since), Some(skew)) = (h.clock_skew_since, h.clock_skew_ms) {
        let direction = if skew >= 0 { "ahead of" } else { "behind" };
        issues.push(pb::SiteIssue {
            code: pb::SiteIssueCode::ClockSkew as i32,
            severity: pb::IssueSeverity::Warning as i32,
            create_time: ts(since),
            detail: format!(
                "the agent's clock is {:.1} s {direction} keyplaned's (threshold {:.1} s): schedules and validity periods open and close off time at the site; fix the site's time (NTP) and restart the agent",
                skew.unsigned_abs() as f64 / 1000.0,
                h.clock_skew_threshold_ms as f64 / 1000.0,
            ),
            clock_skew_millis: skew,
        });
    }
    (info, issues)
}
