//! Seed 000: one user, different codes for the panel and the lock; slots stay put.

use crate::fixture::{Site, create_user, lock_scope, panel_scope, slot_on};
use keyplane_proto::v1 as pb;

#[tokio::test]
async fn alice_holds_different_codes_for_panel_and_lock() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let panel_code = s.credential(&alice, "4821", panel_scope(&[1])).await?;
    let lock_code = s
        .credential(&alice, "9930", lock_scope(&[&s.lock.clone()]))
        .await?;
    assert!(panel_code.pin_set && panel_code.pin.is_empty());
    assert_eq!(
        panel_code.slots.len(),
        1,
        "panel code lands on the panel only"
    );
    assert_eq!(lock_code.slots.len(), 1, "lock code lands on the lock only");
    let panel_slot = slot_on(&panel_code, &s.panel).expect("panel slot");
    let lock_slot = slot_on(&lock_code, &s.lock).expect("lock slot");
    assert_eq!(panel_slot, 2, "user 001 is the installer; Alice is 002");
    assert_eq!(panel_code.slots[0].display_slot, "002");

    let agent = s.start_agent();
    let status = s.wait_synced().await?;
    assert!(status.desired_revision >= 2);
    assert_eq!(status.devices.len(), 2);
    for d in &status.devices {
        assert_eq!(d.applied_revision, status.desired_revision, "{}", d.device);
        assert_eq!(d.pending_changes, 0);
    }

    let panel = s.slots(&s.panel)?;
    let lock = s.slots(&s.lock)?;
    assert_eq!(panel.get(&panel_slot).map(String::as_str), Some("4821"));
    assert_eq!(lock.get(&lock_slot).map(String::as_str), Some("9930"));
    assert!(
        !panel.values().any(|c| c == "9930"),
        "panel must not hold the lock code"
    );
    assert!(
        !lock.values().any(|c| c == "4821"),
        "lock must not hold the panel code"
    );
    assert_eq!(panel.len(), 1);
    assert_eq!(lock.len(), 1);

    // One user record holds both codes.
    let users = s
        .admin
        .list_users(pb::ListUsersRequest {
            parent: s.site.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .users;
    assert_eq!(users.len(), 1);
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
    assert!(creds.iter().all(|c| c.pin.is_empty() && c.pin_set));

    // The PIN is sealed at rest: no column holds the digits.
    let client = s.server.db.client().await?;
    let rows = client
        .query(
            "SELECT encode(pin_sealed, 'escape'), encode(pin_hash, 'hex') FROM credential",
            &[],
        )
        .await?;
    for row in rows {
        let sealed: String = row.get(0);
        let hash: String = row.get(1);
        assert!(!sealed.contains("4821") && !sealed.contains("9930"));
        assert!(!hash.contains("4821") && !hash.contains("9930"));
    }
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn changing_and_deleting_touch_only_their_slot() -> anyhow::Result<()> {
    let mut s = Site::new().await?;
    let alice = s.alice.clone();
    let lock = s.lock.clone();
    let bob = create_user(&mut s.admin, &s.site.clone(), "Bob").await?;
    let carol = create_user(&mut s.admin, &s.site.clone(), "Carol").await?;
    let alice_panel = s.credential(&alice, "4821", panel_scope(&[1])).await?;
    let alice_lock = s.credential(&alice, "9930", lock_scope(&[&lock])).await?;
    let bob_lock = s.credential(&bob, "5566", lock_scope(&[&lock])).await?;
    let carol_both = s
        .credential(
            &carol,
            "7788",
            pb::CredentialScope {
                panel_partitions: vec![1],
                locks: vec![lock.name.clone()],
                doors: vec![],
            },
        )
        .await?;
    let agent = s.start_agent();
    s.wait_synced().await?;
    let panel_before = s.slots(&s.panel)?;
    let lock_before = s.slots(&lock)?;
    let panel_writes_before = s.sim(&s.panel)?.total_writes();
    let alice_lock_slot = slot_on(&alice_lock, &lock).expect("slot");
    let alice_slot_writes_before = s.sim(&lock)?.writes(alice_lock_slot);

    // Change Alice's lock PIN: only that lock slot is rewritten.
    let updated = s
        .admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: alice_lock.name.clone(),
                pin: "1357".into(),
                etag: alice_lock.etag.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["pin".into()],
            }),
        })
        .await?
        .into_inner();
    assert_eq!(
        slot_on(&updated, &lock),
        Some(alice_lock_slot),
        "slot stays put"
    );
    assert_ne!(updated.etag, alice_lock.etag);
    s.wait_synced().await?;
    let lock_after = s.slots(&lock)?;
    let mut expected = lock_before.clone();
    expected.insert(alice_lock_slot, "1357".into());
    assert_eq!(lock_after, expected, "only Alice's lock slot changed");
    assert_eq!(s.slots(&s.panel)?, panel_before, "panel untouched");
    assert_eq!(
        s.sim(&s.panel)?.total_writes(),
        panel_writes_before,
        "no panel write"
    );
    assert_eq!(
        s.sim(&lock)?.writes(alice_lock_slot),
        alice_slot_writes_before + 1,
        "one write for the new PIN"
    );

    // A stale etag is refused and changes nothing.
    let stale = s
        .admin
        .update_credential(pb::UpdateCredentialRequest {
            credential: Some(pb::Credential {
                name: alice_lock.name.clone(),
                pin: "2468".into(),
                etag: alice_lock.etag.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["pin".into()],
            }),
        })
        .await
        .expect_err("stale etag");
    assert_eq!(stale.code(), tonic::Code::Aborted);

    // Delete it: only that slot is cleared; nobody else's slot number moves.
    s.admin
        .delete_credential(pb::DeleteCredentialRequest {
            name: alice_lock.name.clone(),
            etag: String::new(),
        })
        .await?;
    s.wait_synced().await?;
    let mut expected = lock_before.clone();
    expected.remove(&alice_lock_slot);
    assert_eq!(s.slots(&lock)?, expected);
    assert_eq!(s.slots(&s.panel)?, panel_before);
    for (cred, device) in [
        (&bob_lock, &lock),
        (&carol_both, &lock),
        (&carol_both, &s.panel),
        (&alice_panel, &s.panel),
    ] {
        let now = s
            .admin
            .get_credential(pb::GetCredentialRequest {
                name: cred.name.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(
            slot_on(&now, device),
            slot_on(cred, device),
            "{} kept its slot",
            cred.name
        );
    }
    // The freed slot is reused by the next credential; others still do not move.
    let dave = create_user(&mut s.admin, &s.site.clone(), "Dave").await?;
    let dave_lock = s.credential(&dave, "2468", lock_scope(&[&lock])).await?;
    assert_eq!(slot_on(&dave_lock, &lock), Some(alice_lock_slot));
    agent.stop().await?;
    Ok(())
}
