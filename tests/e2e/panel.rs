//! The panel side of seed 002: arming and disarming by code at the simulated panel,
//! the babysitter rule, and duress raising a silent alarm on WatchEvents.

use crate::fixture::{SYNC_TIMEOUT, Site, create_user_with, panel_scope, slot_on};
use keyplane_devices::PanelOutcome;
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::eventually;
use std::time::Duration;

async fn code(s: &mut Site, user: &str, pin: &str) -> anyhow::Result<pb::Credential> {
    Ok(s.credential(user, pin, panel_scope(&[1])).await?)
}

async fn events(s: &mut Site) -> anyhow::Result<Vec<pb::Event>> {
    Ok(s.admin
        .list_events(pb::ListEventsRequest {
            parent: s.site.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events
        .into_iter()
        // What the devices logged; slot-status events (docs/STATUS.md) name a credential.
        .filter(|e| e.credential.is_empty())
        .collect())
}

#[tokio::test]
async fn babysitter_disarms_only_what_she_armed() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let alice = s.alice.clone();
    let master = code(&mut s, &alice, "4821").await?;
    let bella =
        create_user_with(&mut s.admin, &site, "Bella", &[(1, pb::Level::OperatorC)]).await?;
    let sitter = code(&mut s, &bella, "5927").await?;
    let tom = create_user_with(&mut s.admin, &site, "Tom", &[(1, pb::Level::OperatorA)]).await?;
    let temp = code(&mut s, &tom, "6138").await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let panel = s.panel.clone();
    let mut sim = s.sim(&panel)?;
    let sitter_slot = slot_on(&sitter, &panel).expect("slot");
    let master_slot = slot_on(&master, &panel).expect("slot");
    assert_eq!(
        sim.level_of(sitter_slot, 1),
        Some(keyplane_core::authority::Level::OperatorC)
    );

    // The babysitter arms and disarms her own arming.
    assert_eq!(sim.arm(1, "5927")?, PanelOutcome::Armed);
    assert_eq!(sim.disarm(1, "5927")?, PanelOutcome::Disarmed);
    // Armed by the master: the babysitter may not disarm (reported), the master may.
    assert_eq!(sim.arm(1, "4821")?, PanelOutcome::Armed);
    assert!(matches!(sim.disarm(1, "5927")?, PanelOutcome::Refused(_)));
    assert_eq!(sim.armed_by(1), Some(master_slot));
    assert_eq!(sim.disarm(1, "4821")?, PanelOutcome::Disarmed);
    // Armed with a temporary (operator) code: the master's code disarms it.
    assert_eq!(sim.arm(1, "6138")?, PanelOutcome::Armed);
    assert_eq!(sim.disarm(1, "4821")?, PanelOutcome::Disarmed);
    let _ = temp;

    // The agent reports every one of them, once, with user numbers.
    let stored = eventually("seven panel events stored", SYNC_TIMEOUT, || {
        let mut admin = s.admin.clone();
        let parent = site.clone();
        async move {
            let events = admin
                .list_events(pb::ListEventsRequest {
                    parent,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .events
                .into_iter()
                .filter(|e| e.credential.is_empty())
                .collect::<Vec<_>>();
            Ok((events.len() >= 7).then_some(events))
        }
    })
    .await?;
    let kinds: Vec<i32> = stored.iter().map(|e| e.kind).collect();
    use pb::EventKind::*;
    assert_eq!(
        kinds,
        [
            Armed,
            Disarmed,
            Armed,
            DisarmRefused,
            Disarmed,
            Armed,
            Disarmed
        ]
        .map(|k| k as i32)
    );
    let refused = &stored[3];
    assert_eq!(refused.user_number, i32::from(sitter_slot));
    assert_eq!(refused.display_user_number, format!("{sitter_slot:03}"));
    assert_eq!(refused.user, bella);
    assert!(stored.iter().all(|e| !e.silent_alarm));
    // Nothing is stored twice, even after the agent restarts and re-reads the log.
    agent.stop().await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    // Polls that began after the sync have re-read the whole log.
    agent.event_polls(2).await?;
    agent.passes(1).await?;
    assert_eq!(events(&mut s).await?.len(), 7);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn duress_disarms_silently_and_alarms_within_a_second() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let alice = s.alice.clone();
    code(&mut s, &alice, "4821").await?;
    let dora = create_user_with(&mut s.admin, &site, "Dora", &[(1, pb::Level::Duress)]).await?;
    let duress = code(&mut s, &dora, "7043").await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let panel = s.panel.clone();
    let mut sim = s.sim(&panel)?;
    assert_eq!(sim.arm(1, "4821")?, PanelOutcome::Armed);

    // The central station watches every site of the dealer, from now on.
    let mut watch = s
        .admin
        .watch_events(pb::WatchEventsRequest {
            parent: "sites/-".into(),
            ..Default::default()
        })
        .await?
        .into_inner();

    // Under threat: the duress code disarms like any code; the intruder sees nothing.
    assert_eq!(sim.disarm(1, "7043")?, PanelOutcome::Disarmed);
    assert_eq!(sim.armed_by(1), None);
    // The bound is on the wait itself: within a second, or the test fails.
    let alarm = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match watch.message().await? {
                Some(e) if e.kind == pb::EventKind::Duress as i32 => return anyhow::Ok(e),
                Some(_) => continue,
                None => anyhow::bail!("watch ended"),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the duress alarm did not reach the watcher within 1 s"))??;
    assert!(alarm.silent_alarm);
    assert_eq!(alarm.user, dora);
    assert_eq!(
        alarm.user_number,
        i32::from(slot_on(&duress, &panel).expect("slot"))
    );
    assert_eq!(alarm.partition, 1);
    assert!(alarm.name.starts_with(&format!("{site}/events/")));
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_resent_event_is_stored_once_and_watch_resumes_from_a_cursor() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let panel = s.panel.clone();
    let device = uuid_of(&panel.name)?;
    let site = uuid_of(&s.site)?;
    let event = keyplane_store::NewEvent {
        device,
        epoch: 0,
        seq: 1,
        kind: keyplane_store::EventKind::Armed,
        partition: Some(1),
        user_number: Some(2),
        occur_time: std::time::SystemTime::now(),
    };
    assert!(s.server.store.event_record(site, &event).await?);
    assert!(
        !s.server.store.event_record(site, &event).await?,
        "same device and seq: not stored again"
    );
    let second = keyplane_store::NewEvent { seq: 2, ..event };
    assert!(s.server.store.event_record(site, &second).await?);
    let all = events(&mut s).await?;
    assert_eq!(all.len(), 2);
    // Resuming after the first event's token yields only the second, on this site's
    // watch and on a watch of every site.
    for parent in [s.site.clone(), "sites/-".to_owned()] {
        let watch = s
            .admin
            .watch_events(pb::WatchEventsRequest {
                parent: parent.clone(),
                resume_token: all[0].resume_token.clone(),
                ..Default::default()
            })
            .await;
        if parent == "sites/-" {
            // A ListEvents token names one site: it cannot resume every site.
            let err = watch.expect_err("a one-site token");
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
            continue;
        }
        let next = watch?
            .into_inner()
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no event"))?;
        assert_eq!(next.name, all[1].name);
        assert!(next.site_sequence > all[0].site_sequence);
    }
    // The retired id cursor is refused, pointing at the resume token.
    let err = s
        .admin
        .watch_events(pb::WatchEventsRequest {
            parent: "sites/-".into(),
            after_cursor: 1,
            ..Default::default()
        })
        .await
        .expect_err("after_cursor is retired");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("resume_token"), "{err:?}");
    assert!(all.iter().all(|e| e.cursor == 0));
    let name = format!("{}/events/{}", s.site, all[1].site_sequence);
    assert_eq!(all[1].name, name, "named by its position in the site's log");
    // Another dealer cannot watch this site.
    let other = s.server.dealer("Dealer Two").await?;
    let mut other = s.server.admin(Some(&other)).await?;
    let err = other
        .watch_events(pb::WatchEventsRequest {
            parent: s.site.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not theirs");
    assert_eq!(err.code(), tonic::Code::NotFound);
    Ok(())
}

fn uuid_of(name: &str) -> anyhow::Result<uuid::Uuid> {
    Ok(uuid::Uuid::try_parse(
        name.rsplit('/').next().unwrap_or_default(),
    )?)
}

/// One lock slow (seconds a write) with a batch of codes to write, another lock
/// offline: a third lock converges at full speed while the slow one is still
/// writing (seen on the slow lock's write counter, not timed), a duress code at the
/// panel reaches WatchEvents within a second each time it is used while the batch
/// runs, the slow lock converges, and the offline one gets its codes once it is back.
#[tokio::test]
async fn duress_is_not_held_back_by_a_slow_lock_nor_an_offline_one() -> anyhow::Result<()> {
    use crate::fixture::{create_device, create_user, lock_scope};
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    code(&mut s, &alice, "4821").await?;
    let dora = create_user_with(&mut s.admin, &site, "Dora", &[(1, pb::Level::Duress)]).await?;
    code(&mut s, &dora, "7043").await?;
    let away = create_device(&mut s.admin, &site, "Back door", "zwave-lock-30").await?;
    let fast = create_device(&mut s.admin, &site, "Side door", "zwave-lock-30").await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    s.sim(&away)?.set_unreachable(true)?;
    let panel = s.panel.clone();
    let mut sim = s.sim(&panel)?;

    // A batch for the slow lock, the fast one and the offline one.
    const SLOW_WRITE: Duration = Duration::from_millis(2000);
    s.sim(&lock)?.set_write_delay(SLOW_WRITE)?;
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    let pins = ["5927", "6138", "7249", "8350"];
    let slow_before = s.sim(&lock)?.total_writes();
    for pin in pins {
        s.credential(&bob, pin, lock_scope(&[&lock, &fast, &away]))
            .await?;
    }
    let holds_all = |held: std::collections::BTreeMap<u16, String>| {
        pins.iter().all(|p| held.values().any(|v| v == p))
    };
    eventually("the fast lock holds the batch", SYNC_TIMEOUT, || async {
        Ok(holds_all(s.slots(&fast)?).then_some(()))
    })
    .await?;
    let slow_done = s.sim(&lock)?.total_writes() - slow_before;
    assert!(
        slow_done < u32::try_from(pins.len())?,
        "the fast lock converged while the slow one was still writing ({slow_done} of {} written)",
        pins.len()
    );

    // Duress at the panel, each time while the slow lock is still writing.
    for round in 0..2 {
        // Without a token a watch starts at now: only what follows.
        let mut watch = s
            .admin
            .watch_events(pb::WatchEventsRequest {
                parent: "sites/-".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(sim.arm(1, "4821")?, PanelOutcome::Armed);
        assert_eq!(sim.disarm(1, "7043")?, PanelOutcome::Disarmed);
        let alarm = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match watch.message().await? {
                    Some(e) if e.kind == pb::EventKind::Duress as i32 => return anyhow::Ok(e),
                    Some(_) => continue,
                    None => anyhow::bail!("watch ended"),
                }
            }
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!("round {round}: the duress alarm did not reach the watcher within 1 s")
        })??;
        assert!(alarm.silent_alarm);
        assert_eq!(alarm.user, dora);
        let slow_done = s.sim(&lock)?.total_writes() - slow_before;
        assert!(
            slow_done < u32::try_from(pins.len())?,
            "round {round}: the slow lock was still writing ({slow_done} written)"
        );
    }

    eventually("the slow lock holds the batch", SYNC_TIMEOUT, || async {
        Ok(holds_all(s.slots(&lock)?).then_some(()))
    })
    .await?;
    assert!(s.slots(&away)?.is_empty(), "the offline lock got nothing");
    // Back online: its changes apply.
    s.sim(&away)?.set_unreachable(false)?;
    eventually(
        "the returning lock holds the batch",
        SYNC_TIMEOUT,
        || async { Ok(holds_all(s.slots(&away)?).then_some(())) },
    )
    .await?;
    agent.stop().await?;
    Ok(())
}
