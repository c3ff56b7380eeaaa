//! Seed 000, the other half: codes programmed at the device are kept (LOCAL),
//! drift is reported, and only the dealer decides what happens to them.

use crate::fixture::{SYNC_TIMEOUT, Site, after_a_read_back, create_user, lock_scope, slot_on};
use keyplane_proto::v1 as pb;
use keyplane_testkit::server::eventually;

async fn local_codes(s: &Site, at_least: usize) -> anyhow::Result<Vec<pb::LocalCode>> {
    let admin = s.admin.clone();
    let parent = s.site.clone();
    eventually("local codes reported", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let parent = parent.clone();
        async move {
            let codes = admin
                .list_local_codes(pb::ListLocalCodesRequest { parent })
                .await?
                .into_inner()
                .local_codes;
            Ok((codes.len() >= at_least).then_some(codes))
        }
    })
    .await
}

async fn device_status(
    s: &Site,
    device: &pb::Device,
    ready: impl Fn(&pb::DeviceSyncStatus) -> bool,
) -> anyhow::Result<pb::DeviceSyncStatus> {
    let admin = s.admin.clone();
    let name = format!("{}/syncStatus", s.site);
    eventually("device status", SYNC_TIMEOUT, || {
        let mut admin = admin.clone();
        let name = name.clone();
        let ready = &ready;
        async move {
            let status = admin
                .get_sync_status(pb::GetSyncStatusRequest {
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(status
                .devices
                .into_iter()
                .find(|d| d.device == device.name && ready(d)))
        }
    })
    .await
}

#[tokio::test]
async fn a_code_programmed_while_the_agent_was_down_is_kept_as_local() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let lock = s.lock.clone();
    let tenants = create_user(&mut s.admin, &site, "Tenants").await?;
    for i in 0..6 {
        s.credential(
            &tenants,
            &format!("{}", 2000 + i * 13),
            lock_scope(&[&lock]),
        )
        .await?;
    }
    let agent = s.start_agent();
    s.wait_synced().await?;
    agent.stop().await?;
    // Someone programs slot 7 at the lock while the agent is stopped.
    s.sim(&lock)?.program_at_keypad(7, "3141")?;
    let writes_before = s.sim(&lock)?.total_writes();
    let agent = s.start_agent();
    let locals = local_codes(&s, 1).await?;
    assert_eq!(locals.len(), 1);
    assert_eq!(locals[0].slot, 7);
    assert_eq!(locals[0].device, lock.name);
    assert!(locals[0].pin_known);
    let status = device_status(&s, &lock, |d| d.local_slots == 1).await?;
    assert_eq!(status.managed_slots, 6);
    // A new credential goes around it, and nothing was cleared.
    let next = s.credential(&tenants, "5927", lock_scope(&[&lock])).await?;
    assert_eq!(slot_on(&next, &lock), Some(8), "slot 7 is reserved");
    // Its code cannot be handed out again on that lock.
    let err = s
        .credential(&tenants, "3141", lock_scope(&[&lock]))
        .await
        .expect_err("taken locally");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    s.wait_synced().await?;
    let slots = s.slots(&lock)?;
    assert_eq!(slots.get(&7).map(String::as_str), Some("3141"));
    assert_eq!(slots.get(&8).map(String::as_str), Some("5927"));
    assert_eq!(s.sim(&lock)?.writes(7), 0, "keyplane never wrote slot 7");
    assert_eq!(s.sim(&lock)?.total_writes(), writes_before + 1);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn claiming_a_local_code_makes_it_bobs_without_a_write() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let site = s.site.clone();
    let lock = s.lock.clone();
    let bob = create_user(&mut s.admin, &site, "Bob").await?;
    s.sim(&lock)?.program_at_keypad(4, "6138")?;
    let agent = s.start_agent();
    let locals = local_codes(&s, 1).await?;
    let claimed = s
        .admin
        .claim_local_code(pb::ClaimLocalCodeRequest {
            name: locals[0].name.clone(),
            user: bob.clone(),
            panel_partitions: vec![],
        })
        .await?
        .into_inner();
    assert_eq!(slot_on(&claimed, &lock), Some(4), "same slot");
    s.wait_synced().await?;
    let creds = s
        .admin
        .list_credentials(pb::ListCredentialsRequest {
            parent: bob.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .credentials;
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].name, claimed.name);
    assert!(local_codes(&s, 0).await?.is_empty(), "no longer local");
    assert_eq!(s.sim(&lock)?.total_writes(), 0, "the device saw no write");
    assert_eq!(s.slots(&lock)?.get(&4).map(String::as_str), Some("6138"));
    // Bob's code is now managed: changing it writes the slot.
    s.admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: claimed.name.clone(),
                pin: "7250".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["pin".into()],
            }),
        })
        .await?;
    s.wait_synced().await?;
    assert_eq!(s.slots(&lock)?.get(&4).map(String::as_str), Some("7250"));
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn removing_a_local_code_clears_it_and_is_audited() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    s.sim(&lock)?.program_at_keypad(9, "8362")?;
    let agent = s.start_agent();
    let locals = local_codes(&s, 1).await?;
    s.admin
        .remove_local_code(pb::RemoveLocalCodeRequest {
            name: locals[0].name.clone(),
        })
        .await?;
    eventually("slot 9 cleared", SYNC_TIMEOUT, || async {
        Ok((!s.slots(&lock)?.contains_key(&9)).then_some(()))
    })
    .await?;
    eventually("local code gone", SYNC_TIMEOUT, || {
        let mut admin = s.admin.clone();
        let parent = s.site.clone();
        async move {
            let codes = admin
                .list_local_codes(pb::ListLocalCodesRequest { parent })
                .await?
                .into_inner()
                .local_codes;
            Ok(codes.is_empty().then_some(()))
        }
    })
    .await?;
    let client = s.server.db.client().await?;
    let row = client
        .query_one(
            "SELECT actor, resource FROM audit_log WHERE action = 'local_code.remove'",
            &[],
        )
        .await?;
    let (actor, resource): (String, String) = (row.get(0), row.get(1));
    assert!(actor.starts_with("dealer:"), "{actor}");
    assert_eq!(resource, locals[0].name);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn authoritative_sites_clear_foreign_codes_preserve_sites_never_do() -> anyhow::Result<()> {
    // PRESERVE (the default): kept, however long we wait.
    let s = Site::new().await?;
    let lock = s.lock.clone();
    s.sim(&lock)?.program_at_keypad(5, "9514")?;
    let agent = s.start_agent();
    local_codes(&s, 1).await?;
    after_a_read_back(&s, &agent, &lock).await?;
    assert_eq!(s.slots(&lock)?.get(&5).map(String::as_str), Some("9514"));
    agent.stop().await?;

    // AUTHORITATIVE: keyplane's table wins; the clearing is logged.
    let mut s = Site::new().await?;
    s.set_policy(pb::LocalCodePolicy::Authoritative).await?;
    let lock = s.lock.clone();
    s.sim(&lock)?.program_at_keypad(5, "9514")?;
    let agent = s.start_agent();
    eventually("foreign code cleared", SYNC_TIMEOUT, || async {
        Ok((!s.slots(&lock)?.contains_key(&5)).then_some(()))
    })
    .await?;
    let events = s
        .admin
        .list_events(pb::ListEventsRequest {
            parent: s.site.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let cleared: Vec<_> = events
        .iter()
        .filter(|e| e.kind == pb::EventKind::LocalCodeCleared as i32)
        .collect();
    assert_eq!(cleared.len(), 1);
    assert_eq!(
        (cleared[0].device.as_str(), cleared[0].user_number),
        (lock.name.as_str(), 5)
    );
    let client = s.server.db.client().await?;
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'local_code.clear'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(n, 1);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn drift_is_reported_and_left_alone_until_the_dealer_chooses() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let code = s.credential(&alice, "4826", lock_scope(&[&lock])).await?;
    let slot = slot_on(&code, &lock).expect("slot");
    let agent = s.start_agent();
    s.wait_synced().await?;
    // Someone re-programs Alice's slot at the lock.
    {
        let mut sim = s.sim(&lock)?;
        sim.clear_at_keypad(slot)?;
        sim.program_at_keypad(slot, "5555")?;
    }
    let status = device_status(&s, &lock, |d| d.drifted_slots == 1).await?;
    assert_eq!(status.managed_slots, 1);
    // Under PRESERVE it is not silently overwritten.
    after_a_read_back(&s, &agent, &lock).await?;
    assert_eq!(s.slots(&lock)?.get(&slot).map(String::as_str), Some("5555"));
    let drift_events: Vec<pb::Event> = s
        .admin
        .list_events(pb::ListEventsRequest {
            parent: s.site.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events
        .into_iter()
        .filter(|e| e.kind == pb::EventKind::Drift as i32)
        .collect();
    assert_eq!(drift_events.len(), 1);
    // A lock's slot reads the same in the event as in the credential: plain `3`.
    let shown = code
        .slots
        .iter()
        .find(|s| s.device == lock.name)
        .map(|s| s.display_slot.clone());
    assert_eq!(Some(drift_events[0].display_user_number.clone()), shown);
    assert_eq!(drift_events[0].display_user_number, slot.to_string());
    // The dealer re-applies keyplane's code.
    s.admin
        .resolve_drift(pb::ResolveDriftRequest {
            credential: code.name.clone(),
            device: lock.name.clone(),
            resolution: pb::resolve_drift_request::Resolution::Reapply as i32,
        })
        .await?;
    eventually("re-applied", SYNC_TIMEOUT, || async {
        Ok((s.slots(&lock)?.get(&slot).map(String::as_str) == Some("4826")).then_some(()))
    })
    .await?;
    device_status(&s, &lock, |d| d.drifted_slots == 0).await?;
    // Drift again, and this time the dealer adopts the device's code: no write.
    {
        let mut sim = s.sim(&lock)?;
        sim.clear_at_keypad(slot)?;
        sim.program_at_keypad(slot, "6262")?;
    }
    device_status(&s, &lock, |d| d.drifted_slots == 1).await?;
    let writes = s.sim(&lock)?.total_writes();
    s.admin
        .resolve_drift(pb::ResolveDriftRequest {
            credential: code.name.clone(),
            device: lock.name.clone(),
            resolution: pb::resolve_drift_request::Resolution::Adopt as i32,
        })
        .await?;
    s.wait_synced().await?;
    device_status(&s, &lock, |d| d.drifted_slots == 0).await?;
    assert_eq!(
        s.sim(&lock)?.total_writes(),
        writes,
        "adopting writes nothing"
    );
    // The credential's PIN is now the adopted one: it refuses a duplicate of it.
    let err = s
        .credential(&alice, "6262", lock_scope(&[&lock]))
        .await
        .expect_err("adopted");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_panel_user_number_programmed_at_the_keypad_is_local_too() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let panel = s.panel.clone();
    s.sim(&panel)?.program_at_keypad(10, "4703")?;
    let agent = s.start_agent();
    let locals = local_codes(&s, 1).await?;
    assert_eq!(locals[0].display_slot, "010");
    let alice = s.alice.clone();
    // Claiming a panel user number needs its partitions.
    let err = s
        .admin
        .claim_local_code(pb::ClaimLocalCodeRequest {
            name: locals[0].name.clone(),
            user: alice.clone(),
            panel_partitions: vec![],
        })
        .await
        .expect_err("partitions");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let claimed = s
        .admin
        .claim_local_code(pb::ClaimLocalCodeRequest {
            name: locals[0].name.clone(),
            user: alice.clone(),
            panel_partitions: vec![1],
        })
        .await?
        .into_inner();
    assert_eq!(slot_on(&claimed, &panel), Some(10));
    s.wait_synced().await?;
    assert_eq!(s.slots(&panel)?.get(&10).map(String::as_str), Some("4703"));
    // The panel now knows user 010's level: Alice is a master of partition 1.
    assert_eq!(
        s.sim(&panel)?.level_of(10, 1),
        Some(keyplane_core::authority::Level::Master)
    );
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn masked_locks_report_unverifiable_never_in_sync() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    s.credential(&alice, "4826", lock_scope(&[&lock])).await?;
    s.sim(&lock)?.set_masked(true)?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let status = device_status(&s, &lock, |d| d.unverifiable_slots == 1).await?;
    assert_eq!(status.drifted_slots, 0);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn with_a_checksum_slots_are_read_only_when_it_changes() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    s.credential(&alice, "4826", lock_scope(&[&lock])).await?;
    s.sim(&lock)?.set_checksum(true)?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    device_status(&s, &lock, |d| d.managed_slots == 1 && d.local_slots == 0).await?;
    // Several read-back periods (300 ms in tests) with nothing changed: no slot reads.
    let reads = s.sim(&lock)?.table_reads();
    let sums = s.sim(&lock)?.checksum_reads();
    eventually("three more checksum reads", SYNC_TIMEOUT, || async {
        Ok((s.sim(&lock)?.checksum_reads() >= sums + 3).then_some(()))
    })
    .await?;
    assert_eq!(
        s.sim(&lock)?.table_reads(),
        reads,
        "an unchanged checksum spares the slot reads"
    );
    // A code programmed at the lock changes the checksum: the table is read again.
    s.sim(&lock)?.program_at_keypad(12, "7391")?;
    let locals = local_codes(&s, 1).await?;
    assert_eq!(locals[0].slot, 12);
    assert!(s.sim(&lock)?.table_reads() > reads);
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_hand_programmed_copy_of_a_managed_code_is_a_conflict() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let lock = s.lock.clone();
    let alice = s.alice.clone();
    let code = s.credential(&alice, "4826", lock_scope(&[&lock])).await?;
    let slot = slot_on(&code, &lock).expect("slot");
    let agent = s.start_agent();
    s.wait_synced().await?;
    // At the lock: Alice's code is moved by hand from its slot to slot 3.
    {
        let mut sim = s.sim(&lock)?;
        sim.clear_at_keypad(slot)?;
        sim.program_at_keypad(3, "4826")?;
    }
    let status = device_status(&s, &lock, |d| d.conflicts == 1).await?;
    assert_eq!(status.drifted_slots, 1, "keyplane's own slot is now empty");
    // Flagged, never silently merged: both stay as the person left them.
    after_a_read_back(&s, &agent, &lock).await?;
    let slots = s.slots(&lock)?;
    assert_eq!(slots.get(&3).map(String::as_str), Some("4826"));
    assert!(!slots.contains_key(&slot));
    agent.stop().await?;
    Ok(())
}
