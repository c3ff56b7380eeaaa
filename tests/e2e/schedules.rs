//! Seed 001: personal access plans, and schedules kept at the site even offline.

use crate::fixture::{SYNC_TIMEOUT, Site, create_device, create_user, lock_scope, panel_scope};
use chrono::{DateTime, Utc};
use keyplane_agent::clock::ManualClock;
use keyplane_devices::AccessOutcome;
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{TestAgent, eventually};
use std::sync::Arc;
use tonic::Code;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("rfc3339")
        .with_timezone(&Utc)
}

fn office_hours() -> pb::Schedule {
    use pb::DayOfWeek::*;
    pb::Schedule {
        windows: vec![pb::TimeWindow {
            days: [Monday, Tuesday, Wednesday, Thursday, Friday]
                .map(|d| d as i32)
                .to_vec(),
            start_time: "08:00".into(),
            end_time: "18:00".into(),
        }],
        ..Default::default()
    }
}

async fn configure(
    s: &mut Site,
    user: &str,
    points: &[&pb::Device],
    schedule: Option<pb::Schedule>,
) -> Result<pb::PersonalAccessPlan, tonic::Status> {
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
        .await
        .map(|r| r.into_inner())
}

/// Waits until the lock holds `pin` (or no longer does).
async fn lock_holds(s: &Site, device: &pb::Device, pin: &str, holds: bool) -> anyhow::Result<()> {
    let what = format!("lock {} {pin}", if holds { "to hold" } else { "to drop" });
    eventually(&what, SYNC_TIMEOUT, || async {
        Ok((s.slots(device)?.values().any(|c| c == pin) == holds).then_some(()))
    })
    .await
}

#[tokio::test]
async fn plans_need_a_pin_and_are_never_deleted() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let lock = s.lock.clone();
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    // Every user has one, created with the user, not configured yet.
    let plan = s
        .admin
        .get_personal_access_plan(pb::GetPersonalAccessPlanRequest {
            name: format!("{bob}/personalAccessPlan"),
        })
        .await?
        .into_inner();
    assert!(!plan.configured && plan.access_points.is_empty());
    // Without a PIN it cannot be configured.
    let err = configure(&mut s, &bob, &[&lock], Some(office_hours()))
        .await
        .expect_err("no pin");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("add a PIN first"),
        "{}",
        err.message()
    );
    // Doors are not access points of a personal plan.
    s.credential(&bob, "5927", lock_scope(&[&lock])).await?;
    let door = create_device(&mut s.admin, &site, "Garage door", "door-1000").await?;
    let err = configure(&mut s, &bob, &[&door], None)
        .await
        .expect_err("door");
    assert_eq!(err.code(), Code::InvalidArgument);
    // A bad schedule is refused precisely.
    let mut bad = office_hours();
    bad.windows[0].end_time = "08:00".into();
    let err = configure(&mut s, &bob, &[&lock], Some(bad))
        .await
        .expect_err("empty window");
    assert_eq!(err.code(), Code::InvalidArgument);
    let plan = configure(&mut s, &bob, &[&lock], Some(office_hours())).await?;
    assert!(plan.configured);
    assert_eq!(plan.schedule, Some(office_hours()));
    // Clearing keeps the plan: no access points, no schedule.
    let cleared = s
        .admin
        .clear_personal_access_plan(pb::ClearPersonalAccessPlanRequest {
            name: plan.name.clone(),
            etag: plan.etag.clone(),
        })
        .await?
        .into_inner();
    assert!(cleared.access_points.is_empty() && cleared.schedule.is_none());
    Ok(())
}

#[tokio::test]
async fn refused_where_doors_guard_every_perimeter_entrance() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    for device in [s.panel.clone(), lock.clone()] {
        s.admin
            .update_device(pb::UpdateDeviceRequest {
                device: Some(pb::Device {
                    name: device.name.clone(),
                    perimeter: false,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["perimeter".into()],
                }),
            })
            .await?;
    }
    create_device(&mut s.admin, &site, "Front door reader", "door-1000").await?;
    let err = configure(&mut s, &alice, &[&lock], Some(office_hours()))
        .await
        .expect_err("all doors");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("access-control door"),
        "{}",
        err.message()
    );
    Ok(())
}

async fn office_site() -> anyhow::Result<(Site, pb::Device, pb::Device)> {
    let mut s = Site::new().await?; // Europe/Paris
    let (lock, panel) = (s.lock.clone(), s.panel.clone());
    let alice = s.alice.clone();
    s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    s.credential(&alice, "4821", panel_scope(&[1])).await?;
    configure(&mut s, &alice, &[&lock, &panel], Some(office_hours())).await?;
    Ok((s, lock, panel))
}

/// The lock keeps the schedule itself: it decides when the code is presented.
fn lock_opens(s: &Site, lock: &pb::Device, at: &str) -> anyhow::Result<bool> {
    Ok(s.sim(lock)?.present("9930", utc(at))? == AccessOutcome::Granted)
}

#[tokio::test]
async fn office_hours_open_and_close_the_front_lock() -> anyhow::Result<()> {
    let (mut s, lock, panel) = office_site().await?;
    // Monday 2026-11-23, 07:59 in Paris (UTC+1).
    let clock = ManualClock::new(utc("2026-11-23T06:59:00Z"));
    let agent = TestAgent::start_with_clock(
        &s.server.url,
        &s.site,
        &s.agent_token,
        s.dir.path(),
        Arc::new(clock.clone()),
    );
    s.wait_synced().await?;
    // The lock was given the schedule (Schedule Entry Lock style) and enforces it.
    assert!(
        !lock_opens(&s, &lock, "2026-11-23T06:59:00Z")?,
        "07:59: refused"
    );
    assert!(
        lock_opens(&s, &lock, "2026-11-23T07:00:00Z")?,
        "08:00: opens"
    );
    assert!(
        !lock_opens(&s, &lock, "2026-11-23T17:00:00Z")?,
        "18:00: refused"
    );
    // The panel keeps no schedules: the agent installs the code at 08:00, removes it at 18:00.
    lock_holds(&s, &panel, "4821", false).await?;
    clock.set(utc("2026-11-23T07:00:00Z"));
    lock_holds(&s, &panel, "4821", true).await?;
    clock.set(utc("2026-11-23T17:00:00Z"));
    lock_holds(&s, &panel, "4821", false).await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn schedules_hold_with_the_agent_cut_off_all_day() -> anyhow::Result<()> {
    let (mut s, lock, panel) = office_site().await?;
    let clock = ManualClock::new(utc("2026-11-23T06:59:00Z"));
    let agent = TestAgent::start_with_clock(
        &s.server.url,
        &s.site,
        &s.agent_token,
        s.dir.path(),
        Arc::new(clock.clone()),
    );
    s.wait_synced().await?;
    lock_holds(&s, &panel, "4821", false).await?;
    // keyplaned goes away for the whole day.
    s.server.pause();
    clock.set(utc("2026-11-23T07:00:00Z"));
    lock_holds(&s, &panel, "4821", true).await?;
    assert!(lock_opens(&s, &lock, "2026-11-23T07:00:00Z")?);
    clock.set(utc("2026-11-23T16:59:00Z"));
    // Two passes that began after the clock moved have acted on it.
    agent.passes(2).await?;
    assert!(
        s.slots(&panel)?.values().any(|c| c == "4821"),
        "still open at 17:59"
    );
    clock.set(utc("2026-11-23T17:00:00Z"));
    lock_holds(&s, &panel, "4821", false).await?;
    assert!(!lock_opens(&s, &lock, "2026-11-23T17:00:00Z")?);
    agent.stop().await?;
    Ok(())
}

/// A new site time zone reaches the devices that keep schedules before they are
/// reported in sync, and the agent-timed panel at once.
#[tokio::test]
async fn a_new_time_zone_re_times_the_lock_before_it_is_in_sync() -> anyhow::Result<()> {
    let (mut s, lock, panel) = office_site().await?;
    // Monday 10:00 UTC: 11:00 in Paris (open), 19:00 in Tokyo (closed).
    const AT: &str = "2026-11-23T10:00:00Z";
    let clock = ManualClock::new(utc(AT));
    let agent = TestAgent::start_with_clock(
        &s.server.url,
        &s.site,
        &s.agent_token,
        s.dir.path(),
        Arc::new(clock.clone()),
    );
    let before = s.wait_synced().await?;
    assert!(lock_opens(&s, &lock, AT)?, "11:00 in Paris: opens");
    lock_holds(&s, &panel, "4821", true).await?;
    s.admin
        .update_site(pb::UpdateSiteRequest {
            site: Some(pb::Site {
                name: s.site.clone(),
                time_zone: "Asia/Tokyo".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["time_zone".into()],
            }),
        })
        .await?;
    let after = s.wait_synced().await?;
    assert!(after.desired_revision > before.desired_revision);
    // In sync means re-timed: the lock already reads its windows in Tokyo time.
    assert!(!lock_opens(&s, &lock, AT)?, "19:00 in Tokyo: refused");
    assert!(
        lock_opens(&s, &lock, "2026-11-23T00:00:00Z")?,
        "09:00 in Tokyo: opens"
    );
    lock_holds(&s, &panel, "4821", false).await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn clearing_the_plan_removes_access_within_one_sync() -> anyhow::Result<()> {
    let (mut s, lock, panel) = office_site().await?;
    let alice = s.alice.clone();
    // Within office hours, with access to both.
    let clock = ManualClock::new(utc("2026-11-23T09:00:00Z"));
    let agent = TestAgent::start_with_clock(
        &s.server.url,
        &s.site,
        &s.agent_token,
        s.dir.path(),
        Arc::new(clock.clone()),
    );
    s.wait_synced().await?;
    assert!(lock_opens(&s, &lock, "2026-11-23T09:00:00Z")?);
    assert!(s.slots(&panel)?.values().any(|c| c == "4821"));
    s.admin
        .clear_personal_access_plan(pb::ClearPersonalAccessPlanRequest {
            name: format!("{alice}/personalAccessPlan"),
            etag: String::new(),
        })
        .await?;
    s.wait_synced().await?;
    assert!(
        !lock_opens(&s, &lock, "2026-11-23T09:00:00Z")?,
        "lock access removed"
    );
    assert!(s.slots(&panel)?.is_empty(), "panel access removed");
    // The credentials themselves stay: the plan is about access, not codes.
    let creds = s
        .admin
        .list_credentials(pb::ListCredentialsRequest {
            parent: alice.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .credentials;
    assert_eq!(creds.len(), 2);
    // And the plan cannot be deleted.
    let err = s
        .admin
        .delete_access_plan(pb::DeleteAccessPlanRequest {
            name: format!("{alice}/personalAccessPlan"),
            etag: String::new(),
        })
        .await
        .expect_err("never deleted");
    assert_eq!(err.code(), Code::FailedPrecondition);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn only_a_configured_plan_is_cleared_and_clearing_never_widens() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let lock = s.lock.clone();
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    let plan_name = format!("{bob}/personalAccessPlan");
    let clear = |admin: &mut keyplane_testkit::server::Admin| {
        let name = plan_name.clone();
        let mut admin = admin.clone();
        async move {
            admin
                .clear_personal_access_plan(pb::ClearPersonalAccessPlanRequest {
                    name,
                    etag: String::new(),
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let get = |admin: &mut keyplane_testkit::server::Admin| {
        let name = plan_name.clone();
        let mut admin = admin.clone();
        async move {
            anyhow::Ok(
                admin
                    .get_personal_access_plan(pb::GetPersonalAccessPlanRequest { name })
                    .await?
                    .into_inner(),
            )
        }
    };
    // No PIN: there is no plan to clear yet, and the message says what to do.
    let err = clear(&mut s.admin).await.expect_err("not configured");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("add a PIN first"),
        "{}",
        err.message()
    );
    assert!(!get(&mut s.admin).await?.configured, "still not configured");
    // With a PIN but never configured: nothing to clear either.
    s.credential(&bob, "5927", lock_scope(&[&lock])).await?;
    let err = clear(&mut s.admin).await.expect_err("not configured");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("not configured"),
        "{}",
        err.message()
    );
    assert!(!get(&mut s.admin).await?.configured);
    // So the PIN added after those refusals opens the lock at any hour.
    let agent = s.start_agent();
    s.wait_synced().await?;
    let opens = |s: &Site, at: &str| -> anyhow::Result<bool> {
        Ok(s.sim(&lock)?.present("5927", utc(at))? == AccessOutcome::Granted)
    };
    assert!(opens(&s, "2026-11-22T02:00:00Z")?, "Sunday 03:00: opens");

    // A standard plan also names the lock, always; the personal plan limits it to
    // office hours, then is cleared.
    s.admin
        .create_access_plan(pb::CreateAccessPlanRequest {
            parent: site.clone(),
            plan: Some(pb::StandardAccessPlan {
                display_name: "Everyone, always".into(),
                devices: vec![lock.name.clone()],
                members: vec![bob.clone()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    configure(&mut s, &bob, &[&lock], Some(office_hours())).await?;
    s.wait_synced().await?;
    assert!(opens(&s, "2026-11-23T09:00:00Z")?, "Monday 10:00: opens");
    assert!(!opens(&s, "2026-11-22T02:00:00Z")?, "Sunday 03:00: refused");
    let cleared = clear(&mut s.admin).await?;
    assert!(cleared.configured && cleared.access_points.is_empty() && cleared.schedule.is_none());
    s.wait_synced().await?;
    // Cleared grants nothing: neither the plan's own hours, nor the standard plan's
    // "always", nor any hour outside the old window.
    for at in ["2026-11-23T09:00:00Z", "2026-11-22T02:00:00Z"] {
        assert!(!opens(&s, at)?, "{at}: a cleared plan grants nothing");
    }
    // Clearing again is allowed (the plan is configured) and changes nothing.
    clear(&mut s.admin).await?;
    agent.stop().await?;
    Ok(())
}
