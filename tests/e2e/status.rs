//! Issue 11: every code tells its own truth. The status of each credential on each
//! device, its issues, and the roll-ups, as a dealer reads them, with the real agent
//! and simulated devices. Every wait is on observable progress.

use crate::fixture::{SYNC_TIMEOUT, Site, lock_scope};
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
async fn a_device_refusing_a_code_says_so_and_the_error_clears_when_it_takes_it()
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
