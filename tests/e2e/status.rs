//! Issue 11: every code tells its own truth. The status of each credential on each
//! device, its issues, and the roll-ups, as a dealer reads them, with the real agent
//! and simulated devices. Every wait is on observable progress.

use crate::fixture::{SYNC_TIMEOUT, Site, id_of, lock_scope};
use chrono::{Datelike, Duration, Utc};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::eventually;

async fn get(s: &Site, credential: &str) -> anyhow::Result<pb::Credential> {
    Ok(s.admin
        .clone()
        .get_credential(pb::GetCredentialRequest {
            name: credential.to_owned(),
        })
        .await?
        .into_inner())
}

fn on<'a>(c: &'a pb::Credential, device: &pb::Device) -> Option<&'a pb::SlotAssignment> {
    c.slots.iter().find(|s| s.device == device.name)
}

fn state_on(c: &pb::Credential, device: &pb::Device) -> Option<pb::SlotAssignmentStatus> {
    on(c, device).and_then(|s| s.state.clone())
}

/// Waits until the credential's assignment on `device` satisfies `ready`.
async fn wait_state(
    s: &Site,
    credential: &str,
    device: &pb::Device,
    what: &str,
    ready: impl Fn(&pb::SlotAssignmentStatus) -> bool,
) -> anyhow::Result<pb::Credential> {
    eventually(what, SYNC_TIMEOUT, || async {
        let c = get(s, credential).await?;
        Ok(state_on(&c, device).filter(|st| ready(st)).map(|_| c))
    })
    .await
}

fn codes(issues: &[pb::SlotIssue]) -> Vec<pb::SlotIssueCode> {
    issues
        .iter()
        .map(|i| pb::SlotIssueCode::try_from(i.code).unwrap_or_default())
        .collect()
}

fn status(st: &pb::SlotAssignmentStatus) -> pb::SlotStatus {
    pb::SlotStatus::try_from(st.status).unwrap_or_default()
}

#[tokio::test]
async fn a_code_moves_from_setting_to_set() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let c = s.credential(&alice, "2580", lock_scope(&[&lock])).await?;
    // Not on the lock yet: the agent is not even running.
    let before = get(&s, &c.name).await?;
    let st = state_on(&before, &lock).expect("a status on the lock");
    assert_eq!(status(&st), pb::SlotStatus::Setting);
    assert_eq!(
        st.pending_changes
            .iter()
            .map(|p| p.kind)
            .collect::<Vec<_>>(),
        vec![pb::PendingChangeKind::Creating as i32]
    );
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    let counts = before.slot_status.expect("a roll-up");
    assert_eq!((counts.total, counts.pending, counts.set), (1, 1, 0));

    let _agent = s.start_agent();
    let after = wait_state(&s, &c.name, &lock, "SET on the lock", |st| {
        status(st) == pb::SlotStatus::Set
    })
    .await?;
    let st = state_on(&after, &lock).expect("a status");
    assert!(st.pending_changes.is_empty());
    assert!(st.errors.is_empty() && st.warnings.is_empty(), "{st:?}");
    let slot = on(&after, &lock).expect("assigned");
    assert_eq!(
        s.slots(&lock)?.get(&(slot.slot as u16)).map(String::as_str),
        Some("2580")
    );
    let counts = after.slot_status.expect("a roll-up");
    assert_eq!((counts.total, counts.set, counts.pending), (1, 1, 0));

    let sync = s.wait_synced().await?;
    let rollup = sync.rollup.expect("a site roll-up").counts.expect("counts");
    assert_eq!((rollup.total, rollup.set, rollup.failed), (1, 1, 0));
    assert!(
        sync.slots.is_empty(),
        "nothing needs attention: {:?}",
        sync.slots
    );
    Ok(())
}

#[tokio::test]
async fn a_device_refusing_a_code_shows_failed_to_set_on_device_with_its_reason_until_it_takes_it()
-> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    const REASON: &str = "motor jammed (E42)";
    s.sim(&lock)?.set_refusing(Some(REASON))?;
    let c = s.credential(&alice, "3719", lock_scope(&[&lock])).await?;
    let _agent = s.start_agent();
    let refused = wait_state(&s, &c.name, &lock, "the refusal reported", |st| {
        codes(&st.errors).contains(&pb::SlotIssueCode::FailedToSetOnDevice)
    })
    .await?;
    let st = state_on(&refused, &lock).expect("a status");
    assert_eq!(status(&st), pb::SlotStatus::Setting);
    assert_eq!(
        codes(&st.errors),
        vec![pb::SlotIssueCode::FailedToSetOnDevice]
    );
    let failed = &st.errors[0];
    assert_eq!(failed.severity, pb::IssueSeverity::Error as i32);
    assert!(failed.create_time.is_some());
    assert!(
        failed.device_reason.contains(REASON),
        "the device's own words: {}",
        failed.device_reason
    );
    assert!(failed.detail.contains(REASON), "{}", failed.detail);
    assert!(
        !failed.detail.contains("3719") && !failed.device_reason.contains("3719"),
        "never a PIN: {failed:?}"
    );
    assert!(
        st.warnings.is_empty(),
        "the error explains the delay: {:?}",
        st.warnings
    );
    assert_eq!(refused.slot_status.expect("roll-up").failed, 1);
    assert!(!s.slots(&lock)?.values().any(|p| p == "3719"));
    wait_event(
        &s,
        &c.name,
        pb::EventKind::FailedToSetOnDevice,
        Some(pb::SlotIssueCode::FailedToSetOnDevice),
    )
    .await?;

    // The lock takes codes again: the agent's next try lands, and the error ends.
    s.sim(&lock)?.set_refusing(None)?;
    let set = wait_state(&s, &c.name, &lock, "SET once the lock takes it", |st| {
        status(st) == pb::SlotStatus::Set && st.errors.is_empty()
    })
    .await?;
    assert_eq!(set.slot_status.expect("roll-up").set, 1);
    assert!(s.slots(&lock)?.values().any(|p| p == "3719"));
    wait_event(
        &s,
        &c.name,
        pb::EventKind::SlotIssueCleared,
        Some(pb::SlotIssueCode::FailedToSetOnDevice),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_device_refusing_a_duplicate_says_so_and_the_error_clears_when_it_takes_it()
-> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    // Someone keyed the same code into slot 20 at the lock: the lock refuses a copy.
    s.sim(&lock)?.program_at_keypad(20, "3719")?;
    let c = s.credential(&alice, "3719", lock_scope(&[&lock])).await?;
    let _agent = s.start_agent();
    let refused = wait_state(&s, &c.name, &lock, "the refusal reported", |st| {
        codes(&st.errors).contains(&pb::SlotIssueCode::DuplicateCodeOnDevice)
    })
    .await?;
    let st = state_on(&refused, &lock).expect("a status");
    assert_eq!(status(&st), pb::SlotStatus::Setting);
    let dup = st
        .errors
        .iter()
        .find(|i| i.code == pb::SlotIssueCode::DuplicateCodeOnDevice as i32)
        .expect("the refusal");
    assert_eq!(dup.severity, pb::IssueSeverity::Error as i32);
    assert!(dup.create_time.is_some());
    assert!(!dup.detail.contains("3719"), "never a PIN: {}", dup.detail);
    assert_eq!(refused.slot_status.expect("roll-up").failed, 1);

    // GetSyncStatus names the assignment and counts the issue.
    let sync = s.sync_status().await?;
    let rollup = sync.rollup.expect("a site roll-up");
    assert_eq!(rollup.counts.expect("counts").failed, 1);
    assert!(
        rollup
            .issues
            .iter()
            .any(|i| i.code == pb::SlotIssueCode::DuplicateCodeOnDevice as i32 && i.count == 1)
    );
    assert!(
        sync.slots
            .iter()
            .any(|a| a.credential == c.name && a.device == lock.name),
        "{:?}",
        sync.slots
    );

    // The copy goes; the lock takes the code on the agent's next try and the error ends.
    s.sim(&lock)?.clear_at_keypad(20)?;
    let set = wait_state(&s, &c.name, &lock, "SET after the copy went", |st| {
        status(st) == pb::SlotStatus::Set && st.errors.is_empty()
    })
    .await?;
    assert_eq!(set.slot_status.expect("roll-up").set, 1);
    Ok(())
}

#[tokio::test]
async fn a_code_changed_at_the_keypad_is_modified_at_device_naming_the_slot() -> anyhow::Result<()>
{
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let c = s.credential(&alice, "4826", lock_scope(&[&lock])).await?;
    let _agent = s.start_agent();
    let set = wait_state(&s, &c.name, &lock, "SET", |st| {
        status(st) == pb::SlotStatus::Set
    })
    .await?;
    let slot = on(&set, &lock).expect("assigned").slot;
    s.sim(&lock)?.program_at_keypad(slot as u16, "9513")?;
    let drifted = wait_state(&s, &c.name, &lock, "the change at the keypad seen", |st| {
        codes(&st.errors).contains(&pb::SlotIssueCode::CodeModifiedAtDevice)
    })
    .await?;
    let st = state_on(&drifted, &lock).expect("a status");
    assert_eq!(status(&st), pb::SlotStatus::Unset);
    let issue = st
        .errors
        .iter()
        .find(|i| i.code == pb::SlotIssueCode::CodeModifiedAtDevice as i32)
        .expect("the drift");
    assert_eq!(issue.slot, slot);
    assert!(!issue.cleared);
    assert!(!issue.detail.contains("9513") && !issue.detail.contains("4826"));
    // GetSyncStatus names the drifted slot.
    let sync = s.sync_status().await?;
    let device = sync
        .devices
        .iter()
        .find(|d| d.device == lock.name)
        .expect("the lock");
    assert_eq!(
        device.findings.as_ref().expect("findings").drifted_slots,
        vec![slot]
    );
    Ok(())
}

async fn configure(
    s: &mut Site,
    user: &str,
    points: &[&pb::Device],
    schedule: Option<pb::Schedule>,
) -> anyhow::Result<()> {
    s.admin
        .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: format!("{user}/personalAccessPlan"),
                access_points: points.iter().map(|d| d.name.clone()).collect(),
                schedule,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["access_points".into(), "schedule".into()],
            }),
        })
        .await?;
    Ok(())
}

fn both(s: &Site) -> pb::CredentialScope {
    pb::CredentialScope {
        panel_partitions: vec![1],
        locks: vec![s.lock.name.clone()],
        doors: Vec::new(),
    }
}

#[tokio::test]
async fn a_plan_without_the_panel_withholds_the_panel_code_and_shows_no_slot_there()
-> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (panel, lock, alice) = (s.panel.clone(), s.lock.clone(), s.alice.clone());
    let scope = both(&s);
    let c = s.credential(&alice, "6047", scope).await?;
    configure(&mut s, &alice, &[&lock], None).await?;
    let _agent = s.start_agent();
    s.wait_synced().await?;
    let c = wait_state(&s, &c.name, &lock, "SET on the lock", |st| {
        status(st) == pb::SlotStatus::Set
    })
    .await?;
    let st = state_on(&c, &panel).expect("a status on the panel");
    assert_eq!(status(&st), pb::SlotStatus::Withheld);
    let withheld = st.withheld.expect("why");
    assert_eq!(withheld.reason, pb::WithheldReason::NotAnAccessPoint as i32);
    assert!(withheld.set_time.is_none());
    // No user number is shown on the panel: none holds the code.
    let on_panel = on(&c, &panel).expect("the panel listed");
    assert_eq!((on_panel.slot, on_panel.display_slot.as_str()), (0, ""));
    assert!(!s.slots(&panel)?.values().any(|p| p == "6047"));
    let counts = c.slot_status.expect("roll-up");
    assert_eq!((counts.total, counts.set, counts.withheld), (2, 1, 1));
    Ok(())
}

#[tokio::test]
async fn a_schedule_withholds_the_panel_code_outside_its_window_until_it_opens()
-> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (panel, alice) = (s.panel.clone(), s.alice.clone());
    // A window three days from now (site time), so it is closed whenever this runs.
    let paris = chrono_tz::Europe::Paris;
    let day = (Utc::now().with_timezone(&paris) + Duration::days(3)).weekday();
    let schedule = pb::Schedule {
        windows: vec![pb::TimeWindow {
            days: vec![day.number_from_monday() as i32],
            start_time: "10:00".into(),
            end_time: "11:00".into(),
        }],
        ..Default::default()
    };
    let c = s
        .credential(
            &alice,
            "7305",
            pb::CredentialScope {
                panel_partitions: vec![1],
                ..Default::default()
            },
        )
        .await?;
    configure(&mut s, &alice, &[&panel], Some(schedule)).await?;
    let _agent = s.start_agent();
    s.wait_synced().await?;
    let c = get(&s, &c.name).await?;
    let st = state_on(&c, &panel).expect("a status on the panel");
    assert_eq!(status(&st), pb::SlotStatus::Withheld, "{st:?}");
    let withheld = st.withheld.expect("why");
    assert_eq!(withheld.reason, pb::WithheldReason::OutsideSchedule as i32);
    let at = withheld.set_time.expect("when it will be set");
    let at = chrono::DateTime::from_timestamp(at.seconds, 0).expect("instant");
    let local = at.with_timezone(&paris);
    assert_eq!(
        (local.weekday(), local.format("%H:%M").to_string()),
        (day, "10:00".into())
    );
    assert!(
        st.pending_changes
            .iter()
            .any(|p| p.kind == pb::PendingChangeKind::DeferredCreation as i32
                && p.at_time.as_ref().map(|t| t.seconds) == Some(at.timestamp()))
    );
    // The slot is kept for it: the code is written there when the window opens.
    assert!(on(&c, &panel).expect("listed").slot > 0);
    assert!(!s.slots(&panel)?.values().any(|p| p == "7305"));
    Ok(())
}

async fn device(s: &Site, d: &pb::Device) -> anyhow::Result<pb::Device> {
    Ok(s.admin
        .clone()
        .get_device(pb::GetDeviceRequest {
            name: d.name.clone(),
        })
        .await?
        .into_inner())
}

/// Makes the lock report code rules of its own, starts the agent and waits until
/// keyplaned publishes them.
async fn lock_reporting(
    s: &Site,
    rules: &[&str],
) -> anyhow::Result<keyplane_testkit::server::TestAgent> {
    s.sim(&s.lock)?
        .set_reported(Some(keyplane_devices::SimReported {
            rules: Some(rules.iter().map(|r| (*r).to_owned()).collect()),
            ..Default::default()
        }))?;
    let agent = s.start_agent();
    let want = rules.len();
    eventually("the lock's own rules published", SYNC_TIMEOUT, || async {
        let d = device(s, &s.lock).await?;
        let capacity = d.constraints.and_then(|c| c.capacity).unwrap_or_default();
        Ok((capacity.source == pb::ConstraintSource::Reported as i32
            && capacity.code_rules.len() == want)
            .then_some(()))
    })
    .await?;
    Ok(agent)
}

#[tokio::test]
async fn a_code_breaking_a_rule_the_lock_reported_is_refused_naming_it() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    // Published from the profile before anything is reported.
    let before = device(&s, &lock).await?.constraints.expect("constraints");
    let capacity = before.capacity.expect("capacity");
    assert_eq!(capacity.source, pb::ConstraintSource::Profile as i32);
    assert_eq!(capacity.slots_used, 0);
    assert_eq!(capacity.slots_free, capacity.slots_total);

    let _agent = lock_reporting(&s, &["no_repeated_digit"]).await?;
    let refused = s
        .credential(&alice, "4841", lock_scope(&[&lock]))
        .await
        .expect_err("4841 repeats a digit");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let msg = refused.message();
    assert!(msg.contains("no_repeated_digit"), "{msg}");
    assert!(msg.contains(&lock.name), "{msg}");
    assert!(!msg.contains("4841"), "never the code: {msg}");
    // The panel did not report the rule: the same code is fine there.
    s.credential(
        &alice,
        "4841",
        pb::CredentialScope {
            panel_partitions: vec![1],
            ..Default::default()
        },
    )
    .await?;
    // A code keeping the rule is taken, and the lock's capacity counts it.
    s.credential(&alice, "4852", lock_scope(&[&lock])).await?;
    let capacity = device(&s, &lock)
        .await?
        .constraints
        .and_then(|c| c.capacity)
        .expect("capacity");
    assert_eq!(capacity.slots_used, 1);
    assert_eq!(capacity.slots_free, capacity.slots_total - 1);
    assert_eq!(
        capacity.code_rules,
        vec![pb::CodeRule::NoRepeatedDigit as i32]
    );
    Ok(())
}

#[tokio::test]
async fn a_generated_pin_fits_every_device_in_scope_and_is_shown_once() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (panel, lock, alice) = (s.panel.clone(), s.lock.clone(), s.alice.clone());
    let _agent = lock_reporting(&s, &["no_repeated_digit", "no_straight_run"]).await?;
    let scope = both(&s);
    let created = s
        .admin
        .create_credential(pb::CreateCredentialRequest {
            parent: alice.clone(),
            credential: Some(pb::Credential {
                display_name: "generated".into(),
                scope: Some(scope),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: true,
        })
        .await?
        .into_inner();
    let pin = created.pin.clone();
    let panel_model = keyplane_core::DeviceModel::find(&panel.model).expect("model");
    assert!(
        panel_model.accepts_length(pin.len()),
        "{} digits",
        pin.len()
    );
    let digits: Vec<i32> = pin.bytes().map(|b| i32::from(b - b'0')).collect();
    let mut seen = std::collections::BTreeSet::new();
    assert!(digits.iter().all(|d| seen.insert(*d)), "a digit repeats");
    assert!(
        !digits
            .windows(3)
            .any(|w| (w[1] - w[0]).abs() == 1 && w[2] - w[1] == w[1] - w[0]),
        "a straight run"
    );
    // Never shown again.
    let again = get(&s, &created.name).await?;
    assert!(again.pin.is_empty());
    // And it reaches both devices.
    for d in [&panel, &lock] {
        wait_state(&s, &created.name, d, "SET", |st| {
            status(st) == pb::SlotStatus::Set
        })
        .await?;
        assert!(s.slots(d)?.values().any(|p| *p == pin));
    }
    // A PIN and generate_pin together are refused.
    let both_asked = s
        .admin
        .create_credential(pb::CreateCredentialRequest {
            parent: alice,
            credential: Some(pb::Credential {
                pin: "5827".into(),
                scope: Some(lock_scope(&[&lock])),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: true,
        })
        .await
        .expect_err("one or the other");
    assert_eq!(both_asked.code(), tonic::Code::InvalidArgument);
    Ok(())
}

/// Every event of the site so far (status events included).
async fn events(s: &Site) -> anyhow::Result<Vec<pb::Event>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = s
            .admin
            .clone()
            .list_events(pb::ListEventsRequest {
                parent: s.site.clone(),
                page_size: 500,
                page_token,
            })
            .await?
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

/// Waits until an event of `kind` (about `issue`, when given) names the credential.
async fn wait_event(
    s: &Site,
    credential: &str,
    kind: pb::EventKind,
    issue: Option<pb::SlotIssueCode>,
) -> anyhow::Result<pb::Event> {
    let what = format!("event {kind:?} {issue:?}");
    eventually(&what, SYNC_TIMEOUT, || async {
        Ok(events(s).await?.into_iter().find(|e| {
            e.kind == kind as i32
                && e.credential == credential
                && issue.is_none_or(|i| e.issue == i as i32)
        }))
    })
    .await
}

#[tokio::test]
async fn a_code_setting_becomes_set_and_says_so_on_the_event_stream() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    let _agent = s.start_agent();
    let c = s.credential(&alice, "2946", lock_scope(&[&lock])).await?;
    let set = wait_event(&s, &c.name, pb::EventKind::SetOnDevice, None).await?;
    assert_eq!(set.device, lock.name);
    let slot = on(&get(&s, &c.name).await?, &lock).expect("assigned").slot;
    assert_eq!(set.user_number, slot);
    assert_eq!(set.user, alice);
    // Said once: a re-evaluation of an unchanged assignment raises nothing. Another
    // credential's event is the observable progress to wait on.
    let other = s.credential(&alice, "3957", lock_scope(&[&lock])).await?;
    wait_event(&s, &other.name, pb::EventKind::SetOnDevice, None).await?;
    let sets = events(&s)
        .await?
        .into_iter()
        .filter(|e| e.kind == pb::EventKind::SetOnDevice as i32 && e.credential == c.name)
        .count();
    assert_eq!(sets, 1);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_lock_is_late_then_offline_and_both_clear_when_it_returns()
-> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice, site) = (s.lock.clone(), s.alice.clone(), s.site.clone());
    // Small thresholds for this site's locks: late after 1 s, offline after 2 s.
    let updated = s
        .admin
        .update_site(pb::UpdateSiteRequest {
            site: Some(pb::Site {
                name: site.clone(),
                status_thresholds: Some(pb::SlotStatusThresholds {
                    lock: Some(pb::KindThresholds {
                        delay_in_setting: Some(prost_types::Duration {
                            seconds: 1,
                            nanos: 0,
                        }),
                        device_offline: Some(prost_types::Duration {
                            seconds: 2,
                            nanos: 0,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["status_thresholds".into()],
            }),
        })
        .await?
        .into_inner();
    let lock_thresholds = updated
        .status_thresholds
        .and_then(|t| t.lock)
        .expect("lock thresholds");
    assert_eq!(lock_thresholds.delay_in_setting.map(|d| d.seconds), Some(1));

    let _agent = s.start_agent();
    s.wait_synced().await?;
    s.sim(&lock)?.set_unreachable(true)?;
    let c = s.credential(&alice, "8361", lock_scope(&[&lock])).await?;
    let late = wait_state(&s, &c.name, &lock, "delay_in_setting", |st| {
        codes(&st.warnings).contains(&pb::SlotIssueCode::DelayInSetting)
    })
    .await?;
    assert_eq!(
        status(&state_on(&late, &lock).expect("state")),
        pb::SlotStatus::Setting
    );
    wait_state(&s, &c.name, &lock, "device_offline", |st| {
        codes(&st.warnings).contains(&pb::SlotIssueCode::DeviceOffline)
    })
    .await?;
    wait_event(
        &s,
        &c.name,
        pb::EventKind::DelayInSettingOnDevice,
        Some(pb::SlotIssueCode::DelayInSetting),
    )
    .await?;
    wait_event(
        &s,
        &c.name,
        pb::EventKind::SlotIssueRaised,
        Some(pb::SlotIssueCode::DeviceOffline),
    )
    .await?;
    // Which comes first is the thresholds' order (core's table tests); asserting it
    // here would time the sweep.

    // Back: the code lands, and both warnings clear.
    s.sim(&lock)?.set_unreachable(false)?;
    let back = wait_state(&s, &c.name, &lock, "SET with no warning", |st| {
        status(st) == pb::SlotStatus::Set && st.warnings.is_empty() && st.errors.is_empty()
    })
    .await?;
    assert!(on(&back, &lock).is_some());
    wait_event(&s, &c.name, pb::EventKind::SetOnDevice, None).await?;
    for issue in [
        pb::SlotIssueCode::DelayInSetting,
        pb::SlotIssueCode::DeviceOffline,
    ] {
        wait_event(&s, &c.name, pb::EventKind::SlotIssueCleared, Some(issue)).await?;
    }
    Ok(())
}

#[tokio::test]
async fn an_armed_panel_defers_programming_and_says_which_partition() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (panel, alice, site) = (s.panel.clone(), s.alice.clone(), s.site.clone());
    let panel_only = || pb::CredentialScope {
        panel_partitions: vec![1],
        ..Default::default()
    };
    s.credential(&alice, "4821", panel_only()).await?;
    let _agent = s.start_agent();
    s.wait_synced().await?;
    let mut sim = s.sim(&panel)?;
    assert_eq!(sim.arm(1, "4821")?, keyplane_devices::PanelOutcome::Armed);
    let bella = crate::fixture::create_user_with(
        &mut s.admin,
        &site,
        "Bella",
        &[(1, pb::Level::OperatorA)],
    )
    .await?;
    let c = s.credential(&bella, "5927", panel_only()).await?;
    let deferred = wait_state(&s, &c.name, &panel, "programming deferred", |st| {
        codes(&st.warnings).contains(&pb::SlotIssueCode::PanelArmedProgrammingDeferred)
    })
    .await?;
    let st = state_on(&deferred, &panel).expect("a status");
    assert_eq!(status(&st), pb::SlotStatus::Setting);
    let w = st
        .warnings
        .iter()
        .find(|w| w.code == pb::SlotIssueCode::PanelArmedProgrammingDeferred as i32)
        .expect("the warning");
    assert_eq!(w.partition, 1);
    assert!(!s.slots(&panel)?.values().any(|p| p == "5927"));
    // keyplaned's own evaluation saw it too (the event stream says so).
    wait_event(
        &s,
        &c.name,
        pb::EventKind::SlotIssueRaised,
        Some(pb::SlotIssueCode::PanelArmedProgrammingDeferred),
    )
    .await?;

    assert_eq!(
        sim.disarm(1, "4821")?,
        keyplane_devices::PanelOutcome::Disarmed
    );
    wait_state(&s, &c.name, &panel, "SET once disarmed", |st| {
        status(st) == pb::SlotStatus::Set && st.warnings.is_empty()
    })
    .await?;
    assert!(s.slots(&panel)?.values().any(|p| p == "5927"));
    wait_event(
        &s,
        &c.name,
        pb::EventKind::SlotIssueCleared,
        Some(pb::SlotIssueCode::PanelArmedProgrammingDeferred),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_deleted_code_is_removing_until_the_lock_confirms_then_removed() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    let agent = s.start_agent();
    let c = s.credential(&alice, "7150", lock_scope(&[&lock])).await?;
    wait_event(&s, &c.name, pb::EventKind::SetOnDevice, None).await?;
    // The agent is away when the code is deleted: the code is still on the lock.
    agent.stop().await?;
    s.admin
        .delete_credential(pb::DeleteCredentialRequest {
            name: c.name.clone(),
            etag: String::new(),
        })
        .await?;
    let admin = s.admin.clone();
    let name = format!("{}/syncStatus", s.site);
    let leaving = eventually("REMOVING in the sync status", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let name = name.clone();
        let credential = c.name.clone();
        async move {
            let sync = admin
                .get_sync_status(pb::GetSyncStatusRequest {
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(sync.slots.into_iter().find(|a| {
                a.credential == credential
                    && a.status == pb::SlotStatus::Removing as i32
                    && codes(&a.warnings).contains(&pb::SlotIssueCode::AgentDisconnected)
            }))
        }
    })
    .await?;
    assert_eq!(leaving.device, lock.name);
    assert!(
        leaving
            .pending_changes
            .iter()
            .any(|p| p.kind == pb::PendingChangeKind::Removing as i32)
    );
    assert!(s.slots(&lock)?.values().any(|p| p == "7150"));
    // keyplaned's own evaluation saw the removal waiting for the agent.
    wait_event(
        &s,
        &c.name,
        pb::EventKind::SlotIssueRaised,
        Some(pb::SlotIssueCode::AgentDisconnected),
    )
    .await?;

    let _agent = s.start_agent();
    wait_event(&s, &c.name, pb::EventKind::RemovedFromDevice, None).await?;
    assert!(!s.slots(&lock)?.values().any(|p| p == "7150"));
    let sync = s.sync_status().await?;
    assert!(
        sync.slots.iter().all(|a| a.credential != c.name),
        "{:?}",
        sync.slots
    );
    Ok(())
}

#[tokio::test]
async fn a_backup_code_pulled_while_the_agent_is_away_opens_the_lock_at_once() -> anyhow::Result<()>
{
    let mut s = Site::new().await?;
    let (lock, panel, site) = (s.lock.clone(), s.panel.clone(), s.site.clone());
    // Panels never hold backup codes.
    let refused = s
        .admin
        .configure_backup_codes(pb::ConfigureBackupCodesRequest {
            site: site.clone(),
            devices: vec![panel.name.clone()],
            size: 2,
        })
        .await
        .expect_err("a panel");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let pool = s
        .admin
        .configure_backup_codes(pb::ConfigureBackupCodesRequest {
            site: site.clone(),
            devices: vec![lock.name.clone()],
            size: 2,
        })
        .await?
        .into_inner();
    assert_eq!((pool.size, pool.available), (2, 2));
    let agent = s.start_agent();
    s.wait_synced().await?;
    assert_eq!(s.slots(&lock)?.len(), 2, "the pool is on the lock");

    // The site goes offline; a dealer pulls a code for Bob on the phone.
    agent.stop().await?;
    let bob = crate::fixture::create_user(&mut s.admin, &site, "Bob").await?;
    let pulled = s
        .admin
        .pull_backup_code(pb::PullBackupCodeRequest {
            user: bob.clone(),
            display_name: "Bob's emergency code".into(),
        })
        .await?
        .into_inner();
    assert!(pulled.name.starts_with(&bob));
    let pin = pulled.pin.clone();
    assert!(!pin.is_empty());
    let mut sim = s.sim(&lock)?;
    assert_eq!(
        sim.present(&pin, Utc::now())?,
        keyplane_devices::AccessOutcome::Granted,
        "already on the lock"
    );
    // Bob holds it now; its PIN is not shown again.
    let got = get(&s, &pulled.name).await?;
    assert!(got.pin.is_empty());
    assert_eq!(got.display_name, "Bob's emergency code");
    let sync = s.sync_status().await?;
    assert!(
        sync.setup_issues.iter().all(|i| !i.contains("backup")),
        "refilled at once: {:?}",
        sync.setup_issues
    );

    // Back online: Bob's code shows SET on the lock, and the refill lands too.
    let _agent = s.start_agent();
    s.wait_synced().await?;
    wait_state(&s, &pulled.name, &lock, "SET for Bob", |st| {
        status(st) == pb::SlotStatus::Set
    })
    .await?;
    assert_eq!(s.slots(&lock)?.len(), 3);
    Ok(())
}

fn kinds(st: &pb::SlotAssignmentStatus) -> Vec<pb::PendingChangeKind> {
    st.pending_changes
        .iter()
        .map(|p| pb::PendingChangeKind::try_from(p.kind).unwrap_or_default())
        .collect()
}

/// `st` with every timestamp cleared, so its Debug text shows only what could hold a PIN.
fn without_times(st: &pb::SlotAssignmentStatus) -> pb::SlotAssignmentStatus {
    let mut st = st.clone();
    if let Some(withheld) = st.withheld.as_mut() {
        withheld.set_time = None;
    }
    for change in &mut st.pending_changes {
        change.at_time = None;
    }
    for issue in st.errors.iter_mut().chain(st.warnings.iter_mut()) {
        issue.create_time = None;
    }
    st
}

#[tokio::test]
async fn a_pending_change_tells_a_schedule_change_from_a_code_change() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    let agent = s.start_agent();
    let c = s.credential(&alice, "5038", lock_scope(&[&lock])).await?;
    // keyplaned's evaluation saw the lock hold it (and recorded what it holds).
    wait_event(&s, &c.name, pb::EventKind::SetOnDevice, None).await?;
    agent.stop().await?;

    // The plan gains a schedule while the agent is away: only the schedule changes.
    let schedule = pb::Schedule {
        windows: vec![pb::TimeWindow {
            days: vec![1, 2, 3, 4, 5],
            start_time: "08:00".into(),
            end_time: "18:00".into(),
        }],
        ..Default::default()
    };
    configure(&mut s, &alice, &[&lock], Some(schedule)).await?;
    let st = state_on(&get(&s, &c.name).await?, &lock).expect("a status");
    assert_eq!(status(&st), pb::SlotStatus::Setting, "{st:?}");
    assert_eq!(kinds(&st), vec![pb::PendingChangeKind::UpdatingSchedule]);
    let change = &st.pending_changes[0];
    assert!(
        change.from_schedules.is_none(),
        "the lock had it always open"
    );
    let to = change.to_schedules.as_ref().expect("what it gets");
    assert_eq!(to.schedules.len(), 1);
    assert_eq!(to.schedules[0].windows[0].start_time, "08:00");

    // Then the PIN changes too: both are on their way, and neither PIN is shown.
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: c.name.clone(),
                pin: "6149".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["pin".into()],
            }),
        })
        .await?;
    let st = state_on(&get(&s, &c.name).await?, &lock).expect("a status");
    assert_eq!(
        kinds(&st),
        vec![
            pb::PendingChangeKind::UpdatingCode,
            pb::PendingChangeKind::UpdatingSchedule
        ]
    );
    // Its times are numbers that may hold these digits by chance; every other field is shown.
    let shown = format!("{:?}", without_times(&st));
    assert!(
        !shown.contains("5038") && !shown.contains("6149"),
        "{shown}"
    );

    // Back: the lock takes both, nothing is pending.
    let _agent = s.start_agent();
    let set = wait_state(&s, &c.name, &lock, "SET with the new code", |st| {
        status(st) == pb::SlotStatus::Set && st.pending_changes.is_empty()
    })
    .await?;
    assert!(state_on(&set, &lock).is_some());
    assert!(s.slots(&lock)?.values().any(|p| p == "6149"));
    Ok(())
}

/// The demo site on a server whose own status sweep is off (`status_interval` 0), so
/// a test says when keyplaned evaluates (`keyplane_server::status::evaluate`).
async fn site_without_sweep() -> anyhow::Result<(Site, keyplane_testkit::proxy::CountingProxy)> {
    let (server, proxy) = keyplane_testkit::server::TestServer::start_counted().await?;
    Ok((Site::on_server(server, "zwave-lock-30").await?, proxy))
}

#[tokio::test]
async fn a_removal_is_removing_whether_or_not_it_was_evaluated_before() -> anyhow::Result<()> {
    let (mut s, _proxy) = site_without_sweep().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    let site = crate::fixture::id_of(&s.site)?;
    let agent = s.start_agent();
    let c = s.credential(&alice, "7261", lock_scope(&[&lock])).await?;
    wait_state(&s, &c.name, &lock, "SET", |st| {
        status(st) == pb::SlotStatus::Set
    })
    .await?;
    agent.stop().await?;
    let db = s.server.db.client().await?;
    let evaluated: i64 = db
        .query_one("SELECT count(*) FROM slot_state_last", &[])
        .await?
        .get(0);
    assert_eq!(evaluated, 0, "no evaluation was ever recorded");

    s.admin
        .delete_credential(pb::DeleteCredentialRequest {
            name: c.name.clone(),
            etag: String::new(),
        })
        .await?;
    let sync = s.sync_status().await?;
    let leaving = sync
        .slots
        .iter()
        .find(|a| a.credential == c.name)
        .expect("the removal listed");
    assert_eq!(leaving.device, lock.name);
    assert_eq!(
        leaving.status,
        pb::SlotStatus::Removing as i32,
        "{leaving:?}"
    );
    assert_eq!(
        leaving
            .pending_changes
            .iter()
            .map(|p| p.kind)
            .collect::<Vec<_>>(),
        vec![pb::PendingChangeKind::Removing as i32]
    );
    assert!(s.slots(&lock)?.values().any(|p| p == "7261"));

    // The lock confirms; keyplaned's next evaluation says it was removed, then
    // forgets it.
    let _agent = s.start_agent();
    s.wait_synced().await?;
    assert!(!s.slots(&lock)?.values().any(|p| p == "7261"));
    keyplane_server::status::evaluate(&s.server.store, site).await?;
    assert!(
        events(&s)
            .await?
            .iter()
            .any(|e| e.credential == c.name && e.kind == pb::EventKind::RemovedFromDevice as i32),
        "removed_from_device raised"
    );
    let sync = s.sync_status().await?;
    assert!(
        sync.slots.iter().all(|a| a.credential != c.name),
        "{:?}",
        sync.slots
    );
    Ok(())
}

#[tokio::test]
async fn the_first_evaluation_of_codes_set_before_it_raises_no_events_a_later_change_does()
-> anyhow::Result<()> {
    let (mut s, _proxy) = site_without_sweep().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    let site = crate::fixture::id_of(&s.site)?;
    let _agent = s.start_agent();
    let mut names = Vec::new();
    for pin in ["2417", "3528", "4639"] {
        let c = s.credential(&alice, pin, lock_scope(&[&lock])).await?;
        wait_state(&s, &c.name, &lock, "SET", |st| {
            status(st) == pb::SlotStatus::Set
        })
        .await?;
        names.push(c.name);
    }
    // As migration 0013 leaves a site that held codes before the sweep existed.
    let db = s.server.db.client().await?;
    db.execute(
        "UPDATE site SET status_baseline = true WHERE id = $1",
        &[&site],
    )
    .await?;
    let raised = keyplane_server::status::evaluate(&s.server.store, site).await?;
    assert_eq!(raised, 0, "codes set long ago are not news");
    assert!(events(&s).await?.iter().all(|e| e.credential.is_empty()));
    let recorded: i64 = db
        .query_one(
            "SELECT count(*) FROM slot_state_last WHERE site_id = $1",
            &[&site],
        )
        .await?
        .get(0);
    assert_eq!(recorded, 3, "the baseline is recorded");
    let baseline: bool = db
        .query_one("SELECT status_baseline FROM site WHERE id = $1", &[&site])
        .await?
        .get(0);
    assert!(!baseline, "once");

    // A real transition afterwards raises its event, and only its own.
    let c = s.credential(&alice, "5740", lock_scope(&[&lock])).await?;
    wait_state(&s, &c.name, &lock, "SET", |st| {
        status(st) == pb::SlotStatus::Set
    })
    .await?;
    let raised = keyplane_server::status::evaluate(&s.server.store, site).await?;
    assert_eq!(raised, 1);
    let sets: Vec<String> = events(&s)
        .await?
        .into_iter()
        .filter(|e| e.kind == pb::EventKind::SetOnDevice as i32)
        .map(|e| e.credential)
        .collect();
    assert_eq!(sets, vec![c.name.clone()]);
    Ok(())
}

#[tokio::test]
async fn the_backup_pool_user_is_not_a_person_of_the_user_api() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (lock, site, alice) = (s.lock.clone(), s.site.clone(), s.alice.clone());
    let pool = s
        .admin
        .configure_backup_codes(pb::ConfigureBackupCodesRequest {
            site: site.clone(),
            devices: vec![lock.name.clone()],
            size: 1,
        })
        .await?
        .into_inner();
    let pool_user = pool.pool_user.clone();
    assert!(!pool_user.is_empty());
    let listed = s
        .admin
        .list_users(pb::ListUsersRequest {
            parent: site.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        listed
            .users
            .iter()
            .map(|u| u.name.clone())
            .collect::<Vec<_>>(),
        vec![alice],
        "people only"
    );
    let got = s
        .admin
        .get_user(pb::GetUserRequest {
            name: pool_user.clone(),
        })
        .await
        .expect_err("hidden");
    assert_eq!(got.code(), tonic::Code::NotFound);
    let renamed = s
        .admin
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: pool_user.clone(),
                display_name: "Someone".into(),
                ..Default::default()
            }),
            update_mask: crate::fixture::mask(&["display_name"]),
        })
        .await
        .expect_err("not changed through the user API");
    assert_eq!(renamed.code(), tonic::Code::NotFound);
    let deleted = s
        .admin
        .delete_user(pb::DeleteUserRequest {
            name: pool_user.clone(),
            etag: String::new(),
        })
        .await
        .expect_err("not deleted through the user API");
    assert_eq!(deleted.code(), tonic::Code::NotFound);
    // Nor through the calls that reach a user's codes and plan.
    let code = s
        .admin
        .create_credential(pb::CreateCredentialRequest {
            parent: pool_user.clone(),
            credential: Some(pb::Credential {
                pin: "7391".into(),
                scope: Some(crate::fixture::lock_scope(&[&lock])),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("no codes of one's own under the pool user");
    assert_eq!(code.code(), tonic::Code::NotFound, "{code:?}");
    let plan = s
        .admin
        .update_personal_access_plan(pb::UpdatePersonalAccessPlanRequest {
            plan: Some(pb::PersonalAccessPlan {
                name: format!("{pool_user}/personalAccessPlan"),
                access_points: vec![lock.name.clone()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("the pool user has no plan to change");
    assert_eq!(plan.code(), tonic::Code::NotFound, "{plan:?}");
    let member = s
        .admin
        .create_access_plan(pb::CreateAccessPlanRequest {
            parent: site.clone(),
            plan: Some(pb::StandardAccessPlan {
                display_name: "Staff".into(),
                members: vec![pool_user.clone()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("the pool user is nobody's plan member");
    assert_eq!(member.code(), tonic::Code::NotFound, "{member:?}");
    // The pool still works: configured again, it keeps its holder and its code.
    let again = s
        .admin
        .configure_backup_codes(pb::ConfigureBackupCodesRequest {
            site: site.clone(),
            devices: vec![lock.name.clone()],
            size: 1,
        })
        .await?
        .into_inner();
    assert_eq!(
        (again.pool_user.as_str(), again.available),
        (pool_user.as_str(), 1)
    );
    Ok(())
}

#[tokio::test]
async fn a_backup_code_pull_or_pool_says_why_it_cannot_be() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let (site, alice) = (s.site.clone(), s.alice.clone());
    let pull = |user: &str| pb::PullBackupCodeRequest {
        user: user.to_owned(),
        display_name: String::new(),
    };
    let e = s
        .admin
        .pull_backup_code(pull(&alice))
        .await
        .expect_err("no pool");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("configure them first"), "{e}");

    let unknown = format!("{site}/devices/{}", uuid::Uuid::new_v4());
    let e = s
        .admin
        .configure_backup_codes(pb::ConfigureBackupCodesRequest {
            site: site.clone(),
            devices: vec![s.lock.name.clone(), unknown.clone()],
            size: 1,
        })
        .await
        .expect_err("an unknown device");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert!(e.message().contains(&unknown), "{e}");

    // A pool keeping no code: its user exists, it holds nothing.
    let pool = s
        .admin
        .configure_backup_codes(pb::ConfigureBackupCodesRequest {
            site: site.clone(),
            devices: vec![],
            size: 0,
        })
        .await?
        .into_inner();
    let e = s
        .admin
        .pull_backup_code(pull(&alice))
        .await
        .expect_err("empty pool");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("no backup code left"), "{e}");
    for user in [
        pool.pool_user.clone(),
        format!("{site}/users/{}", uuid::Uuid::new_v4()),
    ] {
        let e = s
            .admin
            .pull_backup_code(pull(&user))
            .await
            .expect_err("not a person of the site");
        assert_eq!(e.code(), tonic::Code::NotFound, "{user}: {e}");
        assert!(e.message().contains(&user), "{e}");
    }
    Ok(())
}

/// A replica refreshes the liveness of every agent it holds every 30 s; with 10,000
/// idle agents that refresh must not make their sites due for the status sweep (16
/// sites a second), or a site with a real change waits behind all of them. A new
/// stream on the site still does.
#[tokio::test]
async fn an_idle_agents_liveness_refresh_does_not_make_its_site_due() -> anyhow::Result<()> {
    let s = Site::new().await?;
    let site = id_of(&s.site)?;
    let db = s.server.db.client().await?;
    let status_seq = || async {
        let row = db
            .query_one("SELECT status_seq FROM site WHERE id = $1", &[&site])
            .await?;
        anyhow::Ok(row.get::<_, i64>(0))
    };
    // An agent's stream, as opening it records it, a while ago.
    db.execute(
        "UPDATE site SET agent_session = gen_random_uuid(), agent_connected = true,
            agent_last_seen = now() - interval '20 seconds' WHERE id = $1",
        &[&site],
    )
    .await?;
    let before = status_seq().await?;

    assert_eq!(s.server.store.agents_seen(&[site]).await?, 1);
    let refreshed: bool = db
        .query_one(
            "SELECT agent_last_seen > now() - interval '10 seconds' FROM site WHERE id = $1",
            &[&site],
        )
        .await?
        .get(0);
    assert!(refreshed, "the refresh records the agent as seen");
    assert_eq!(status_seq().await?, before, "a refresh is not news");

    // The agent reconnects (through any replica): a new session is.
    db.execute(
        "UPDATE site SET agent_session = gen_random_uuid(), agent_last_seen = now() WHERE id = $1",
        &[&site],
    )
    .await?;
    assert!(status_seq().await? > before, "a new stream is news");
    // And so is the stream closing.
    let reopened = status_seq().await?;
    db.execute(
        "UPDATE site SET agent_connected = false, agent_last_seen = now() WHERE id = $1",
        &[&site],
    )
    .await?;
    assert!(status_seq().await? > reopened, "a closed stream is news");
    Ok(())
}

/// A fleet connecting makes every site due. The sites holding no code are settled
/// together, one statement a tick, instead of queueing ahead of the sites with codes
/// at 16 evaluations a second; a site with a code is left due for its evaluation.
#[tokio::test]
async fn sites_without_codes_are_settled_together_and_sites_with_codes_stay_due()
-> anyhow::Result<()> {
    let (mut s, _proxy) = site_without_sweep().await?;
    let (lock, alice) = (s.lock.clone(), s.alice.clone());
    let busy = crate::fixture::id_of(&s.site)?;
    let quiet = crate::fixture::create_site(&mut s.admin, "Quiet", "Europe/Paris").await?;
    let quiet = crate::fixture::id_of(&quiet)?;
    s.credential(&alice, "7261", lock_scope(&[&lock])).await?;
    let db = s.server.db.client().await?;
    // Both agents connect.
    db.execute(
        "UPDATE site SET agent_session = gen_random_uuid(), agent_connected = true,
            agent_last_seen = now() WHERE id = ANY($1)",
        &[&vec![busy, quiet]],
    )
    .await?;
    let mut due = s.server.store.status_due_sites(100).await?;
    due.sort();
    let mut both = vec![busy, quiet];
    both.sort();
    assert_eq!(due, both);

    assert_eq!(s.server.store.status_settle_quiet_sites(100).await?, 1);
    assert_eq!(s.server.store.status_due_sites(100).await?, vec![busy]);
    let evaluated: bool = db
        .query_one(
            "SELECT status_evaluated_seq = status_seq AND NOT status_pending
               AND status_evaluated_at IS NOT NULL FROM site WHERE id = $1",
            &[&quiet],
        )
        .await?
        .get(0);
    assert!(evaluated, "the quiet site is recorded as evaluated");
    // Nothing is left to settle: the site with a code waits for its evaluation.
    assert_eq!(s.server.store.status_settle_quiet_sites(100).await?, 0);
    assert_eq!(s.server.store.status_due_sites(100).await?, vec![busy]);
    Ok(())
}
