//! Access-control doors: standard plans decided at the door, lockdown, holidays,
//! one-time and temporary codes.

use crate::fixture::{SYNC_TIMEOUT, Site, create_device, create_user};
use chrono::{DateTime, Utc};
use keyplane_agent::clock::ManualClock;
use keyplane_devices::AccessOutcome;
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::{TestAgent, eventually};
use std::sync::Arc;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("rfc3339")
        .with_timezone(&Utc)
}

fn weekdays(start: &str, end: &str) -> pb::Schedule {
    use pb::DayOfWeek::*;
    pb::Schedule {
        windows: vec![pb::TimeWindow {
            days: [Monday, Tuesday, Wednesday, Thursday, Friday]
                .map(|d| d as i32)
                .to_vec(),
            start_time: start.into(),
            end_time: end.into(),
        }],
        ..Default::default()
    }
}

fn door_scope(door: &pb::Device) -> pb::CredentialScope {
    pb::CredentialScope {
        doors: vec![door.name.clone()],
        ..Default::default()
    }
}

async fn plan(
    s: &mut Site,
    name: &str,
    door: &pb::Device,
    members: &[&str],
    schedule: pb::Schedule,
) -> anyhow::Result<pb::StandardAccessPlan> {
    Ok(s.admin
        .create_access_plan(pb::CreateAccessPlanRequest {
            parent: s.site.clone(),
            plan: Some(pb::StandardAccessPlan {
                display_name: name.into(),
                devices: vec![door.name.clone()],
                members: members.iter().map(|m| m.to_string()).collect(),
                schedule: Some(schedule),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?
        .into_inner())
}

async fn events_of(
    s: &Site,
    kind: pb::EventKind,
    at_least: usize,
) -> anyhow::Result<Vec<pb::Event>> {
    let admin = s.admin.clone();
    let parent = s.site.clone();
    eventually("door events stored", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = parent.clone();
        async move {
            let events: Vec<pb::Event> = admin
                .list_events(pb::ListEventsRequest {
                    parent,
                    page_size: 500,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .events
                .into_iter()
                .filter(|e| e.kind == kind as i32)
                .collect();
            Ok((events.len() >= at_least).then_some(events))
        }
    })
    .await
}

#[tokio::test]
async fn doors_decide_from_their_plans_and_report_it() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let door = create_device(&mut s.admin, &site, "Office door", "door-1000").await?;
    let staff = create_user(&mut s.admin, &site, "Staff").await?;
    let cleaner = create_user(&mut s.admin, &site, "Cleaner").await?;
    s.credential(&staff, "5927", door_scope(&door)).await?;
    s.credential(&cleaner, "6138", door_scope(&door)).await?;
    plan(
        &mut s,
        "Office hours",
        &door,
        &[&staff, &cleaner],
        weekdays("08:00", "18:00"),
    )
    .await?;
    // The cleaner also has evenings: the union of both plans.
    plan(
        &mut s,
        "Cleaning",
        &door,
        &[&cleaner],
        weekdays("18:00", "22:00"),
    )
    .await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let mut sim = s.sim(&door)?;
    // Monday 2026-11-23 in Paris (UTC+1).
    let cases = [
        ("5927", "2026-11-23T09:00:00Z", true),  // 10:00, office hours
        ("5927", "2026-11-23T18:30:00Z", false), // 19:30
        ("6138", "2026-11-23T18:30:00Z", true),  // the cleaning plan
        ("6138", "2026-11-28T09:00:00Z", false), // Saturday
        ("0000", "2026-11-23T09:00:00Z", false), // unknown code
    ];
    for (pin, at, granted) in cases {
        let outcome = sim.present(pin, utc(at))?;
        assert_eq!(
            outcome == AccessOutcome::Granted,
            granted,
            "{pin} at {at}: {outcome:?}"
        );
    }
    let granted = events_of(&s, pb::EventKind::AccessGranted, 2).await?;
    let denied = events_of(&s, pb::EventKind::AccessDenied, 3).await?;
    assert_eq!((granted.len(), denied.len()), (2, 3));
    assert!(granted.iter().all(|e| e.device == door.name));
    assert_eq!(granted[0].user, staff);
    assert_eq!(granted[1].user, cleaner);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn lockdown_refuses_everyone_until_released() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let door = create_device(&mut s.admin, &site, "Office door", "door-1000").await?;
    let staff = create_user(&mut s.admin, &site, "Staff").await?;
    s.credential(&staff, "5927", door_scope(&door)).await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let now = Utc::now();
    let mut sim = s.sim(&door)?;
    assert_eq!(sim.present("5927", now)?, AccessOutcome::Granted);

    s.admin
        .lockdown_doors(pb::LockdownDoorsRequest { site: site.clone() })
        .await?;
    s.wait_synced().await?;
    eventually("door locked down", SYNC_TIMEOUT, || async {
        Ok(s.sim(&door)?.locked_down().then_some(()))
    })
    .await?;
    assert!(matches!(
        sim.present("5927", now)?,
        AccessOutcome::Denied(_)
    ));
    s.admin
        .release_lockdown(pb::ReleaseLockdownRequest { site: site.clone() })
        .await?;
    s.wait_synced().await?;
    eventually("door released", SYNC_TIMEOUT, || async {
        Ok((!s.sim(&door)?.locked_down()).then_some(()))
    })
    .await?;
    assert_eq!(sim.present("5927", now)?, AccessOutcome::Granted);
    // Who locked down and who released is in the event log.
    let locked = events_of(&s, pb::EventKind::Lockdown, 1).await?;
    let released = events_of(&s, pb::EventKind::LockdownReleased, 1).await?;
    assert!(
        locked[0].actor.starts_with("dealer:"),
        "{:?}",
        locked[0].actor
    );
    assert!(released[0].actor.starts_with("dealer:"));
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_holiday_pauses_a_plan() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let door = create_device(&mut s.admin, &site, "Office door", "door-1000").await?;
    let staff = create_user(&mut s.admin, &site, "Staff").await?;
    s.credential(&staff, "5927", door_scope(&door)).await?;
    let office = plan(
        &mut s,
        "Office hours",
        &door,
        &[&staff],
        weekdays("08:00", "18:00"),
    )
    .await?;
    s.admin
        .put_holiday(pb::PutHolidayRequest {
            holiday: Some(pb::Holiday {
                name: format!("{site}/holidays/2026-12-25"),
                display_name: "Christmas".into(),
                plans: vec![office.name.clone()],
            }),
        })
        .await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let mut sim = s.sim(&door)?;
    assert!(
        matches!(
            sim.present("5927", utc("2026-12-25T09:00:00Z"))?,
            AccessOutcome::Denied(_)
        ),
        "holiday"
    );
    assert_eq!(
        sim.present("5927", utc("2026-12-24T09:00:00Z"))?,
        AccessOutcome::Granted,
        "the day before"
    );
    // Removing the holiday restores the plan.
    s.admin
        .delete_holiday(pb::DeleteHolidayRequest {
            name: format!("{site}/holidays/2026-12-25"),
        })
        .await?;
    s.wait_synced().await?;
    eventually("holiday lifted", SYNC_TIMEOUT, || async {
        let granted =
            s.sim(&door)?.present("5927", utc("2026-12-25T09:00:00Z"))? == AccessOutcome::Granted;
        Ok(granted.then_some(()))
    })
    .await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_one_time_code_stops_working_after_its_use() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let door = create_device(&mut s.admin, &site, "Delivery door", "door-1000").await?;
    let courier = create_user(&mut s.admin, &site, "Courier").await?;
    let code = s
        .admin
        .create_credential(pb::CreateCredentialRequest {
            parent: courier.clone(),
            credential: Some(pb::Credential {
                pin: "7043".into(),
                scope: Some(door_scope(&door)),
                max_uses: 1,
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
        .await?
        .into_inner();
    assert_eq!((code.max_uses, code.uses), (1, 0));
    let agent = s.start_agent();
    s.wait_synced().await?;
    let mut sim = s.sim(&door)?;
    assert_eq!(sim.present("7043", Utc::now())?, AccessOutcome::Granted);
    // The grant is reported, counted, and the code removed from the door.
    eventually("one-time code removed", SYNC_TIMEOUT, || async {
        Ok(s.slots(&door)?.is_empty().then_some(()))
    })
    .await?;
    assert!(matches!(
        sim.present("7043", Utc::now())?,
        AccessOutcome::Denied(_)
    ));
    let err = s
        .admin
        .get_credential(pb::GetCredentialRequest {
            name: code.name.clone(),
        })
        .await
        .expect_err("used up");
    assert_eq!(err.code(), tonic::Code::NotFound);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_weekend_guest_code_lives_only_for_the_weekend() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let lock = s.lock.clone();
    let guest = create_user(&mut s.admin, &site, "Guest").await?;
    let from = utc("2026-11-27T17:00:00Z");
    let until = utc("2026-11-29T20:00:00Z");
    s.admin
        .create_credential(pb::CreateCredentialRequest {
            parent: guest.clone(),
            credential: Some(pb::Credential {
                pin: "3862".into(),
                scope: Some(crate::fixture::lock_scope(&[&lock])),
                valid_from_time: Some(prost_types::Timestamp {
                    seconds: from.timestamp(),
                    nanos: 0,
                }),
                valid_until_time: Some(prost_types::Timestamp {
                    seconds: until.timestamp(),
                    nanos: 0,
                }),
                ..Default::default()
            }),
            request_id: String::new(),
            generate_pin: false,
        })
        .await?;
    let clock = ManualClock::new(utc("2026-11-27T16:59:00Z"));
    let agent = TestAgent::start_with_clock(
        &s.server.url,
        &site,
        &s.agent_token,
        s.dir.path(),
        Arc::new(clock.clone()),
    );
    s.wait_synced().await?;
    let holds = |want: bool| {
        let s = &s;
        let lock = lock.clone();
        async move {
            eventually("guest code state", SYNC_TIMEOUT, || async {
                Ok((s.slots(&lock)?.values().any(|c| c == "3862") == want).then_some(()))
            })
            .await
        }
    };
    holds(false).await?;
    clock.set(from);
    holds(true).await?;
    clock.set(until);
    holds(false).await?;
    agent.stop().await?;
    Ok(())
}
